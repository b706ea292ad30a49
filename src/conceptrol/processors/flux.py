"""Conceptrol's joint attention for FLUX with OminiControl (ALGORITHM.md section 2).

One object per generation call holds the textual concept mask; the attention of every block that
sees the condition tokens goes through `FluxConceptrolAttention.attend` with its role (reads the
mask or not) fixed by block name at install time. Outputs use `scaled_dot_product_attention` with an
additive bias; explicit probabilities are computed only at mask-reading blocks, and only for the
latent-to-text logits the mask needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import adapter_active
from ..masking import flux_concept_mask, reference_bias, span_weights

# Blocks whose attention re-reads the mask, as in the reference (double block 18; single blocks 18 and 37).
DEFAULT_MASK_BLOCKS = ("transformer_blocks.18", "single_transformer_blocks.18", "single_transformer_blocks.37")
OUTSIDE_WINDOW_SCALE = 0.5  # the reference's condition scale outside the [start, end] window


def condition_scale_at(step: int, total_steps: int, start: float, end: float, scale: float) -> float:
    """Condition scale c at step k: the requested one inside the window, 0.5 outside (as the reference)."""
    return scale if adapter_active(step, total_steps, start, end) else OUTSIDE_WINDOW_SCALE


@dataclass(frozen=True, eq=False)
class SequenceLayout:
    """Where the prompt's text, the latent image and the reference tokens sit in a joint attention sequence."""

    length: int
    text: slice  # the prompt's (T5) text tokens, whose attention gives the concept mask
    latent: slice  # the image being generated
    reference: slice  # the reference tokens (OminiControl's condition, Kontext's or Redux's); may be empty

    @property
    def has_reference(self) -> bool:
        return self.reference.stop > self.reference.start

    @property
    def key(self) -> tuple[int, ...]:
        """A hashable identity (slices are not hashable before Python 3.12)."""
        return (self.length, *(getattr(part, end) for part in (self.text, self.latent, self.reference)
                               for end in ("start", "stop")))


@dataclass(frozen=True, eq=False)
class JointLayout(SequenceLayout):
    """OminiControl's sequence [text | latent | condition]; all counts derived from tensor shapes."""

    def __init__(self, num_text: int, num_latent: int, num_condition: int) -> None:
        end = num_text + num_latent
        super().__init__(end + num_condition, slice(0, num_text), slice(num_text, end), slice(end, end + num_condition))

    @property
    def num_text(self) -> int:
        return self.text.stop

    @property
    def num_latent(self) -> int:
        return self.latent.stop - self.latent.start

    @property
    def num_condition(self) -> int:
        return self.reference.stop - self.reference.start


@dataclass
class FluxCall:
    """Per-call state: spans (None = plain OminiControl), the current mask, and cached biases."""

    spans: list[slice] | None  # one concept span per sample in the T5 tokens, 0-based
    concept_mask: Tensor | None = None  # Â [B, N], mean 1, from the last mask-reading block
    records: list[Tensor] = field(default_factory=list)
    _bias: dict[tuple, Tensor] = field(default_factory=dict)
    _weights: dict[tuple, Tensor] = field(default_factory=dict)

    def bias(self, layout: SequenceLayout, condition_scale: float, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The additive bias for the current mask and scale, built once until either changes."""
        key = (layout.key, condition_scale, device, dtype)
        if key not in self._bias:
            bias = reference_bias(layout.length, layout.text, layout.latent, layout.reference, self.spans,
                                  condition_scale, self.concept_mask, device)
            self._bias[key] = bias.to(dtype)
        return self._bias[key]

    def span_weights(self, num_text: int, device: torch.device) -> Tensor:
        """[B, T] with 1/|S| on each sample's concept span, built once per call."""
        key = (num_text, device)
        if key not in self._weights:
            self._weights[key] = span_weights([[span] for span in self.spans], num_text, device)[:, 0]
        return self._weights[key]

    def update_mask(self, mask: Tensor) -> None:
        self.concept_mask = mask
        self._bias = {}
        self.records.append(mask.detach())


class FluxConceptrolAttention:
    """Attention over [text | latent | condition] with OminiControl's or Conceptrol's bias."""

    def __init__(self, reads_mask: bool) -> None:
        self.reads_mask = reads_mask

    def attend(self, call: FluxCall, query: Tensor, key: Tensor, value: Tensor, layout: SequenceLayout,
               condition_scale: float) -> Tensor:
        """softmax(QKᵀ/√d + bias) V for q, k, v of shape [B, H, L, d] (after RoPE); reads Â where assigned."""
        bias = call.bias(layout, condition_scale, query.device, query.dtype)  # [B or 1, 1, L, L]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
        if self.reads_mask and call.spans is not None:
            weights = call.span_weights(layout.text.stop - layout.text.start, query.device)
            call.update_mask(flux_concept_mask(query[:, :, layout.latent], key[:, :, layout.text], weights))
        return out
