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

from ...core.config import CONCEPT_LAYERS
from ...core.masking import flux_concept_mask, reference_bias, span_weights
from ..blocks import REREAD_BLOCKS
from ..sequence import SequenceLayout

# Blocks whose attention re-reads the mask, as in the reference (double block 18; single blocks 18 and 37).
DEFAULT_MASK_BLOCKS = (CONCEPT_LAYERS["flux"], *REREAD_BLOCKS)


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
