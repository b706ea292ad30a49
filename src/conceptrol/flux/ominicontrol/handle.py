"""Conceptrol for FLUX.1 with OminiControl: the same handle contract as the U-Net path, around its own denoising loop."""

from __future__ import annotations

import difflib
import inspect
import warnings
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from PIL import Image
from torch import Tensor

from ...core.concepts import ResolvedConcepts, as_span, resolve_concepts
from ...core.config import ConceptrolConfig
from ...core.errors import ConceptrolError, ConceptrolWarning
from ...core.masks import ConceptMasks
from ..blocks import mask_blocks
from .attention import FluxCall
from .pipeline import OminiControlInputs, OminiControlSettings, TextInputs, run_ominicontrol
from .transformer import SUBJECT_ADAPTER, OminiControlTransformer, lora_adapters, lora_layers, subject_adapter

LORA_HINT = ('load the OminiControl subject LoRA first, e.g. pipe.load_lora_weights("Yuanshi/OminiControl", '
             'weight_name="omini/subject_512.safetensors", adapter_name="subject")')
CALLBACK_TENSORS = tuple(FluxPipeline._callback_tensor_inputs)  # what callback_on_step_end_tensor_inputs may name
MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's limit on T5 tokens


def carries_ominicontrol(pipe: Any, redux: Any = None) -> bool:
    """Whether `pipe` carries OminiControl's subject LoRA: a LoRA adapter named "subject", or LoRAs alone.

    LoRAs without one named "subject" count as OminiControl's only when no other reference adapter is there
    (XLabs' IP-Adapter, Kontext, a Redux prior), as when OminiControl was loaded without an adapter_name; next to
    one of those they are ordinary LoRAs (a style or character LoRA).
    """
    adapters = lora_adapters(pipe.transformer)
    if not adapters or SUBJECT_ADAPTER in adapters:
        return bool(adapters)
    return not (redux is not None or "Kontext" in type(pipe).__name__
                or any(hasattr(p, "to_k_ip") for p in pipe.transformer.attn_processors.values()))


@dataclass(frozen=True)
class FluxCallArgs:
    """The keywords of a FLUX handle call: FluxPipeline.__call__'s, with its meaning, plus `condition_size`.

    Defaults differ from FluxPipeline only where OminiControl's do (512x512, 8 steps).
    """

    prompt: str | list[str] | None = None  # CLIP prompt, and the T5 prompt unless prompt_2 is given
    prompt_2: str | list[str] | None = None  # T5 prompt; the concept is looked up in it when given
    negative_prompt: str | list[str] | None = None  # true CFG's negative prompt (used when true_cfg_scale > 1)
    negative_prompt_2: str | list[str] | None = None  # its T5 prompt
    true_cfg_scale: float = 1.0  # s: velocity = neg + s * (pos - neg) when s > 1 and a negative prompt is given
    height: int = 512
    width: int = 512
    num_inference_steps: int = 8
    sigmas: list[float] | None = None  # custom sigmas for the scheduler; then their count sets the steps
    guidance_scale: float = 3.5  # guidance-distilled models only (FLUX.1-dev)
    condition_size: int = 512  # the reference is resized to this square (the LoRA's resolution)
    num_images_per_prompt: int = 1
    generator: torch.Generator | list[torch.Generator] | None = None
    latents: Tensor | None = None  # [B, N, 4*C] packed initial latents, as FluxPipeline.prepare_latents takes them
    prompt_embeds: Tensor | None = None  # [B, T, D] T5 embeddings; then concepts are (start, end) token spans
    pooled_prompt_embeds: Tensor | None = None  # [B, D] CLIP pooled embeddings, required with prompt_embeds
    negative_prompt_embeds: Tensor | None = None
    negative_pooled_prompt_embeds: Tensor | None = None
    output_type: str = "pil"  # "pil", "np", "pt" or "latent" (packed latents)
    return_dict: bool = True  # False: a tuple (images,)
    joint_attention_kwargs: dict[str, Any] | None = None  # only {"scale": s}: the LoRA scale
    callback_on_step_end: Callable[[Any, int, Any, dict], dict] | None = None
    callback_on_step_end_tensor_inputs: tuple[str, ...] | list[str] = ("latents",)  # names from CALLBACK_TENSORS
    max_sequence_length: int = 512

    def __post_init__(self) -> None:
        _check_text_inputs(self)
        _check_options(self)

    @classmethod
    def from_kwargs(cls, prompt: str | list[str] | None, kwargs: dict[str, Any]) -> FluxCallArgs:
        """Build from a call's keywords; a FluxPipeline keyword that OminiControl cannot honour raises."""
        known = {f.name for f in fields(cls)}
        for key in kwargs:
            if key not in known:
                _reject(key, known)
        return cls(prompt=prompt, **kwargs)

    @property
    def true_cfg(self) -> bool:
        """FluxPipeline's do_true_cfg: a negative prompt (or both negative embeddings) and true_cfg_scale > 1."""
        has_negative = self.negative_prompt is not None or (
            self.negative_prompt_embeds is not None and self.negative_pooled_prompt_embeds is not None)
        return self.true_cfg_scale > 1 and has_negative

    @property
    def lora_scale(self) -> float | None:
        return (self.joint_attention_kwargs or {}).get("scale")


def _reject(key: str, known: set[str]) -> None:
    if key in inspect.signature(FluxPipeline.__call__).parameters:
        raise ConceptrolError(f"FluxPipeline's {key!r} is not supported with OminiControl; the reference image goes "
                              "in image=, and the other FluxPipeline keywords work as there")
    close = difflib.get_close_matches(key, sorted(known | {"concepts", "image"}), n=1)
    raise TypeError(f"unexpected keyword argument {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""))


def _batch(prompt: str | list[str]) -> int:
    return 1 if isinstance(prompt, str) else len(prompt)


def _check_text_inputs(args: FluxCallArgs) -> None:
    """FluxPipeline.check_inputs' rules for prompts and embeddings (there ValueError, here ConceptrolError)."""
    for text, embeds in (("prompt", "prompt_embeds"), ("prompt_2", "prompt_embeds"),
                         ("negative_prompt", "negative_prompt_embeds"), ("negative_prompt_2", "negative_prompt_embeds")):
        if getattr(args, text) is not None and getattr(args, embeds) is not None:
            raise ConceptrolError(f"pass {text} or {embeds}, not both")
    if args.prompt is None and args.prompt_embeds is None:
        raise ConceptrolError("pass prompt, or prompt_embeds and pooled_prompt_embeds with concepts as (start, end) token spans")
    for name in ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2"):
        if getattr(args, name) is not None and not isinstance(getattr(args, name), (str, list)):
            raise ConceptrolError(f"{name} has to be a str or a list, got {type(getattr(args, name)).__name__}")
    for embeds in ("prompt_embeds", "negative_prompt_embeds"):
        pooled = embeds.replace("prompt_embeds", "pooled_prompt_embeds")
        if getattr(args, embeds) is not None and getattr(args, pooled) is None:
            raise ConceptrolError(f"with {embeds}, pass {pooled} too (from the same text encoders)")
    if args.prompt is not None and args.prompt_2 is not None and _batch(args.prompt) != _batch(args.prompt_2):
        raise ConceptrolError(f"prompt_2 has {_batch(args.prompt_2)} prompt(s) but prompt has {_batch(args.prompt)}")
    pair = (args.prompt_embeds, args.negative_prompt_embeds)
    if args.true_cfg and None not in pair and pair[0].shape != pair[1].shape:
        raise ConceptrolError(f"prompt_embeds and negative_prompt_embeds must have the same shape, got "
                              f"{list(pair[0].shape)} and {list(pair[1].shape)}")


def _check_options(args: FluxCallArgs) -> None:
    unsupported = [key for key in (args.joint_attention_kwargs or {}) if key != "scale"]
    if unsupported:
        raise ConceptrolError(f"joint_attention_kwargs key(s) {unsupported} are not supported with OminiControl; "
                              "only 'scale' (the LoRA scale) is")
    unknown = [name for name in args.callback_on_step_end_tensor_inputs if name not in CALLBACK_TENSORS]
    if unknown:
        raise ConceptrolError(f"callback_on_step_end_tensor_inputs has to be in {list(CALLBACK_TENSORS)}, but found {unknown}")
    if args.max_sequence_length > MAX_SEQUENCE_LENGTH:
        raise ConceptrolError(f"max_sequence_length cannot be greater than {MAX_SEQUENCE_LENGTH}, got {args.max_sequence_length}")
    if args.prompt_embeds is not None and args.num_images_per_prompt != 1:
        raise ConceptrolError("with prompt_embeds, num_images_per_prompt must be 1 (FluxPipeline does not repeat given "
                              "embeddings); repeat them yourself, e.g. prompt_embeds.repeat_interleave(n, dim=0)")


class FluxConceptrolHandle:
    """Call it like FluxPipeline, plus `concepts` (one) and `image` (the reference); `masking="none"` is plain OminiControl."""

    def __init__(self, pipe: Any, config: ConceptrolConfig) -> None:
        if config.masking == "local":
            raise ConceptrolError("FLUX has no local masking; use masking='global' (Conceptrol) or 'none' (OminiControl)")
        adapter = _subject_lora(pipe.transformer)
        if adapter != SUBJECT_ADAPTER:
            warnings.warn(f"taking the LoRA adapter {adapter!r} for OminiControl's subject LoRA; load OminiControl with "
                          f"adapter_name={SUBJECT_ADAPTER!r} to say so (and to load other LoRAs next to it)",
                          ConceptrolWarning, stacklevel=4)  # at the apply_conceptrol call
        self.mask_blocks = mask_blocks(pipe.transformer, config.concept_layer)
        self.pipe, self.config = pipe, config
        self.runner: OminiControlTransformer | None = OminiControlTransformer(pipe.transformer, self.mask_blocks, adapter)
        self.masks: ConceptMasks | None = None
        self._warned_compiled = False

    def __call__(self, prompt: str | list[str] | None = None, concepts: list | None = None,
                 image: Image.Image | None = None, **kwargs: Any) -> FluxPipelineOutput | tuple:
        """Generate as FluxPipeline.__call__ does, with OminiControl's reference `image` and its one concept.

        Takes FluxPipeline.__call__'s keywords (see `FluxCallArgs`) plus `condition_size`; those it cannot honour
        (IP-Adapter images) raise ConceptrolError. The concept is looked up in the T5 prompt (`prompt_2` when
        given, else `prompt`); with `prompt_embeds` instead of a prompt, `concepts` holds a (start, end) T5 token
        span. `joint_attention_kwargs={"scale": s}` scales every active LoRA, as in FluxPipeline. The subject LoRA
        acts on the condition tokens only; other LoRAs (a style LoRA) act on every token, as the user set them.
        True CFG (`true_cfg_scale > 1` and a negative prompt or negative embeddings) runs, each step, the positive
        pass first and then a negative pass that also sees the condition tokens; the negative pass reads no concept
        mask: all its blocks use the mask the positive pass left (the same Â and concept span positions, so the
        same attention bias), and the velocity is neg + true_cfg_scale * (pos - neg).
        """
        if self.runner is None:
            raise ConceptrolError("this handle was removed; call apply_conceptrol(pipe) again")
        self.masks = None  # until this call has finished
        args = FluxCallArgs.from_kwargs(prompt, kwargs)
        if not isinstance(image, Image.Image):
            raise ConceptrolError("pass image=<PIL image>: OminiControl takes one reference image")
        if concepts is None:
            raise ConceptrolError("pass concepts=[...], one word or phrase from the prompt for the reference image")
        settings = self._settings(args)
        resolved = self._resolve(args, concepts)
        self._warn_if_compiled()
        # the LoRAs as they are now (loaded, unloaded or fused since apply_conceptrol)
        self.runner = OminiControlTransformer(self.pipe.transformer, self.mask_blocks, _subject_lora(self.pipe.transformer))
        call = FluxCall(spans=None if self.config.masking == "none" else [s[0] for s in resolved.spans])
        images = run_ominicontrol(self.pipe, self.runner, call, _generation_inputs(args, image), settings, args.output_type)
        self.masks = self._masks(call, resolved.labels, settings)
        return FluxPipelineOutput(images=images) if args.return_dict else (images,)

    def _warn_if_compiled(self) -> None:
        """OminiControl calls the transformer's blocks itself, so a compiled transformer forward is not used."""
        transformer = self.pipe.transformer
        compiled = getattr(transformer, "_compiled_call_impl", None) is not None or hasattr(transformer, "_orig_mod")
        if compiled and not self._warned_compiled:
            self._warned_compiled = True
            warnings.warn("OminiControl runs its own transformer forward (its subject LoRA acts on the condition "
                          "tokens only), so the compiled transformer is not used: this handle runs eager",
                          UserWarning, stacklevel=3)

    def remove(self) -> None:
        """Nothing is installed on the pipeline; the handle just stops working."""
        self.runner = None

    def _settings(self, args: FluxCallArgs) -> OminiControlSettings:
        multiple = self.pipe.vae_scale_factor * 2
        for name in ("height", "width", "condition_size"):
            value = getattr(args, name)
            if value < multiple or value % multiple:
                raise ConceptrolError(f"{name} must be a positive multiple of {multiple} pixels for this model, got {value}")
        return OminiControlSettings(
            height=args.height, width=args.width, num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale, condition_size=args.condition_size,
            condition_scale=1.0 if self.config.scale is None else self.config.scale, start=self.config.start,
            end=self.config.end, max_sequence_length=args.max_sequence_length, sigmas=args.sigmas,
            true_cfg_scale=args.true_cfg_scale, lora_scale=args.lora_scale)

    def _resolve(self, args: FluxCallArgs, concepts: list) -> ResolvedConcepts:
        """The concept's span in the T5 tokens of every sample: found in the T5 prompt, or given with prompt_embeds."""
        t5_prompt = args.prompt_2 or args.prompt  # what encode_prompt hands T5
        prompts = [t5_prompt] if isinstance(t5_prompt, str) else (list(t5_prompt) if t5_prompt is not None else None)
        num_prompts = len(prompts) if prompts is not None else args.prompt_embeds.shape[0]
        resolved = resolve_concepts(self.pipe.tokenizer_2, prompts, concepts, num_prompts * args.num_images_per_prompt,
                                    max_length=args.max_sequence_length)
        if len(resolved.spans[0]) != 1:
            raise ConceptrolError(f"got {len(resolved.spans[0])} concepts for 1 reference image; pass exactly one")
        if args.prompt_embeds is not None:
            for spans in resolved.spans:
                as_span(spans[0], num_text_tokens=args.prompt_embeds.shape[1])
        return resolved

    def _masks(self, call: FluxCall, labels: list[list[str]], settings: OminiControlSettings) -> ConceptMasks | None:
        if not call.records:
            return None
        packed = self.pipe.vae_scale_factor * 2
        grid = (settings.height // packed, settings.width // packed)
        at_concept_block = call.records[:: len(self.mask_blocks)]  # one read per step at the concept block
        masks = torch.stack([m.float().cpu().view(m.shape[0], 1, *grid) for m in at_concept_block])
        return ConceptMasks(masks=masks, concepts=labels, layer=self.config.concept_layer)


def _subject_lora(transformer: Any) -> str:
    """The subject LoRA's adapter name; it has to be active and unfused (only the condition tokens may see it)."""
    adapter = subject_adapter(transformer)
    if adapter is None:
        raise ConceptrolError(f"this FLUX pipeline has no OminiControl LoRA; {LORA_HINT}")
    layers = lora_layers(transformer, adapter)
    if any(adapter not in layer.active_adapters for layer in layers):
        active = sorted({name for layer in lora_layers(transformer) for name in layer.active_adapters})
        raise ConceptrolError(
            f"OminiControl's subject LoRA {adapter!r} is not active (active: {active}; loading a LoRA makes it the only "
            f"active one): call pipe.set_adapters([{adapter!r}, ...]) with every LoRA to use, e.g. "
            f"pipe.set_adapters({sorted({adapter, *active})})")
    fused = sorted({name for layer in layers for name in layer.merged_adapters})
    if fused:
        raise ConceptrolError(
            f"LoRA {fused} is fused into layers of OminiControl's subject LoRA {adapter!r}; Conceptrol switches the "
            "subject LoRA on for the reference tokens only, which a fused subject LoRA cannot do, and peft applies no "
            "unfused LoRA in a layer with a fused one: call pipe.unfuse_lora() first. To bake a style LoRA into the "
            "weights, fuse it and call pipe.unload_lora_weights() before loading OminiControl")
    return adapter


def _generation_inputs(args: FluxCallArgs, image: Image.Image) -> OminiControlInputs:
    text = TextInputs(args.prompt, args.prompt_2, args.prompt_embeds, args.pooled_prompt_embeds)
    negative = None
    if args.true_cfg:
        negative = TextInputs(args.negative_prompt, args.negative_prompt_2, args.negative_prompt_embeds,
                              args.negative_pooled_prompt_embeds)
    return OminiControlInputs(
        text=text, image=image, negative=negative, num_images_per_prompt=args.num_images_per_prompt,
        generator=args.generator, latents=args.latents, callback_on_step_end=args.callback_on_step_end,
        callback_on_step_end_tensor_inputs=tuple(args.callback_on_step_end_tensor_inputs))
