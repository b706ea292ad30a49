"""Conceptrol on ComfyUI's attention: wraps the Attn2Replace patches IPAdapter_plus installs (ALGORITHM.md section 1).

ComfyUI calls an attn2 replacement with the query and the text keys after `to_q`/`to_k`, flattened over heads
([R, N, H*d] and [R, T, H*d]), and `extra_options` naming the block, the CFG chunks (`cond_or_uncond`) and the
latent's shape. IPAdapter_plus's replacement adds each applied adapter's output to the text attention; the
replacement here adds each one times its concept's mask. ComfyUI and IPAdapter_plus are imported at run time only.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..core.errors import ConceptrolError
from ..core.masking import concept_mask, layer_grid, resize_mask, span_weights, text_attention_probs

# ComfyUI's (block, number, index inside the block's SpatialTransformer) of the concept-specific layer
SD15_CONCEPT_LAYER = ("output", 3, 0)  # diffusers up_blocks.1.attentions.0.transformer_blocks.0.attn2
SDXL_CONCEPT_LAYER = ("output", 1, 3)  # diffusers up_blocks.0.attentions.1.transformer_blocks.3.attn2
COND, UNCOND = 0, 1  # ComfyUI's labels of the chunks of a batch (extra_options["cond_or_uncond"])
KEPT_RUNS = 16  # finished sampling runs whose final masks a Conceptrol node output keeps (for Conceptrol Mask)


def latent_key(samples: Tensor) -> str:
    """A fingerprint of a sampler's output latent: which sampling run made a LATENT, whatever ComfyUI cached."""
    values = samples.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.blake2b(values.numpy().tobytes(), digest_size=16).hexdigest()
    return f"{tuple(values.shape)}:{digest}"


@dataclass(frozen=True)
class SampledRun:
    """One finished sampling run: the latent it returned (its latent_key) and the concept layer's last-step read."""

    latent: str
    final_mask: Tensor  # [S, J, h, w], fp32 on the CPU


@dataclass
class ConceptrolRun:
    """State one Conceptrol node output shares between its attention patches and its sampler wrapper.

    Cloning a ModelPatcher deep-copies its model_options, patches included; the run is shared, not copied,
    so every clone's patches and the wrapper that resets it see the same one.

    ComfyUI's executor caches node outputs, so one Conceptrol output can be sampled by several runs (other seeds, other
    sampler nodes) and a Conceptrol Mask node can run long after the sampling its LATENT came from (only its concept
    index changed, or --cache-lru served that LATENT from an older run). `finished` keeps each run's final read
    under the latent that run returned, and the mask node looks its LATENT up there instead of taking the latest run.
    """

    spans: list[slice]  # token span of each concept, in the order the IPAdapters were applied
    labels: list[str]  # the concepts as the user wrote them
    concept_layer: tuple[str, int, int]
    masking: str = "global"  # or "local": every layer its own mask
    global_mask: Tensor | None = None  # [S, J, h, w], the concept layer's latest read; None before the first
    records: list[Tensor] = field(default_factory=list)  # every read of this sampling run, [S, J, h, w]
    last_records: list[Tensor] = field(default_factory=list)  # the reads of the last finished run, fp32 on the CPU
    finished: deque[SampledRun] = field(default_factory=lambda: deque(maxlen=KEPT_RUNS))  # newest last
    _weights: dict[tuple, Tensor] = field(default_factory=dict)  # span weights per (rows, text tokens, device)

    def __deepcopy__(self, memo: dict) -> ConceptrolRun:
        return self

    def begin(self) -> None:
        """A sampling run starts: nothing carries over from the previous one."""
        self.global_mask, self.records = None, []

    def end(self, output: Tensor | None = None) -> None:
        """A sampling run ended (with its output latent, unless it failed): its reads move to the CPU once (not one
        device sync per step), and its last read is kept under the latent it produced."""
        self.last_records = [record.float().cpu() for record in self.records]
        self.records, self.global_mask = [], None
        if output is not None and self.last_records:
            self.finished.append(SampledRun(latent_key(output), self.last_records[-1]))

    def around_sampling(self, executor, *args, **kwargs):
        """ComfyUI OUTER_SAMPLE wrapper: a fresh state for every sampling run (KSampler, SamplerCustom, ...)."""
        self.begin()
        try:
            output = executor(*args, **kwargs)
        except BaseException:
            self.end()
            raise
        self.end(output)  # what the sampler node returns as LATENT["samples"] (moved to ComfyUI's intermediate device)
        return output

    def final_mask_of(self, samples: Tensor) -> Tensor | None:
        """The last-step read of the run that produced `samples` ([S, J, h, w]), or None if none kept did."""
        key = latent_key(samples)
        return next((run.final_mask for run in reversed(self.finished) if run.latent == key), None)

    def layer_masks(self, query: Tensor, key: Tensor, extra_options: dict, needed: bool) -> Tensor | None:
        """Each row's mask per concept at this layer, [R, J, N, 1]; None when no adapter acts here (or none is known)."""
        block, index = extra_options["block"], extra_options.get("block_index", 0)
        is_concept_layer = (block[0], block[1], index) == self.concept_layer
        if not (needed or is_concept_layer):
            return None
        chunks = extra_options["cond_or_uncond"]
        rows_per_chunk = query.shape[0] // len(chunks)
        grid = layer_grid(tuple(extra_options["original_shape"][-2:]), query.shape[1])
        if COND in chunks and (is_concept_layer or self.masking == "local" or self.global_mask is None):
            cond = slice(chunks.index(COND) * rows_per_chunk, (chunks.index(COND) + 1) * rows_per_chunk)
            mask = self._local_mask(query[cond], key[cond], extra_options["n_heads"])  # [S, J, N]
            if is_concept_layer:
                self.global_mask = mask.unflatten(-1, grid)
                self.records.append(self.global_mask.detach())
        elif self.global_mask is not None:  # an uncond-only batch: the latest read
            mask = resize_mask(self.global_mask, grid)
        else:
            return None  # an uncond-only batch before any read: the adapter acts unmasked
        if not needed:
            return None
        return mask.repeat(len(chunks), 1, 1).unsqueeze(-1).to(query.dtype)  # both halves share a sample's mask

    def _local_mask(self, query: Tensor, key: Tensor, heads: int) -> Tensor:
        """M_i of section 1 from the conditional rows' text attention: [S, J, N]."""
        query = query.unflatten(-1, (heads, -1)).transpose(1, 2)  # [S, H, N, d]
        key = key.unflatten(-1, (heads, -1)).transpose(1, 2)  # [S, H, T, d]
        weights = self._span_weights(query.shape[0], key.shape[2], query.device)  # [S, J, T]
        return concept_mask(text_attention_probs(query, key), weights)

    def _span_weights(self, rows: int, num_tokens: int, device: torch.device) -> Tensor:
        """[S, J, T] span-averaging weights, checked and built once per shape and device (not at every read)."""
        key = (rows, num_tokens, device)
        if key not in self._weights:
            for label, span in zip(self.labels, self.spans):
                if span.stop > num_tokens:
                    raise ConceptrolError(f"concept {label!r} sits at tokens {span.start}..{span.stop - 1}, past the "
                                          f"{num_tokens} text tokens this model receives; is the prompt the one "
                                          "sampled?")
            self._weights[key] = span_weights([self.spans] * rows, num_tokens, device)
        return self._weights[key]


class ConceptrolAttn2:
    """An attn2 replacement: text attention plus each IPAdapter's output times its concept's mask.

    Built from IPAdapter_plus's Attn2Replace of the same layer, whose callbacks and keyword sets it copies (that
    object's `add` mutates it, and other models may share it). It sums in Attn2Replace's order and with its sigma
    window, so a mask of ones gives IPAdapter_plus's output exactly.
    """

    def __init__(self, source, run: ConceptrolRun) -> None:
        self.callbacks = list(source.callback) if source is not None else []
        self.kwargs = [dict(kwargs) for kwargs in source.kwargs] if source is not None else []
        self.run = run

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, extra_options: dict) -> Tensor:
        from comfy.ldm.modules.attention import optimized_attention

        dtype = q.dtype
        out = optimized_attention(q, k, v, extra_options["n_heads"])
        active = self._active(extra_options)
        masks = self.run.layer_masks(q, k, extra_options, needed=bool(active))
        for i in active:
            branch = self.callbacks[i](out, q, k, v, extra_options, **self.kwargs[i])
            out = out + (branch if masks is None else branch * masks[:, i])
        return out.to(dtype=dtype)

    def _active(self, extra_options: dict) -> list[int]:
        """The adapters whose [start_at, end_at] window (as sigmas) holds this step, as Attn2Replace decides it."""
        sigma = extra_options["sigmas"].detach().cpu()[0].item() if "sigmas" in extra_options else 999999999.9
        return [i for i, kwargs in enumerate(self.kwargs) if kwargs["sigma_end"] <= sigma <= kwargs["sigma_start"]]

    def add(self, *args, **kwargs) -> None:
        raise ConceptrolError("an IPAdapter node comes after the Conceptrol node; "
                              "place Conceptrol after every IPAdapter node")

    def to(self, device, *args, **kwargs) -> ConceptrolAttn2:
        """ComfyUI moves patches with the model; IPAdapter_plus keeps its tensors on the load device already."""
        return self


def concept_layer_of(model) -> tuple[str, int, int]:
    """The concept-specific layer of a ComfyUI model: SD 1.5 family or SDXL family, else an error."""
    import comfy.supported_models as supported

    config = model.model.model_config
    layer = (SDXL_CONCEPT_LAYER if isinstance(config, supported.SDXL)
             else SD15_CONCEPT_LAYER if isinstance(config, (supported.SD15, supported.SD20)) else None)
    if layer is None or not _has_layer(model.model.diffusion_model, layer):
        raise ConceptrolError(f"Conceptrol supports SD 1.5 and SDXL models with IPAdapter; this model is "
                              f"{type(config).__name__}" + ("" if layer is None else f" without the layer {layer}"))
    return layer


def _has_layer(unet, layer: tuple[str, int, int]) -> bool:
    """Whether the U-Net has a cross-attention at ComfyUI's (block, number, index inside the block)."""
    block, number, index = layer
    blocks = getattr(unet, f"{block}_blocks", None)
    if blocks is None or number >= len(blocks):
        return False
    return any(len(getattr(module, "transformer_blocks", ())) > index for module in blocks[number])


def apply_conceptrol_patch(model, spans: list[slice], labels: list[str], masking: str = "global"):
    """A clone of `model` whose IPAdapter attn2 patches act inside their concepts' masks; `model` is left as it was."""
    from comfy.patcher_extension import WrappersMP

    patches = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    adapters = {key: patch for key, patch in patches.items() if hasattr(patch, "callback") and hasattr(patch, "kwargs")}
    if not adapters:
        raise ConceptrolError("the model has no IPAdapter; connect the Conceptrol node after the IPAdapter node(s)")
    counts = {len(patch.callback) for patch in adapters.values()}
    if counts != {len(spans)}:
        raise ConceptrolError(f"got {len(spans)} concept(s) ({', '.join(map(repr, labels))}) for "
                              f"{max(counts)} IPAdapter(s); give one concept per IPAdapter, in the order they were applied")
    run = ConceptrolRun(spans=spans, labels=labels, concept_layer=concept_layer_of(model), masking=masking)
    patched = model.clone()
    for key, patch in adapters.items():
        patched.set_model_attn2_replace(ConceptrolAttn2(patch, run), *key)
    if run.concept_layer not in adapters and run.concept_layer[:2] not in adapters:
        patched.set_model_attn2_replace(ConceptrolAttn2(None, run), *run.concept_layer)  # it only reads the mask
    patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, "conceptrol", run.around_sampling)
    patched.set_attachments("conceptrol", run)
    return patched


def recorded_run(model) -> ConceptrolRun:
    run = model.attachments.get("conceptrol") if hasattr(model, "attachments") else None
    if run is None:
        raise ConceptrolError("this MODEL has not been through a Conceptrol node; connect the Conceptrol node's output")
    return run
