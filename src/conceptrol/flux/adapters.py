"""Conceptrol for FLUX.1's other reference adapters (ALGORITHM.md section 4), on the stock diffusers pipelines.

- XLabs IP-Adapter: a FluxPipeline after `pipe.load_ip_adapter(...)`; the branch output is gated by M, and by the
  user's `ip_adapter_masks` (which diffusers alone ignores).
- FLUX.1 Kontext: a FluxKontextPipeline; the reference's VAE tokens follow the latent tokens.
- FLUX.1 Redux: a FluxPipeline with its text encoders, plus a FluxPriorReduxPipeline for the reference's
  SigLIP tokens, appended after the prompt's 512 T5 tokens.
Each handle installs `FluxBlockProcessor`s on every block (removed exactly by `remove()`), follows the steps
with a chained `callback_on_step_end` and the passes with a forward pre-hook, and passes every keyword of
the wrapped pipeline through.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.backends import check_bias_backend
from ..core.callbacks import chain_step_callback
from ..core.concepts import ResolvedConcepts, as_span, resolve_concepts
from ..core.config import ConceptrolConfig
from ..core.errors import ConceptrolError
from ..core.masks import ConceptMasks
from ..core.wrapping import ProcessorSwap
from .block_processor import AdapterCall, FluxAdapterState, FluxBlockProcessor, Mode
from .blocks import mask_blocks
from .ip_masks import check_user_masks
from .sequence import SequenceLayout, latent_grid

PROCESSOR_SUFFIX = ".attn.processor"
MAX_T5_TOKENS = 512


class FluxAdapterHandle:
    """Shared by the three adapters: install, call (spans, steps, passes), masks, remove."""

    mode: Mode = "bias"
    name = "this FLUX adapter"
    reference_keyword = "image"  # the keyword that carries the reference image
    local_masking = False  # whether masking="local" makes sense for this adapter

    def __init__(self, pipe: Any, config: ConceptrolConfig) -> None:
        if config.masking == "local" and not self.local_masking:
            raise ConceptrolError(f"{self.name} has no local masking; use masking='global' (Conceptrol) or 'none'")
        transformer = pipe.transformer
        if any(isinstance(p, FluxBlockProcessor) for p in transformer.attn_processors.values()):
            raise ConceptrolError("Conceptrol is already applied to this pipeline; call handle.remove() before "
                                  "applying it again")
        reading = set(mask_blocks(transformer, config.concept_layer))
        self.pipe, self.config = pipe, config
        self.state = FluxAdapterState(config, self.mode)

        def make(key: str, stock: Any) -> FluxBlockProcessor:
            block = key.removesuffix(PROCESSOR_SUFFIX)
            return FluxBlockProcessor(stock, self.state, block, block in reading, block == config.concept_layer)

        self._swap: ProcessorSwap | None = ProcessorSwap(transformer, make, self._on_forward)
        self.masks: ConceptMasks | None = None

    def __call__(self, prompt: str | list[str] | None = None, concepts: list | None = None, **kwargs: Any) -> Any:
        """Run the pipeline under Conceptrol; `concepts` holds one concept per reference image."""
        if self._swap is None:
            raise ConceptrolError("this handle was removed; call apply_conceptrol(pipe) again")
        if concepts is None:
            raise ConceptrolError("pass concepts=[...], one word or phrase from the prompt per reference image")
        _check_sizes(self.pipe, kwargs)
        if self._adds_bias():
            check_bias_backend(list(self._swap.installed.values()), self.name)
        num_references = self._check_call(prompt, kwargs)
        resolved = self._resolve(prompt, concepts, kwargs, num_references)
        user_masks = self._user_masks(kwargs, len(resolved.spans))
        masking = self.config.masking != "none"
        self.state.call = AdapterCall(spans=resolved.spans if masking else None,
                                      total_steps=int(kwargs.get("num_inference_steps") or 28), user_masks=user_masks)
        self.masks, output = None, None
        try:
            output = self._run(prompt, chain_step_callback(kwargs, self._on_step_end))
            return output
        finally:
            call, self.state.call = self.state.call, None
            self.masks = self._masks(call, resolved.labels) if output is not None else None

    def remove(self) -> None:
        """Restore the exact processor objects that were there before; idempotent."""
        if self._swap is None:
            return
        self._swap.undo("the transformer's attention processors were replaced after apply_conceptrol (e.g. by "
                        "unload_ip_adapter); they are left as they are now")
        self._swap = None

    # What differs per adapter.
    def _check_call(self, prompt: Any, kwargs: dict) -> int:
        """Check the call's reference keywords; returns the number of reference images."""
        image = kwargs.get(self.reference_keyword)
        if image is None:
            raise ConceptrolError(f"pass {self.reference_keyword}=<the reference image> to {self.name}")
        if isinstance(image, (list, tuple)) and len(image) != 1:
            raise ConceptrolError(f"{self.name} takes one reference image per call, got {len(image)}")
        return 1

    def _run(self, prompt: Any, kwargs: dict) -> Any:
        return self.pipe(prompt=prompt, **kwargs)

    def _user_masks(self, kwargs: dict, num_samples: int) -> list | None:
        """The users' own `ip_adapter_masks`, checked (the IP-Adapter only; elsewhere they pass through as is)."""
        return None

    def _layout(self, kwargs: dict) -> SequenceLayout:
        raise NotImplementedError

    # Shared machinery.
    def _adds_bias(self) -> bool:
        """Whether calls put an additive bias on the attention: the bias mode, unless it would be all zeros."""
        config = self.config
        plain = config.masking == "none" and config.scale in (None, 1.0) and config.start == 0 and config.end == 1
        return self.mode == "bias" and not plain

    def _resolve(self, prompt: Any, concepts: list, kwargs: dict, num_references: int) -> ResolvedConcepts:
        """The concepts' spans in the T5 tokens of every sample: the T5 prompt is prompt_2 when given, else prompt."""
        t5_prompt = kwargs.get("prompt_2") or prompt
        prompts = [t5_prompt] if isinstance(t5_prompt, str) else (list(t5_prompt) if t5_prompt is not None else None)
        embeds = kwargs.get("prompt_embeds")
        if prompts is None and embeds is None:
            raise ConceptrolError("pass prompt (or prompt_embeds with concepts as (start, end) T5 token spans)")
        num_prompts = len(prompts) if prompts is not None else embeds.shape[0]
        samples = num_prompts * int(kwargs.get("num_images_per_prompt") or 1)
        resolved = resolve_concepts(self.pipe.tokenizer_2, prompts, concepts, samples,
                                    max_length=int(kwargs.get("max_sequence_length") or MAX_T5_TOKENS))
        if len(resolved.spans[0]) != num_references:
            raise ConceptrolError(f"got {len(resolved.spans[0])} concept(s) for {num_references} reference image(s); "
                                  "pass exactly one concept per reference image, in the same order")
        if embeds is not None:
            for spans in resolved.spans:
                for span in spans:
                    as_span(span, num_text_tokens=embeds.shape[1])
        return resolved

    def _on_step_end(self, step: int) -> None:
        self.state.call.end_step(step)

    @torch.compiler.disable  # plain Python between transformer calls: a compiled transformer neither traces nor guards on it
    def _on_forward(self, module: Any, args: tuple, kwargs: dict) -> None:
        """Each transformer call: which pass it is, the latent grid and the sequence layout, the steps run, and from
        them the window and what the processors read (the one place these are set)."""
        call = self.state.call
        if call is None:
            return
        call.passes += 1
        call.negative = call.passes > 1
        if call.grid is None and kwargs.get("img_ids") is not None:
            call.grid = latent_grid(kwargs["img_ids"])
        call.layout = self._layout(kwargs)
        steps = getattr(self.pipe, "_num_timesteps", None)
        if isinstance(steps, int) and steps > 0:
            call.total_steps = steps
        self.state.follow_window()
        self.state.prepare(kwargs["hidden_states"].device)

    def _masks(self, call: AdapterCall | None, labels: list[list[str]]) -> ConceptMasks | None:
        if call is None or not call.records or call.grid is None:
            return None
        masks = torch.stack([m.float().cpu().reshape(m.shape[0], -1, *call.grid) for m in call.records])
        return ConceptMasks(masks=masks, concepts=labels, layer=self.config.concept_layer)


def _check_sizes(pipe: Any, kwargs: dict) -> None:
    """Output sizes in whole latent patches (16 px on FLUX.1: the VAE's factor 8, packed 2x2)."""
    multiple = pipe.vae_scale_factor * 2
    for name in ("height", "width"):
        value = kwargs.get(name)
        if value is not None and (value < multiple or value % multiple):
            raise ConceptrolError(f"{name} must be a positive multiple of {multiple} pixels for this model, got {value}")


def _joint_sizes(kwargs: dict) -> tuple[int, int]:
    """(text tokens, image tokens) of a transformer call, from its tensors."""
    return kwargs["encoder_hidden_states"].shape[1], kwargs["hidden_states"].shape[1]


class XLabsIPAdapterHandle(FluxAdapterHandle):
    """FluxPipeline with XLabs' IP-Adapter (`pipe.load_ip_adapter`): the branch output gated by M (section 4 (a))."""

    mode = "gate"
    reference_keyword = "ip_adapter_image"
    local_masking = True
    name = "the FLUX IP-Adapter"

    def _check_call(self, prompt: Any, kwargs: dict) -> int:
        adapters = self.pipe.transformer.encoder_hid_proj.num_ip_adapters
        images, embeds = kwargs.get("ip_adapter_image"), kwargs.get("ip_adapter_image_embeds")
        if images is None and embeds is None:
            raise ConceptrolError("pass ip_adapter_image=<the reference image> (one per loaded IP-Adapter) or "
                                  "ip_adapter_image_embeds")
        given = images if images is not None else embeds
        count = len(given) if isinstance(given, (list, tuple)) else 1
        if count != adapters:
            raise ConceptrolError(f"got {count} reference image(s) for {adapters} loaded IP-Adapter(s); pass one "
                                  "reference per adapter (a list when several adapters are loaded)")
        return adapters

    def _user_masks(self, kwargs: dict, num_samples: int) -> list | None:
        """`joint_attention_kwargs={"ip_adapter_masks": ...}`, checked before the first step (flux/ip_masks.py)."""
        masks = (kwargs.get("joint_attention_kwargs") or {}).get("ip_adapter_masks")
        return check_user_masks(masks, self.pipe.transformer.encoder_hid_proj.num_ip_adapters, num_samples)

    def _layout(self, kwargs: dict) -> SequenceLayout:
        text, image = _joint_sizes(kwargs)
        return SequenceLayout(text + image, slice(0, text), slice(text, text + image), slice(text + image, text + image))


class KontextHandle(FluxAdapterHandle):
    """FluxKontextPipeline: [text | latent | reference] with section 2's bias on the reference (section 4 (b))."""

    name = "FLUX.1 Kontext"

    def _layout(self, kwargs: dict) -> SequenceLayout:
        text, image = _joint_sizes(kwargs)
        rows, cols = self.state.call.grid  # the latent tokens come first; the reference's follow them
        end = text + rows * cols
        return SequenceLayout(text + image, slice(0, text), slice(text, end), slice(end, text + image))


class ReduxHandle(FluxAdapterHandle):
    """FluxPipeline + FluxPriorReduxPipeline: [T5 | Redux | latent] with section 2's bias (section 4 (b)).

    The prompt is encoded by the FLUX pipeline's own text encoders and the reference's tokens are appended after
    its T5 tokens, as FluxPriorReduxPipeline does when it has text encoders.
    """

    name = "FLUX.1 Redux"

    def __init__(self, pipe: Any, config: ConceptrolConfig, prior: Any) -> None:
        self.prior = prior
        super().__init__(pipe, config)

    def _check_call(self, prompt: Any, kwargs: dict) -> int:
        for key in ("prompt_embeds", "pooled_prompt_embeds"):
            if kwargs.get(key) is not None:
                raise ConceptrolError(f"with Redux the handle builds {key} itself (the prompt's T5 tokens, then the "
                                      "reference's); pass prompt instead")
        return super()._check_call(prompt, kwargs)

    def _run(self, prompt: Any, kwargs: dict) -> Any:
        image = kwargs.pop("image")
        image = image[0] if isinstance(image, (list, tuple)) else image
        pipe, prior = self.pipe, self.prior
        device = pipe._execution_device
        length = int(kwargs.pop("max_sequence_length", None) or MAX_T5_TOKENS)
        with torch.no_grad():  # as the pipelines encode (grad mode changes the encoders' round-off)
            text, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=kwargs.pop("prompt_2", None), device=device,
                                                 num_images_per_prompt=1, max_sequence_length=length)
            tokens = prior.image_embedder(prior.encode_image(image, device, 1)).image_embeds.to(device)  # [1, R, D]
        embeds = torch.cat([text, tokens.expand(text.shape[0], -1, -1).to(text.dtype)], dim=1)  # [B, T5 + R, D]
        self.state.call.num_t5 = text.shape[1]
        return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, max_sequence_length=length, **kwargs)

    def _layout(self, kwargs: dict) -> SequenceLayout:
        text, image = _joint_sizes(kwargs)
        t5 = min(self.state.call.num_t5 or text, text)  # a negative prompt's pass has no reference tokens
        return SequenceLayout(text + image, slice(0, t5), slice(text, text + image), slice(t5, text))
