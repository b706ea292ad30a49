"""The tensor math of Conceptrol (arXiv 2503.06568), as pure functions with no diffusers imports."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

MASK_EPS = 1e-6  # added to the max in the normalisation, as in the reference


def text_attention_probs(query: Tensor, key: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Softmax attention of spatial queries over text tokens, in fp32: A_txt of section 1."""
    # query [S, H, N, d], key [S, H, T, d] -> [S, H, N, T]
    scale = 1.0 / math.sqrt(query.shape[-1])
    logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    if attention_mask is not None:
        logits = logits + attention_mask.float()
    return logits.softmax(dim=-1)


def span_weights(spans: list[list[slice]], num_tokens: int, device: torch.device) -> Tensor:
    """Averaging weights over each concept span: [S, J, T] with 1/|S_j| inside span j of sample s."""
    weights = torch.zeros(len(spans), len(spans[0]), num_tokens, device=device)
    for s, sample_spans in enumerate(spans):
        for j, span in enumerate(sample_spans):
            weights[s, j, span] = 1.0 / (span.stop - span.start)
    return weights


def concept_mask(text_probs: Tensor, weights: Tensor) -> Tensor:
    """Local concept mask M_i: head- and span-averaged text attention, divided by its spatial max."""
    # text_probs [S, H, N, T], weights [S, J, T] -> m [S, J, N]
    m = torch.einsum("shnt,sjt->sjn", text_probs, weights) / text_probs.shape[1]
    return normalize_mask(m)


def normalize_mask(m: Tensor) -> Tensor:
    """M = m / (max over positions of m + 1e-6), so that M lies in [0, 1]."""
    return m / (m.amax(dim=-1, keepdim=True) + MASK_EPS)


def layer_grid(latent_hw: tuple[int, int], num_tokens: int) -> tuple[int, int]:
    """The (h, w) grid of a layer with `num_tokens` positions, halving the latent (rounding up) per level."""
    h, w = latent_hw
    while h * w > num_tokens and h > 1 and w > 1:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != num_tokens:
        raise ValueError(f"no U-Net level of a {latent_hw} latent has {num_tokens} positions")
    return h, w


def resize_mask(mask: Tensor, grid: tuple[int, int]) -> Tensor:
    """A stored mask [S, J, h, w] resized to another grid by nearest neighbour: [S, J, h'*w']."""
    if tuple(mask.shape[-2:]) != tuple(grid):
        mask = F.interpolate(mask, size=grid, mode="nearest")
    return mask.flatten(2)

