"""The handle of a model whose reference images enter the joint sequence as extra tokens (ALGORITHM.md section 6).

Shared by FLUX.2 (flux2/) and Qwen-Image-Edit (qwenimage/): install the family's processors on every block (removed
exactly by `remove()`), check a call before its first step, locate one concept per reference in the chat-templated
prompt, follow the steps with a chained `callback_on_step_end` and the passes with a forward pre-hook, and pass every
keyword of the stock pipeline through. A family says how its processors are made, where the tokens sit in a
transformer call, and how a concept is found in its template.
"""

from __future__ import annotations

from typing import Any

import torch

from .backends import check_bias_backend
from .callbacks import chain_step_callback
from .concepts import ResolvedConcepts, resolve_concepts
from .config import ConceptrolConfig
from .errors import ConceptrolError
from .joint import ReferenceCall, ReferenceLayout, ReferenceState
from .masks import ConceptMasks
from .wrapping import ProcessorSwap


class ReferenceHandle:
    """Conceptrol on a stock pipeline that takes `image=[ref_1, ..., ref_R]`; call it as the pipeline, plus `concepts`.

    `handle(prompt="a dog in a hat", concepts=["dog", "hat"], image=[dog, hat], ...)`: one concept per reference in
    order, None for a reference that stays global (a background, a style). `handle.masks` holds the concept masks
    the last call read (per reference).
    """

    name = "this model"
    default_steps = 50  # the pipeline's own default of num_inference_steps

    def __init__(self, pipe: Any, config: ConceptrolConfig) -> None:
        transformer = pipe.transformer
        if any(getattr(p, "conceptrol", False) for p in transformer.attn_processors.values()):
            raise ConceptrolError("Conceptrol is already applied to this pipeline; call handle.remove() before "
                                  "applying it again")
        self.pipe, self.config = pipe, config
        self.state = ReferenceState(config)
        self._swap: ProcessorSwap | None = ProcessorSwap(transformer, self._processor, self._on_forward)
        self.masks: ConceptMasks | None = None

    def __call__(self, prompt: str | list[str] | None = None, concepts: list | None = None, **kwargs: Any) -> Any:
        """Run the stock pipeline under Conceptrol; `concepts` holds one concept (or None) per reference image."""
        if self._swap is None:
            raise ConceptrolError("this handle was removed; call apply_conceptrol(pipe) again")
        references = self._references(kwargs)
        if concepts is None:
            raise ConceptrolError(f"pass concepts=[...], one word of the prompt per reference image ({references} "
                                  "given), or None for a reference that stays global")
        self._check_call(prompt, kwargs)
        resolved = self._resolve(prompt, concepts, kwargs, references)
        masking = self.config.masking != "none" and any(s is not None for s in resolved.spans[0])
        if self._adds_bias(masking):
            check_bias_backend(list(self._swap.installed.values()), self.name)
        self.state.call = ReferenceCall(spans=resolved.spans if masking else None,
                                        total_steps=int(kwargs.get("num_inference_steps") or self.default_steps))
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
        self._swap.undo("the transformer's attention processors were replaced after apply_conceptrol; they are left "
                        "as they are now")
        self._swap = None

    # What each family says.
    def _processor(self, key: str, stock: Any) -> Any:
        """Conceptrol's processor standing in for `stock` at `key`; it has `conceptrol = True`."""
        raise NotImplementedError

    def _layout(self, kwargs: dict) -> ReferenceLayout:
        """Where text, latent and reference tokens sit in the transformer call with these keywords (and its grid)."""
        raise NotImplementedError

    def _locate(self, kwargs: dict) -> Any:
        """`locate(prompt, concept) -> slice`: a concept's span in the text keys the transformer sees."""
        raise NotImplementedError

    def _tokenizer(self) -> Any:
        """The fast tokenizer of the text encoder (for its offset mapping and for suggestions)."""
        raise NotImplementedError

    def _check_call(self, prompt: Any, kwargs: dict) -> None:
        """Refuse what the pipeline would refuse (or what Conceptrol cannot follow) before any step."""

    def _run(self, prompt: Any, kwargs: dict) -> Any:
        return self.pipe(prompt=prompt, **kwargs)

    def _on_transformer_call(self, kwargs: dict) -> None:
        """Each transformer call, before the layout is read: the family's own bookkeeping (e.g. Qwen's text mask)."""

    # Shared.
    def _references(self, kwargs: dict) -> int:
        image = kwargs.get("image")
        if image is None:
            raise ConceptrolError(f"pass image=[...], the reference images of {self.name} (one concept per image)")
        return len(image) if isinstance(image, (list, tuple)) else 1

    def _adds_bias(self, masking: bool) -> bool:
        config = self.config
        return masking or config.scale not in (None, 1.0) or config.start != 0 or config.end != 1

    def _resolve(self, prompt: Any, concepts: Any, kwargs: dict, references: int) -> ResolvedConcepts:
        if kwargs.get("prompt_embeds") is not None:
            raise ConceptrolError(f"Conceptrol locates each concept in the prompt's text; pass prompt=... to {self.name}, "
                                  "not prompt_embeds")
        if prompt is None or (isinstance(prompt, (list, tuple)) and not prompt):
            raise ConceptrolError("pass prompt=..., the text that names each reference's subject")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not isinstance(concepts, (list, tuple)):
            raise ConceptrolError(f"concepts must be a list, one word of the prompt (or None) per reference image; got "
                                  f"{concepts!r}")
        flat = [c for c in concepts for c in (c if isinstance(c, list) else [c])]
        if any(isinstance(c, (slice, tuple)) for c in flat):
            raise ConceptrolError(f"{self.name} takes concepts as words of the prompt (or None), not token spans: the "
                                  "prompt is wrapped in a chat template whose positions Conceptrol works out itself")
        samples = len(prompts) * int(kwargs.get("num_images_per_prompt") or 1)
        resolved = resolve_concepts(self._tokenizer(), prompts, list(concepts), samples, locate=self._locate(kwargs), optional=True)
        if len(resolved.spans[0]) != references:
            raise ConceptrolError(f"got {len(resolved.spans[0])} concept(s) for {references} reference image(s); pass "
                                  "exactly one concept per reference image, in the same order (None for one that stays "
                                  "global)")
        return resolved

    def _on_step_end(self, step: int) -> None:
        self.state.call.end_step(step)

    @torch.compiler.disable  # plain Python between transformer calls: a compiled transformer neither traces nor guards on it
    def _on_forward(self, module: Any, args: tuple, kwargs: dict) -> None:
        """Each transformer call: which pass it is, the sequence layout, the steps run, and from them the window and
        what the processors read (the one place these are set)."""
        call = self.state.call
        if call is None:
            return
        call.passes += 1
        call.negative = call.passes > 1
        self._on_transformer_call(kwargs)
        call.layout = self._layout(kwargs)
        steps = getattr(self.pipe, "_num_timesteps", None)
        if isinstance(steps, int) and steps > 0:
            call.total_steps = steps
        self.state.follow_window()
        self.state.prepare(kwargs["hidden_states"].device, kwargs["hidden_states"].dtype)

    def _masks(self, call: ReferenceCall | None, labels: list[list[str]]) -> ConceptMasks | None:
        """The concept block's read of every step, [steps, samples, references, h, w] (ones for a global reference)."""
        if call is None or not call.records or call.grid is None:
            return None
        masks = torch.stack([m.float().cpu().reshape(m.shape[0], m.shape[1], *call.grid) for m in call.records])
        return ConceptMasks(masks=masks, concepts=labels, layer=self.config.concept_layer)



def transformer_is(pipe: Any, class_name: str) -> bool:
    """Whether `pipe.transformer` (or the module torch.compile wraps) is of the class named `class_name`."""
    transformer = getattr(pipe, "transformer", None)
    transformer = getattr(transformer, "_orig_mod", transformer)
    return type(transformer).__name__ == class_name


def install_reference_handle(pipe: Any, config: ConceptrolConfig, handle: type[ReferenceHandle], pipelines: tuple,
                             model: str, architecture: str) -> ReferenceHandle:
    """A family's handle on `pipe` once the pipeline is one it follows, masking is not local and the concept block
    is one of the transformer's dual-stream blocks."""
    from .blocks import check_block, dual_stream_block_names

    if type(pipe).__name__ not in pipelines:
        raise ConceptrolError(f"{type(pipe).__name__} is not supported; Conceptrol follows {model}'s reference images "
                              f"in {', '.join(pipelines)}")
    if config.masking == "local":
        raise ConceptrolError(f"{model} has no local masking; use masking='global' (Conceptrol) or 'none'")
    config = config.with_architecture(architecture)
    check_block(config.concept_layer, dual_stream_block_names(pipe.transformer))
    return handle(pipe, config)
