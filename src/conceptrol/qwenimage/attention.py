"""Qwen-Image's joint attention as diffusers computes it (QwenDoubleStreamAttnProcessor2_0 in
transformer_qwenimage.py, the same operations in the same order), with a mask of Conceptrol's choosing, and the latent
queries and text keys a concept read needs.

The stock processor refuses an external attention mask and builds its own from the text mask; Conceptrol's bias
(section 6's table, the text mask's hidden keys included) takes its place. The joint sequence is [text | image], the
image tokens being the latent's, then each reference's (the order of the transformer's `img_shapes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen
from torch import Tensor


@dataclass
class JointAttention:
    """Queries, keys and values of one block [B, L, H, d], after the q/k norms and RoPE, in the order [text | image]."""

    query: Tensor
    key: Tensor
    value: Tensor
    num_text: int


def joint_qkv(attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor, rotary: Any) -> JointAttention:
    """The image and text streams' projections, normed and rotated, joined text first."""
    head_dim = attn.inner_dim // attn.heads
    image = [proj(hidden_states).unflatten(-1, (-1, head_dim)) for proj in (attn.to_q, attn.to_k, attn.to_v)]
    text = [proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
            for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)]
    for stream, norms in ((image, (attn.norm_q, attn.norm_k)), (text, (attn.norm_added_q, attn.norm_added_k))):
        for index, norm in enumerate(norms):
            if norm is not None:
                stream[index] = norm(stream[index])
    if rotary is not None:
        image_freqs, text_freqs = rotary
        image[:2] = [apply_rotary_emb_qwen(x, image_freqs, use_real=False) for x in image[:2]]
        text[:2] = [apply_rotary_emb_qwen(x, text_freqs, use_real=False) for x in text[:2]]
    query, key, value = (torch.cat(pair, dim=1) for pair in zip(text, image))
    return JointAttention(query, key, value, encoder_hidden_states.shape[1])


def stock_mask(encoder_hidden_states_mask: Tensor | None, hidden_states: Tensor) -> Tensor | None:
    """The boolean key mask [B, 1, 1, L] the stock processor builds from the text mask (None without one)."""
    if encoder_hidden_states_mask is None:
        return None
    image_mask = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
    return torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]


def attend(joint: JointAttention, mask: Tensor | None, processor: Any) -> Tensor:
    """The attention output [B, L, H*d] on the processor's backend, `mask` a boolean key mask or an additive bias."""
    output = dispatch_attention_fn(joint.query, joint.key, joint.value, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                   backend=processor._attention_backend, parallel_config=processor._parallel_config)
    return output.flatten(2, 3).to(joint.query.dtype)


def joint_outputs(attn: Any, output: Tensor, num_text: int) -> tuple[Tensor, Tensor]:
    """The image and text parts through their output projections, as the stock processor returns them."""
    text, image = output[:, :num_text, :], output[:, num_text:, :]
    image = attn.to_out[0](image.contiguous())
    if len(attn.to_out) > 1:
        image = attn.to_out[1](image)  # dropout
    return image, attn.to_add_out(text.contiguous())
