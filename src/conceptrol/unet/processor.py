"""Conceptrol for IP-Adapter on U-Nets: wraps diffusers' IP-Adapter processor of one cross-attention layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.image_processor import IPAdapterMaskProcessor
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0
from torch import Tensor, nn

from ..core.errors import ConceptrolError
from ..core.masking import concept_mask, text_attention_probs
from ..core.wrapping import DelegatesScale
from .state import CallState, ConceptrolState


class ConceptrolIPAdapterProcessor(DelegatesScale, IPAdapterAttnProcessor2_0):
    """IP-Adapter attention whose image branch acts only inside the concept mask (arXiv 2503.06568, eq. 5).

    It reuses the wrapped processor's `to_k_ip`, `to_v_ip` and `scale` by reference, so diffusers'
    `set_ip_adapter_scale` and state dicts see the same weights. Outside a Conceptrol call it defers
    to the wrapped processor, so a plain `pipe(...)` is vanilla IP-Adapter.
    """

    def __init__(self, wrapped: nn.Module, state: ConceptrolState, name: str, is_concept_layer: bool) -> None:
        nn.Module.__init__(self)  # the IP-Adapter weights are the wrapped processor's, not new ones
        object.__setattr__(self, "wrapped", wrapped)  # not a submodule: no duplicate state-dict keys
        self.hidden_size = wrapped.hidden_size
        self.cross_attention_dim = wrapped.cross_attention_dim
        self.num_tokens = wrapped.num_tokens
        self.to_k_ip = wrapped.to_k_ip
        self.to_v_ip = wrapped.to_v_ip
        self.state = state
        self.name = name
        self.is_concept_layer = is_concept_layer

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | tuple | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        scale: float = 1.0,
        ip_adapter_masks: Tensor | list | None = None,
    ) -> Tensor:
        call = self.state.call
        if call is None or not isinstance(encoder_hidden_states, tuple):
            return self.wrapped(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                scale=scale, ip_adapter_masks=ip_adapter_masks)
        text_states, ip_states = encoder_hidden_states
        residual = hidden_states
        x, spatial_shape = _tokens_in(attn, hidden_states, temb)
        attention_mask = _attention_bias(attn, attention_mask, text_states)
        query, key, out = _text_attention(attn, x, text_states, attention_mask)
        active = call.active
        weights = self._concept_weights(call, query, key, attention_mask, active)
        if active:
            out = self._add_adapter_branch(out, query, ip_states, weights, ip_adapter_masks)
        return _tokens_out(attn, out, residual, spatial_shape)

    def _concept_weights(self, call: CallState, query: Tensor, key: Tensor, attention_mask: Tensor | None,
                         active: bool) -> Tensor | None:
        """The mask of each sample and concept at this layer, [S, J, N, 1], or None when masking is off."""
        mode = self.state.config.masking
        if mode == "none" or not (self.is_concept_layer or active):
            return None
        rows, num_samples = query.shape[0], call.num_samples
        if rows not in (num_samples, 2 * num_samples):
            raise ConceptrolError(f"the U-Net got {rows} rows for {num_samples} samples; this pipeline is not supported")
        grid = call.grid(query.shape[2])
        if self.is_concept_layer or mode == "local" or call.global_mask is None:
            mask = self._local_mask(call, query, key, attention_mask)  # [S, J, N]
            if self.is_concept_layer:
                self._store(call, mask.unflatten(-1, grid))
            return mask.unsqueeze(-1).to(query.dtype)
        return call.global_weights(grid, query.dtype)

    def _local_mask(self, call: CallState, query: Tensor, key: Tensor, attention_mask: Tensor | None) -> Tensor:
        cond = slice(query.shape[0] - call.num_samples, query.shape[0])  # [uncond | cond]: the last S rows
        bias = attention_mask[cond] if attention_mask is not None else None
        probs = text_attention_probs(query[cond], key[cond], bias)  # [S, H, N, T]
        return concept_mask(probs, call.weights(key.shape[2], query.device))

    def _store(self, call: CallState, mask: Tensor) -> None:
        """The concept layer's mask becomes the global one; the handle records it between steps (no list grows
        inside a compiled U-Net)."""
        call.store_global(mask)

    def _add_adapter_branch(self, out: Tensor, query: Tensor, ip_states: list[Tensor],
                            weights: Tensor | None, user_masks: Tensor | list | None) -> Tensor:
        """out + Σ_i scale_i · M_i ⊙ softmax(Q K_ip,iᵀ/√d) V_ip,i, each reference image its own softmax."""
        user_masks = _user_masks(user_masks, len(ip_states))
        override = self.state.config.scale
        concept = 0
        for states, to_k, to_v, scale, user in zip(ip_states, self.to_k_ip, self.to_v_ip, self.wrapped.scale, user_masks):
            states = states if states.ndim == 4 else states.unsqueeze(1)  # [R, images, tokens, C]
            scales = _per_image(scale if override is None else override, states.shape[1])
            if weights is None and user is None:  # diffusers' own path: one softmax over all images
                if scales[0] != 0:
                    out = out + scales[0] * _attend(query, to_k, to_v, states.flatten(1, 2))
                concept += states.shape[1]
                continue
            for image, image_scale in enumerate(scales):
                if image_scale != 0:
                    branch = _attend(query, to_k, to_v, states[:, image])
                    concept_weight = weights[:, concept] if weights is not None else None  # [S, N, 1]
                    out = _add_masked(out, branch, image_scale, concept_weight, user[:, image] if user is not None else None)
                concept += 1
        if weights is not None and concept != weights.shape[1]:
            raise ConceptrolError(f"got {weights.shape[1]} concepts for {concept} reference images; pass one concept per image")
        return out


def _per_image(scale: float | list, num_images: int) -> list[float]:
    """An adapter's scale for each of its images (diffusers allows one per image)."""
    return list(scale) if isinstance(scale, (list, tuple)) else [scale] * num_images


def _attend(query: Tensor, to_k: nn.Module, to_v: nn.Module, tokens: Tensor) -> Tensor:
    """softmax(Q K_ipᵀ/√d) V_ip for one set of image tokens: [R, N, C]."""
    rows, heads, _, head_dim = query.shape
    key = to_k(tokens).view(rows, -1, heads, head_dim).transpose(1, 2)
    value = to_v(tokens).view(rows, -1, heads, head_dim).transpose(1, 2)
    hidden = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False)
    return hidden.transpose(1, 2).reshape(rows, -1, heads * head_dim).to(query.dtype)


def _add_masked(out: Tensor, branch: Tensor, scale: float, concept: Tensor | None, user: Tensor | None) -> Tensor:
    """out + scale · branch ⊙ mask, the mask being the concept mask [S, N, 1], the user's own, or both."""
    rows, tokens, channels = out.shape
    if user is not None:  # a user's ip_adapter_mask [1, H, W], downsampled as diffusers does
        user = IPAdapterMaskProcessor.downsample(user, rows, tokens, 1)
        user = user.to(dtype=branch.dtype, device=branch.device)  # [R, N, 1]
        if concept is None:
            return out + scale * (branch * user)  # diffusers' own expression
    if concept is None:
        return out + scale * branch
    halves = rows // concept.shape[0]  # 2 with CFG: both halves of a sample share its mask
    weight = concept if user is None else concept * user.view(halves, -1, tokens, 1)
    out = torch.addcmul(out.view(halves, -1, tokens, channels), branch.view(halves, -1, tokens, channels),
                        weight, value=scale)  # one fused kernel, the mask broadcast over the halves
    return out.view(rows, tokens, channels)


def _user_masks(masks: Tensor | list | None, num_adapters: int) -> list[Tensor | None]:
    """Users' own `ip_adapter_masks`, one [1, images, H, W] entry (or None) per adapter."""
    if masks is None:
        return [None] * num_adapters
    if not isinstance(masks, list):
        masks = list(masks.unsqueeze(1))  # legacy [adapters, 1, H, W] tensor, as diffusers accepts it
    if len(masks) != num_adapters:
        raise ConceptrolError(f"ip_adapter_masks has {len(masks)} entries for {num_adapters} IP-Adapters")
    return masks


# The helpers below follow diffusers' IPAdapterAttnProcessor2_0.__call__ (models/attention_processor.py).
def _tokens_in(attn: Attention, hidden_states: Tensor, temb: Tensor | None) -> tuple[Tensor, tuple | None]:
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    spatial_shape = None
    if hidden_states.ndim == 4:
        spatial_shape = hidden_states.shape
        batch, channel, height, width = spatial_shape
        hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)  # [R, N, C]
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states, spatial_shape


def _attention_bias(attn: Attention, attention_mask: Tensor | None, text: Tensor) -> Tensor | None:
    if attention_mask is None:
        return None
    rows = text.shape[0]
    attention_mask = attn.prepare_attention_mask(attention_mask, text.shape[1], rows)
    return attention_mask.view(rows, attn.heads, -1, attention_mask.shape[-1])  # [R, H, 1 or N, T]


def _text_attention(attn: Attention, x: Tensor, text: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Query [R, H, N, d], text key [R, H, T, d] and the text branch A_txt V_txt [R, N, C]."""
    rows = text.shape[0]
    query = attn.to_q(x)
    if attn.norm_cross:
        text = attn.norm_encoder_hidden_states(text)
    key, value = attn.to_k(text), attn.to_v(text)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(rows, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(rows, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(rows, -1, attn.heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(rows, -1, attn.heads * head_dim).to(query.dtype)
    return query, key, out


def _tokens_out(attn: Attention, out: Tensor, residual: Tensor, spatial_shape: tuple | None) -> Tensor:
    out = attn.to_out[1](attn.to_out[0](out))  # linear projection, dropout
    if spatial_shape is not None:
        out = out.transpose(-1, -2).reshape(spatial_shape)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor
