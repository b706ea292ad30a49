"""The tensor math of Conceptrol (arXiv 2503.06568), as pure functions with no diffusers imports."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConceptrolError

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
    """Averaging weights over each concept span: [S, J, T] with 1/|S_j| inside span j of sample s.

    A span reaching past the T tokens is an error (slicing would silently cut it short).
    """
    weights = torch.zeros(len(spans), len(spans[0]), num_tokens, device=device)
    for s, sample_spans in enumerate(spans):
        for j, span in enumerate(sample_spans):
            if span.stop > num_tokens:
                raise ConceptrolError(f"concept span {span.start}..{span.stop} is past the {num_tokens} text tokens "
                                 "the model receives")
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


# FLUX (ALGORITHM.md sections 2 and 4): the textual concept mask, and the bias that confines a reference
# (OminiControl's condition, Kontext's or Redux's reference tokens) to it.


def text_share(latent_query: Tensor, text_key: Tensor, weights: Tensor, text_keep: Tensor | None = None) -> Tensor:
    """r[n]: each image token's attention on the concept span, as a share of its attention on the text tokens (FLUX's
    r of sections 2, 4 and 6; with all T text keys of a U-Net layer, section 5's a[n]).

    Softmax over the text keys only (those `text_keep` [B, T] keeps, when given: a model's own text mask); dividing
    P[h, n, t] by its sum over the text columns cancels the joint softmax's normaliser, so only the latent-to-text
    logits are needed.
    """
    # latent_query [B, H, N, d], text_key [B, H, T, d] (after the q/k norms and RoPE),
    # weights [B, T] -> r [B, N], or weights [B, J, T] (J concepts) -> r [B, J, N]
    heads = latent_query.shape[1]
    per_concept = weights if weights.ndim == 3 else weights[:, None]
    hidden = None if text_keep is None else torch.zeros(text_keep.shape, device=text_key.device).masked_fill(
        ~text_keep.to(text_key.device), -math.inf)[:, None, None]  # [B, 1, 1, T]
    r = latent_query.new_zeros(latent_query.shape[0], per_concept.shape[1], latent_query.shape[2], dtype=torch.float32)
    for first in range(0, heads, HEADS_PER_CHUNK):  # a few heads at a time: no [B, H, N, T] tensor at once
        chunk = slice(first, first + HEADS_PER_CHUNK)
        text_probs = text_attention_probs(latent_query[:, chunk], text_key[:, chunk], hidden)  # rows sum to 1 over text
        r += torch.einsum("bhnt,bjt->bjn", text_probs, per_concept.float())
    r = r / heads
    return r if weights.ndim == 3 else r[:, 0]


def flux_concept_mask(latent_query: Tensor, text_key: Tensor, weights: Tensor) -> Tensor:
    """Textual concept mask Â of FLUX (sections 2 and 4 (b)): r normalised to mean 1 over the latent tokens."""
    r = text_share(latent_query, text_key, weights)
    return r / r.mean(dim=-1, keepdim=True)


def flux_gate_mask(latent_query: Tensor, text_key: Tensor, weights: Tensor) -> Tensor:
    """The mask M that gates a branch output (section 4 (a), the U-Net convention): r / (max r + 1e-6), in [0, 1]."""
    return normalize_mask(text_share(latent_query, text_key, weights))


def reference_bias(
    length: int,
    text: slice,
    latent: slice,
    reference: slice,
    spans: list[slice] | None,
    scale: float,
    concept_mask: Tensor | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """Additive attention bias [B, 1, L, L] confining reference tokens (section 2's table; section 4 (b)).

    `text` are the prompt's text rows (T5), `latent` the image being made, `reference` the reference tokens,
    in any order along the sequence; spans are 0-based positions inside `text`, one per sample.
    Plain (spans None): log c on text-or-latent -> reference and reference -> text-or-latent, 0 elsewhere.
    Conceptrol: latent -> reference log c + log Â[row]; reference -> latent log c; concept text -> reference
    log c; other text -> reference blocked; everything else 0.
    """
    log_c = math.log(scale) if scale > 0 else -math.inf
    batch = 1 if spans is None else len(spans)
    bias = torch.zeros(batch, 1, length, length, device=device)
    if spans is None:
        for rows in (text, latent):
            bias[:, :, rows, reference] = log_c
            bias[:, :, reference, rows] = log_c
        return bias
    bias[:, :, latent, reference] = log_c
    bias[:, :, reference, latent] = log_c
    for b, span in enumerate(spans):
        bias[b, :, text, reference] = -math.inf
        bias[b, :, text.start + span.start : text.start + span.stop, reference] = log_c
    if concept_mask is not None:  # [B, N]: log Â of each latent row on its reference columns
        bias[:, 0, latent, reference] += concept_mask.log().to(bias.device)[:, :, None]
    return bias


def flux_condition_bias(
    num_text: int,
    num_latent: int,
    num_condition: int,
    spans: list[slice] | None,
    condition_scale: float,
    concept_mask: Tensor | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """`reference_bias` for OminiControl's sequence [text T | latent N | condition N_c] (section 2)."""
    latent_end = num_text + num_latent
    return reference_bias(latent_end + num_condition, slice(0, num_text), slice(num_text, latent_end),
                          slice(latent_end, latent_end + num_condition), spans, condition_scale, concept_mask, device)


# Section 6: several references in one joint sequence, each confined to its own concept.


def references_bias(length: int, text: slice, latent: slice, references: list[slice],
                    spans: list[list[slice | None]] | None, scale: float, masks: Tensor | None = None,
                    text_keep: Tensor | None = None, device: torch.device | None = None) -> Tensor:
    """Additive attention bias [B, 1, L, L] of section 6's table, every reference its own concept and mask.

    `spans` [sample][reference] are positions inside `text`; None for a reference leaves its rows and columns as the
    stock model has them. Conceptrol: latent -> ref_i log c + log Â_i[row], ref_i -> latent log c, concept-i text ->
    ref_i log c, other text -> ref_i blocked. Plain (spans None): log c on text-or-latent -> every reference and back.
    `text_keep` [B, T]: the model's own text mask; hidden text keys are blocked for every row, as the stock model does.
    """
    log_c = math.log(scale) if scale > 0 else -math.inf
    batch = max(1 if spans is None else len(spans), 1 if text_keep is None else text_keep.shape[0])
    bias = torch.zeros(batch, 1, length, length, device=device)
    for i, reference in enumerate(references):
        if spans is None:
            for rows in (text, latent):
                bias[:, :, rows, reference] = log_c
                bias[:, :, reference, rows] = log_c
            continue
        for b, sample in enumerate(spans):
            span = sample[i]
            if span is None:
                continue
            bias[b, :, latent, reference] = log_c
            bias[b, :, reference, latent] = log_c
            bias[b, :, text, reference] = -math.inf
            # the span's rows within this text: a shorter one (a negative prompt's) holds what of the span it reaches
            concept_rows = slice(text.start + span.start, min(text.start + span.stop, text.stop))
            bias[b, :, concept_rows, reference] = log_c
            if masks is not None:  # [B, R, N]: log Â_i of each latent row on reference i's columns
                bias[b, 0, latent, reference] += masks[b, i].log().to(bias.device)[:, None]
    if text_keep is not None:
        hidden = ~text_keep.to(bias.device, torch.bool)  # [B, T]
        bias[:, 0, :, text] = bias[:, 0, :, text].masked_fill(hidden[:, None, :], -math.inf)
    return bias
