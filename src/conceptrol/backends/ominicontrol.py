"""OminiControl's transformer forward for FLUX: a third token stream (the reference image) next to text and latent.

Written from OminiControl's public description (Tan et al., arXiv 2411.15098; Yuanshi9815/OminiControl):
the condition tokens are the reference image's packed VAE latents. They pass through the same image-stream
modules as the latent tokens, with the subject LoRA on (the latent and text tokens with it off), get the
timestep embedding of t = 0, and their own rotary position ids. Every block attends over
[text | latent | condition] with the additive bias of `processors.flux`. Diffusers' own FLUX forward has
no third stream, so this module re-implements the forward (following diffusers' FluxTransformer2DModel,
FluxTransformerBlock and FluxSingleTransformerBlock); with no condition it equals diffusers' output.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from diffusers.models.embeddings import apply_rotary_emb
from torch import Tensor, nn

from ..processors.flux import DEFAULT_MASK_BLOCKS, FluxCall, FluxConceptrolAttention, JointLayout


@dataclass
class ConditionTokens:
    """The reference image as OminiControl condition tokens."""

    tokens: Tensor  # [B, N_c, C_in] packed VAE latents
    ids: Tensor  # [N_c, 3] position ids (0, row, col + W/16)


@dataclass
class StepInputs:
    """What one transformer evaluation needs besides the latent tokens (FluxPipeline's own tensors)."""

    text: Tensor  # [B, T, 4096] T5 hidden states
    pooled: Tensor  # [B, 768] CLIP pooled projection
    timestep: Tensor  # [B], in [0, 1]
    img_ids: Tensor  # [N, 3]
    txt_ids: Tensor  # [T, 3]
    guidance: Tensor | None = None  # [B] for guidance-distilled models (FLUX.1-dev)


def lora_layers(module: nn.Module) -> list[nn.Module]:
    """peft's LoRA-wrapped layers inside `module` (empty when no adapter is loaded)."""
    return [m for m in module.modules() if hasattr(m, "enable_adapters") and hasattr(m, "base_layer")]


@contextmanager
def lora_off(layers: list[nn.Module]) -> Iterator[None]:
    """Run with the given LoRA layers switched off (text and latent tokens), restoring their state after."""
    previous = [layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, was_disabled in zip(layers, previous):
            layer.enable_adapters(not was_disabled)


def block_names(transformer: nn.Module) -> list[str]:
    """The names of a FLUX transformer's blocks in running order (double-stream, then single-stream)."""
    return [f"transformer_blocks.{i}" for i in range(len(transformer.transformer_blocks))] + [
        f"single_transformer_blocks.{i}" for i in range(len(transformer.single_transformer_blocks))]


class OminiControlTransformer:
    """Runs a diffusers FluxTransformer2DModel with OminiControl's condition stream; roles fixed by block name."""

    def __init__(self, transformer: nn.Module, mask_blocks: tuple[str, ...] = DEFAULT_MASK_BLOCKS) -> None:
        self.transformer = transformer
        blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        # (block, its attention role, its own LoRA layers): each block switches only its own LoRA off and on
        self.blocks = [(block, FluxConceptrolAttention(name in mask_blocks), lora_layers(block))
                       for name, block in zip(block_names(transformer), blocks)]
        self.num_double = len(transformer.transformer_blocks)
        self._no_read = FluxConceptrolAttention(reads_mask=False)  # every block of a pass that reads no mask
        self._lora = {name: lora_layers(getattr(transformer, name)) for name in ("x_embedder", "norm_out", "proj_out")}

    @torch.no_grad()
    def __call__(self, latents: Tensor, inputs: StepInputs, condition: ConditionTokens | None, call: FluxCall,
                 condition_scale: float, read_masks: bool = True) -> Tensor:
        """The velocity prediction for the latent tokens [B, N, C_out].

        With `read_masks=False` no block reads Â: every block uses `call`'s current mask (true CFG's negative pass).
        """
        model = self.transformer
        dtype = latents.dtype
        with lora_off(self._lora["x_embedder"]):
            x = model.x_embedder(latents)
        temb = _time_embedding(model, inputs.timestep, inputs, dtype)
        text = model.context_embedder(inputs.text)
        rotary = model.pos_embed(torch.cat((inputs.txt_ids, inputs.img_ids), dim=0))
        cond = cond_temb = cond_rotary = None
        if condition is not None:
            cond = model.x_embedder(condition.tokens.to(dtype))  # LoRA on: condition tokens
            cond_temb = _time_embedding(model, torch.zeros_like(inputs.timestep), inputs, dtype)
            cond_rotary = model.pos_embed(condition.ids)
        streams = _Streams(text, x, cond, temb, cond_temb, rotary, cond_rotary, call, condition_scale)
        for index, (block, attention, lora) in enumerate(self.blocks):
            router = attention if read_masks else self._no_read
            (_double_block if index < self.num_double else _single_block)(block, streams, router, lora)
        with lora_off(self._lora["norm_out"] + self._lora["proj_out"]):
            return model.proj_out(model.norm_out(streams.latent, temb))


def _time_embedding(model: nn.Module, timestep: Tensor, inputs: StepInputs, dtype: torch.dtype) -> Tensor:
    timestep = timestep.to(dtype) * 1000
    if inputs.guidance is None:
        return model.time_text_embed(timestep, inputs.pooled)
    return model.time_text_embed(timestep, inputs.guidance.to(dtype) * 1000, inputs.pooled)


@dataclass
class _Streams:
    text: Tensor
    latent: Tensor
    cond: Tensor | None
    temb: Tensor
    cond_temb: Tensor | None
    rotary: tuple[Tensor, Tensor]
    cond_rotary: tuple[Tensor, Tensor] | None
    call: FluxCall
    condition_scale: float


def _heads(x: Tensor, head_dim: int) -> Tensor:
    return x.unflatten(-1, (-1, head_dim))  # [B, L, H, d]


def _joint_attention(s: _Streams, q: Tensor, k: Tensor, v: Tensor, cq, ck, cv,
                     router: FluxConceptrolAttention) -> Tensor:
    """Attention over [text | latent | (condition)], q/k/v as [B, L, H, d]; returns [B, L_all, H*d]."""
    q, k = apply_rotary_emb(q, s.rotary, sequence_dim=1), apply_rotary_emb(k, s.rotary, sequence_dim=1)
    if cq is None:
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).flatten(2, 3).to(q.dtype)
    cq, ck = apply_rotary_emb(cq, s.cond_rotary, sequence_dim=1), apply_rotary_emb(ck, s.cond_rotary, sequence_dim=1)
    q, k, v = (torch.cat(parts, dim=1).transpose(1, 2) for parts in ((q, cq), (k, ck), (v, cv)))  # [B, H, L, d]
    layout = JointLayout(s.text.shape[1], s.latent.shape[1], s.cond.shape[1])
    out = router.attend(s.call, q, k, v, layout, s.condition_scale)
    return out.transpose(1, 2).flatten(2, 3).to(q.dtype)


def _image_qkv(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v = (_heads(proj(x), attn.head_dim) for proj in (attn.to_q, attn.to_k, attn.to_v))
    return attn.norm_q(q), attn.norm_k(k), v


def _double_block(block: nn.Module, s: _Streams, router: FluxConceptrolAttention, lora: list[nn.Module]) -> None:
    """FluxTransformerBlock with a condition stream (diffusers' FluxTransformerBlock.forward, three streams)."""
    attn, text_len, latent_len = block.attn, s.text.shape[1], s.latent.shape[1]
    with lora_off(lora):  # latent and text tokens: LoRA off (text modules may carry none at all)
        x, gate, shift_mlp, scale_mlp, gate_mlp = block.norm1(s.latent, emb=s.temb)
        q, k, v = _image_qkv(attn, x)
        t, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(s.text, emb=s.temb)
        tq, tk, tv = (_heads(proj(t), attn.head_dim) for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        tq, tk = attn.norm_added_q(tq), attn.norm_added_k(tk)
    cq = ck = cv = None
    if s.cond is not None:
        c, cond_gate, cond_shift_mlp, cond_scale_mlp, cond_gate_mlp = block.norm1(s.cond, emb=s.cond_temb)
        cq, ck, cv = _image_qkv(attn, c)
    out = _joint_attention(s, torch.cat((tq, q), 1), torch.cat((tk, k), 1), torch.cat((tv, v), 1), cq, ck, cv, router)
    text_out, latent_out = out[:, :text_len], out[:, text_len : text_len + latent_len]
    with lora_off(lora):
        latent_out = attn.to_out[1](attn.to_out[0](latent_out.contiguous()))
        s.latent = s.latent + gate.unsqueeze(1) * latent_out
        normed = block.norm2(s.latent) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        s.latent = s.latent + gate_mlp.unsqueeze(1) * block.ff(normed)
        text_out = attn.to_add_out(text_out.contiguous())
        s.text = s.text + c_gate.unsqueeze(1) * text_out
        normed = block.norm2_context(s.text) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        s.text = s.text + c_gate_mlp.unsqueeze(1) * block.ff_context(normed)
    if s.cond is not None:
        cond_out = attn.to_out[1](attn.to_out[0](out[:, text_len + latent_len :].contiguous()))
        s.cond = s.cond + cond_gate.unsqueeze(1) * cond_out
        normed = block.norm2(s.cond) * (1 + cond_scale_mlp[:, None]) + cond_shift_mlp[:, None]
        s.cond = s.cond + cond_gate_mlp.unsqueeze(1) * block.ff(normed)
    if s.text.dtype == torch.float16:
        s.text = s.text.clip(-65504, 65504)


def _single_block(block: nn.Module, s: _Streams, router: FluxConceptrolAttention, lora: list[nn.Module]) -> None:
    """FluxSingleTransformerBlock with a condition stream (diffusers' FluxSingleTransformerBlock.forward)."""
    attn, text_len = block.attn, s.text.shape[1]
    joint = torch.cat((s.text, s.latent), dim=1)
    with lora_off(lora):
        x, gate = block.norm(joint, emb=s.temb)
        mlp = block.act_mlp(block.proj_mlp(x))
        q, k, v = _image_qkv(attn, x)
    cq = ck = cv = None
    if s.cond is not None:
        c, cond_gate = block.norm(s.cond, emb=s.cond_temb)
        cond_mlp = block.act_mlp(block.proj_mlp(c))
        cq, ck, cv = _image_qkv(attn, c)
    out = _joint_attention(s, q, k, v, cq, ck, cv, router)
    with lora_off(lora):
        joint = joint + gate.unsqueeze(1) * block.proj_out(torch.cat((out[:, : joint.shape[1]], mlp), dim=2))
    if joint.dtype == torch.float16:
        joint = joint.clip(-65504, 65504)
    if s.cond is not None:
        cond_in = torch.cat((out[:, joint.shape[1] :], cond_mlp), dim=2)
        s.cond = s.cond + cond_gate.unsqueeze(1) * block.proj_out(cond_in)
    s.text, s.latent = joint[:, :text_len], joint[:, text_len:]
