"""The tensor math of Conceptrol (arXiv 2503.06568), as pure functions with no diffusers imports."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

MASK_EPS = 1e-6  # added to the max in the normalisation, as in the reference
HEADS_PER_CHUNK = 4  # FLUX mask: attention heads whose text probabilities are held at once


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


# FLUX with OminiControl (ALGORITHM.md section 2). The joint sequence is [text T | latent N | condition N_c].


def flux_concept_mask(latent_query: Tensor, text_key: Tensor, weights: Tensor) -> Tensor:
    """Textual concept mask Â of FLUX: each latent token's share of its text attention on the concept, mean 1.

    Dividing P[h, n, t] by its sum over the T text columns cancels the softmax's normaliser, so only
    the latent-to-text logits are needed (the latent-to-text bias is 0).
    """
    # latent_query [B, H, N, d], text_key [B, H, T, d] (after RoPE), weights [B, T] -> [B, N]
    heads = latent_query.shape[1]
    r = latent_query.new_zeros(latent_query.shape[0], latent_query.shape[2], dtype=torch.float32)
    for first in range(0, heads, HEADS_PER_CHUNK):  # a few heads at a time: no [B, H, N, T] tensor at once
        chunk = slice(first, first + HEADS_PER_CHUNK)
        text_probs = text_attention_probs(latent_query[:, chunk], text_key[:, chunk])  # rows sum to 1 over text
        r += torch.einsum("bhnt,bt->bn", text_probs, weights)
    r = r / heads
    return r / r.mean(dim=-1, keepdim=True)


def flux_condition_bias(
    num_text: int,
    num_latent: int,
    num_condition: int,
    spans: list[slice] | None,
    condition_scale: float,
    concept_mask: Tensor | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """Additive attention bias [B, 1, L, L] for OminiControl (spans None) or Conceptrol (one span per sample).

    Plain OminiControl: log c on text/latent -> condition and condition -> text/latent, 0 elsewhere.
    Conceptrol: latent -> condition log c + log Â[row]; condition -> latent log c; concept text ->
    condition log c; other text -> condition blocked; everything else 0.
    """
    length, text_end, latent_end = num_text + num_latent + num_condition, num_text, num_text + num_latent
    log_c = math.log(condition_scale) if condition_scale > 0 else -math.inf
    batch = 1 if spans is None else len(spans)
    bias = torch.zeros(batch, 1, length, length, device=device)
    if spans is None:
        bias[:, :, :latent_end, latent_end:] = log_c
        bias[:, :, latent_end:, :latent_end] = log_c
        return bias
    bias[:, :, text_end:latent_end, latent_end:] = log_c
    bias[:, :, latent_end:, text_end:latent_end] = log_c
    for b, span in enumerate(spans):
        bias[b, :, :text_end, latent_end:] = -math.inf
        bias[b, :, span, latent_end:] = log_c
    if concept_mask is not None:  # [B, N]: log Â of each latent row on its condition columns
        bias[:, 0, text_end:latent_end, latent_end:] += concept_mask.log().to(bias.device)[:, :, None]
    return bias
