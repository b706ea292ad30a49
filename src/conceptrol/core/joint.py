"""Several references in one joint attention sequence, each confined to its own concept (ALGORITHM.md section 6).

Shared by the families whose references enter the sequence as extra tokens (FLUX.2, Qwen-Image-Edit): where the
text, latent and reference tokens sit, what one pipeline call holds (spans per sample and reference, the masks read
at the concept block, the window), and the additive bias each block's attention gets. A family's processors compute
the attention; this module decides what they add to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .config import ConceptrolConfig, StepWindow
from .masking import references_bias, span_weights, text_share
from .wrapping import DelegatesBackend

OUTSIDE_WINDOW_SCALE = 0.5  # c outside the [start, end] window, as section 2's reference does


@dataclass(frozen=True, eq=False)
class ReferenceLayout:
    """[text | latent | ref_1 | ... | ref_R] of one denoiser call (any order along the sequence)."""

    length: int
    text: slice  # the text keys the model sees (after any template prefix the pipeline drops)
    latent: slice  # the image being generated
    references: tuple[slice, ...]  # each reference's tokens, in the order of the pipeline's `image=[...]`

    @property
    def key(self) -> tuple[int, ...]:
        """A hashable identity (slices are not hashable before Python 3.12)."""
        parts = (self.text, self.latent, *self.references)
        return (self.length, *(end for part in parts for end in (part.start, part.stop)))


@dataclass(kw_only=True)
class ReferenceCall(StepWindow):
    """One pipeline call: spans per sample and reference (None: that reference stays global), the latest masks.

    The handle updates it between denoiser calls; processors read `active`, `negative`, whether masks exist, and
    tensors, never the step (a compiled denoiser would be specialised on it).
    """

    spans: list[list[slice | None]] | None  # [sample][reference]; None: masking off (the plain reference strength)
    concepts: tuple[int, ...] = field(init=False)  # the references that have a concept (the others are never masked)
    masking: bool = field(init=False)  # some reference is masked in this call
    passes: int = 0  # denoiser calls in this step: the first is the positive pass, a second the negative
    negative: bool = False  # the running call is a CFG negative pass: it reads nothing
    layout: ReferenceLayout | None = None
    grid: tuple[int, int] | None = None  # (rows, cols) of the latent tokens
    text_keep: Tensor | None = None  # [B, T] bool, the model's own text mask (Qwen-Image); None: every text key counts
    text_keep_key: tuple = ()  # a hashable copy of text_keep, for the bias caches
    masks: Tensor | None = None  # [B, R, N] Â_i of the latest read (ones for references without a concept)
    concept_read: Tensor | None = None  # the running step's read, recorded when the step ends
    records: list[Tensor] = field(default_factory=list)
    _weights: dict[tuple, Tensor] = field(default_factory=dict)
    _bias: dict[tuple, Tensor] = field(default_factory=dict)  # one [B, 1, L, L] bias per layout, strength and dtype
    _blocks: dict[tuple, tuple[ReferenceLayout, list[Tensor]]] = field(default_factory=dict)  # each bias's latent ->
    # ref_i entries without log Â (fp32), for the references with a concept: what a new Â is added to
    _rows: dict[tuple, Tensor] = field(default_factory=dict)  # query rows of a bias (FLUX.2's KV cache)

    def __post_init__(self) -> None:
        # Set once from the spans: processors read these, never the spans (a compiled transformer would guard on them)
        self.concepts = tuple(i for i, span in enumerate(self.spans[0]) if span is not None) if self.spans else ()
        self.masking = bool(self.concepts)

    def weights(self, num_text: int, device: torch.device) -> Tensor:
        """[B, R, T] span-averaging weights (zeros for references without a concept), built once per call."""
        key = (num_text, device)
        if key not in self._weights:
            filled = [[span or slice(0, 1) for span in sample] for sample in self.spans]
            weights = span_weights(filled, num_text, device)
            weights[:, [i for i in range(weights.shape[1]) if i not in self.concepts]] = 0.0
            self._weights[key] = weights
        return self._weights[key]

    def keep_text(self, mask: Tensor | None) -> None:
        """The running denoiser call's own text mask [B, T] (None: every text key counts); one device sync."""
        self.text_keep = None if mask is None else mask.to(torch.bool)
        self.text_keep_key = () if mask is None else (tuple(mask.shape), bytes(self.text_keep.flatten().tolist()))

    def end_step(self, step: int) -> None:
        """Between steps: record the concept block's read and count the next step."""
        if self.concept_read is not None:
            self.records.append(self.concept_read)
            self.concept_read = None
        self.step, self.passes = step + 1, 0

    def store(self, masks: Tensor) -> None:
        """Â of every reference [B, R, N] becomes the one later blocks (and the next step) use: written into every
        bias of the call in place (one [B, 1, L, L] tensor per bias in memory, never a second copy)."""
        self.masks = masks
        for key in self._bias:
            self.apply_masks(key)
        self._rows = {}
        self.concept_read = masks.detach()

    def apply_masks(self, key: tuple) -> None:
        """latent -> ref_i of the bias under `key` becomes its entry without Â plus log Â_i (summed in fp32, then
        rounded to the bias's dtype once)."""
        bias, (layout, blocks) = self._bias[key], self._blocks[key]
        for i, block in zip(self.concepts, blocks):
            log = self.masks[:, i].log().to(block.device)[:, :, None]
            bias[:, 0, layout.latent, layout.references[i]] = (block + log).to(bias.dtype)

    def clear_biases(self) -> None:
        """Drop every bias (the strength changed at the window's edge: the old ones are not used again)."""
        self._bias, self._blocks, self._rows = {}, {}, {}


class ReferenceState:
    """Owned by one handle; its processors read and write the running call through it."""

    def __init__(self, config: ConceptrolConfig) -> None:
        self.config = config
        self.call: ReferenceCall | None = None

    @property
    def masking(self) -> bool:
        call = self.call
        return call is not None and call.masking

    def follow_window(self) -> None:
        call = self.call
        active = call.active
        call.follow(self.config.start, self.config.end)
        if call.active != active:
            call.clear_biases()

    def reference_scale(self) -> float:
        """c: the requested strength inside the window, 0.5 outside (section 2)."""
        c = 1.0 if self.config.scale is None else self.config.scale
        return c if self.call.active else OUTSIDE_WINDOW_SCALE

    def biased(self) -> bool:
        """Whether the running denoiser call gets a bias: masking on, or a strength other than 1 (no bias at all when
        masking is off at c = 1: the stock attention, bit for bit)."""
        return self.call.layout is not None and bool(self.call.layout.references) and (
            self.masking or self.reference_scale() != 1.0)

    def prepare(self, device: torch.device, dtype: torch.dtype) -> None:
        """Before a denoiser call: what its processors read (span weights, the bias), built outside any compiled graph
        so that the graph is not specialised on the spans."""
        call = self.call
        if self.masking and not call.negative:  # only a positive pass reads (a negative prompt may be shorter)
            call.weights(call.layout.text.stop - call.layout.text.start, device)
        if self.biased():
            self.bias(device, dtype)

    def bias(self, device: torch.device, dtype: torch.dtype, rows: tuple[slice, ...] | None = None) -> Tensor:
        """Section 6's table [B, 1, L, L] with the current Â (ALGORITHM.md), built once per layout, strength and dtype;
        a new Â is written into it in place (`ReferenceCall.store`). `rows` keeps only those query rows (a sequence
        whose reference tokens attend apart, as FLUX.2's KV cache)."""
        call, layout, scale = self.call, self.call.layout, self.reference_scale()
        key = (layout.key, call.text_keep_key, scale, self.masking, device, dtype)
        if key not in call._bias:
            spans = call.spans if self.masking else None
            base = references_bias(layout.length, layout.text, layout.latent, list(layout.references), spans, scale,
                                   None, call.text_keep, device)
            blocks = [base[:, 0, layout.latent, layout.references[i]].clone() for i in call.concepts] if self.masking \
                else []
            call._bias[key], call._blocks[key] = base.to(dtype), (layout, blocks)
            if self.masking and call.masks is not None:
                call.apply_masks(key)
        if rows is None:
            return call._bias[key]
        rows_key = (*key, tuple((r.start, r.stop) for r in rows))
        if rows_key not in call._rows:
            call._rows[rows_key] = torch.cat([call._bias[key][:, :, part] for part in rows], dim=2)
        return call._rows[rows_key]

    def read(self, latent_query: Tensor, text_key: Tensor) -> None:
        """At the concept block of a positive pass: Â_i = r_i / mean r_i of every reference with a concept."""
        call = self.call
        weights = call.weights(text_key.shape[2], text_key.device)  # [B, R, T]
        r = text_share(latent_query, text_key, weights, call.text_keep)  # [B, R, N]
        ones = torch.ones_like(r)
        concept = torch.zeros(r.shape[1], dtype=torch.bool, device=r.device)
        concept[list(call.concepts)] = True
        call.store(torch.where(concept[None, :, None], r / r.mean(dim=-1, keepdim=True), ones))


class ReferenceProcessor(DelegatesBackend, nn.Module):
    """What a family's block processor holds: the stock processor it stands in for (`wrapped`), the handle's state,
    its block name, and whether it is the concept block (`reads`)."""

    conceptrol = True  # how a handle recognises its own processors

    def __init__(self, wrapped: Any, state: ReferenceState, name: str, reads: bool) -> None:
        nn.Module.__init__(self)
        object.__setattr__(self, "wrapped", wrapped)  # not a submodule: no duplicate state-dict keys
        self.state, self.name, self.reads = state, name, reads
