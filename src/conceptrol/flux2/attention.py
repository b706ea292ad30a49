"""FLUX.2's block attention as diffusers computes it (transformer_flux2.py), with an additive bias where Conceptrol
sets one, and the latent queries and text keys a concept read needs.

Three sequences, as the stock processors run them:
- plain (`Flux2Pipeline`, `Flux2KleinPipeline`): one joint attention over [text | latent | ref_1 ... ref_R];
- KV extract (the KV pipeline's first step): [text | refs | latent]; text and latent attend to everything, the
  reference tokens to themselves only, and their keys and values are cached;
- KV cached (its later steps): queries [text | latent], keys [text | cached refs | latent].
The bias is built over [text | refs | latent] for both KV modes and only the text and latent rows are used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux2 import _get_qkv_projections
from torch import Tensor


@dataclass
class BlockAttention:
    """Queries, keys and values of one block [B, L, H, d], after the q/k norms and RoPE, in the block's order."""

    query: Tensor
    key: Tensor
    value: Tensor
    num_text: int


def double_qkv(attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor, rotary: Any) -> BlockAttention:
    """A double-stream block's [text | image] projections (Flux2AttnProcessor)."""
    query, key, value, text_query, text_key, text_value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
    query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
    query, key = attn.norm_q(query), attn.norm_k(key)
    num_text = 0
    if attn.added_kv_proj_dim is not None:
        text_query, text_key, text_value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (text_query, text_key, text_value))
        text_query, text_key = attn.norm_added_q(text_query), attn.norm_added_k(text_key)
        query, key, value = (torch.cat(pair, dim=1) for pair in ((text_query, query), (text_key, key), (text_value, value)))
        num_text = encoder_hidden_states.shape[1]
    if rotary is not None:
        query = apply_rotary_emb(query, rotary, sequence_dim=1)
        key = apply_rotary_emb(key, rotary, sequence_dim=1)
    return BlockAttention(query, key, value, num_text)


def single_qkv(attn: Any, hidden_states: Tensor, rotary: Any, num_text: int) -> tuple[BlockAttention, Tensor]:
    """A single-stream block's fused projection split into attention and MLP inputs (Flux2ParallelSelfAttnProcessor)."""
    projected = attn.to_qkv_mlp_proj(hidden_states)
    qkv_dim = 3 * attn.inner_dim
    mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
    local_qkv = projected.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
    qkv, mlp = torch.split(projected, [local_qkv, projected.shape[-1] - local_qkv], dim=-1)
    query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in qkv.chunk(3, dim=-1))
    query, key = attn.norm_q(query), attn.norm_k(key)
    if rotary is not None:
        query = apply_rotary_emb(query, rotary, sequence_dim=1)
        key = apply_rotary_emb(key, rotary, sequence_dim=1)
    return BlockAttention(query, key, value, num_text), mlp


def attend(joint: BlockAttention, bias: Tensor | None, processor: Any, kv_cache: Any = None,
           kv_cache_mode: str | None = None, num_ref_tokens: int = 0) -> Tensor:
    """The attention output [B, L_q, H*d] in the block's query order, with `bias` added to the logits of the rows that
    attend to everything (all rows; in the KV modes the text and latent rows)."""
    backend, parallel = processor._attention_backend, processor._parallel_config
    query, key, value, text = joint.query, joint.key, joint.value, joint.num_text
    if kv_cache_mode == "extract" and num_ref_tokens > 0:
        end = text + num_ref_tokens
        if kv_cache is not None:
            kv_cache.store(key[:, text:end].clone(), value[:, text:end].clone())
        rows = torch.cat([query[:, :text], query[:, end:]], dim=1)
        both = dispatch_attention_fn(rows, key, value, attn_mask=bias, backend=backend)
        refs = dispatch_attention_fn(query[:, text:end], key[:, text:end], value[:, text:end], backend=backend)
        output = torch.cat([both[:, :text], refs, both[:, text:]], dim=1)
    elif kv_cache_mode == "cached" and kv_cache is not None:
        key_refs, value_refs = kv_cache.get()
        key = torch.cat([key[:, :text], key_refs, key[:, text:]], dim=1)
        value = torch.cat([value[:, :text], value_refs, value[:, text:]], dim=1)
        output = dispatch_attention_fn(query, key, value, attn_mask=bias, backend=backend)
    else:
        output = dispatch_attention_fn(query, key, value, attn_mask=bias, backend=backend, parallel_config=parallel)
    return output.flatten(2, 3).to(query.dtype)


def double_outputs(attn: Any, output: Tensor, num_text: int) -> tuple[Tensor, Tensor]:
    """A double block's image and text parts through their output projections (as Flux2AttnProcessor returns them)."""
    text, image = output.split_with_sizes([num_text, output.shape[1] - num_text], dim=1)
    image = attn.to_out[1](attn.to_out[0](image))
    return image, attn.to_add_out(text)


def single_output(attn: Any, output: Tensor, mlp: Tensor) -> Tensor:
    """A single block's attention and MLP halves through the shared output projection."""
    return attn.to_out(torch.cat([output, attn.mlp_act_fn(mlp)], dim=-1))
