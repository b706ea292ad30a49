"""OminiControl's transformer forward for FLUX: a third token stream (the reference image) next to text and latent.

Written from OminiControl's public description (Tan et al., arXiv 2411.15098; Yuanshi9815/OminiControl):
the condition tokens are the reference image's packed VAE latents. They pass through the same image-stream
modules as the latent tokens, with the subject LoRA on (the latent and text tokens with it off), get the
timestep embedding of t = 0, and their own rotary position ids. Every block attends over
[text | latent | condition] with the additive bias of `attention.py`. Diffusers' own FLUX forward has
no third stream, so this module re-implements the forward (following diffusers' FluxTransformer2DModel,
FluxTransformerBlock and FluxSingleTransformerBlock); with no condition it equals diffusers' output.

Other LoRAs next to the subject LoRA (a style LoRA, say) stay as the user set them, for every token: only the
subject adapter is switched off for text and latent tokens. Since the forward calls the transformer's and the
blocks' submodules rather than their `forward`, it runs their offloading hooks itself (`offload_hooks`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

import torch
from diffusers.models.embeddings import apply_rotary_emb
from torch import Tensor, nn

from ...core.errors import ConceptrolError
from ..blocks import block_names
from ..sequence import JointLayout
from .attention import DEFAULT_MASK_BLOCKS, FluxCall, FluxConceptrolAttention


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


SUBJECT_ADAPTER = "subject"  # the adapter name OminiControl's README and conceptrol.loading give the subject LoRA
OFFLOAD_HOOKS = ("lazy_prefetch_group_offloading", "layer_execution_tracker", "group_offloading")  # diffusers' names,
# outermost first (the order a hooked forward runs their pre_forward in)


def lora_layers(module: nn.Module, adapter: str | None = None) -> list[nn.Module]:
    """peft's LoRA-wrapped layers inside `module` (empty when no adapter is loaded); with `adapter`, those that carry it."""
    layers = [m for m in module.modules() if hasattr(m, "enable_adapters") and hasattr(m, "base_layer")]
    return layers if adapter is None else [m for m in layers if adapter in _adapters_of(m)]


def lora_adapters(module: nn.Module) -> list[str]:
    """The names of the LoRA adapters loaded into `module`, sorted."""
    return sorted({name for layer in lora_layers(module) for name in _adapters_of(layer)})


def _adapters_of(layer: nn.Module) -> set[str]:
    return {name for attr in layer.adapter_layer_names for name in getattr(layer, attr, {})}


def subject_adapter(module: nn.Module) -> str | None:
    """OminiControl's subject LoRA in `module`: the adapter named "subject", else the only one; None without any."""
    adapters = lora_adapters(module)
    if not adapters:
        return None
    if SUBJECT_ADAPTER in adapters or len(adapters) == 1:
        return SUBJECT_ADAPTER if SUBJECT_ADAPTER in adapters else adapters[0]
    raise ConceptrolError(f"this transformer has the LoRA adapters {adapters} and none is named {SUBJECT_ADAPTER!r}, so "
                          "it is unclear which one is OminiControl's; load OminiControl with adapter_name="
                          f"{SUBJECT_ADAPTER!r}, e.g. pipe.load_lora_weights(\"Yuanshi/OminiControl\", "
                          f"weight_name=\"omini/subject_512.safetensors\", adapter_name={SUBJECT_ADAPTER!r})")


@contextmanager
def adapter_off(layers: list[nn.Module], adapter: str | None) -> Iterator[None]:
    """Run with `adapter` taken out of the layers' active adapters (text and latent tokens); other LoRAs stay as set."""
    switched = [(layer, list(layer.active_adapters)) for layer in layers if adapter in layer.active_adapters]
    for layer, active in switched:
        _set_active(layer, [name for name in active if name != adapter])
    try:
        yield
    finally:
        for layer, active in switched:
            _set_active(layer, active)


def _set_active(layer: nn.Module, adapters: list[str]) -> None:
    """peft's `set_adapter`, keeping every parameter's requires_grad as it was (set_adapter marks active ones trainable)."""
    flags = [(p, p.requires_grad) for p in layer.parameters()]
    layer.set_adapter(adapters)
    for p, flag in flags:
        p.requires_grad_(flag)


@contextmanager
def offload_hooks(module: nn.Module) -> Iterator[None]:
    """Run `module`'s offloading hooks around code that calls its submodules instead of its `forward`.

    As diffusers' `apply_forward_hook` does for AutoencoderKL.encode: accelerate's hook (enable_model_cpu_offload
    moves the whole model to the execution device) and diffusers' group-offloading hooks (enable_group_offload
    onloads a group of blocks, or the top-level modules, and offloads them after).
    """
    hooks = [module._hf_hook] if hasattr(module, "_hf_hook") else []
    registry = getattr(module, "_diffusers_hook", None)
    if registry is not None:
        hooks += [hook for name in OFFLOAD_HOOKS if (hook := registry.get_hook(name)) is not None]
    for hook in hooks:
        hook.pre_forward(module)
    try:
        yield
    finally:
        for hook in reversed(hooks):
            hook.post_forward(module, None)


class OminiControlTransformer:
    """Runs a diffusers FluxTransformer2DModel with OminiControl's condition stream; roles fixed by block name.

    `adapter` names the subject LoRA (by default `subject_adapter(transformer)`); it is the one adapter switched off
    for text and latent tokens.
    """

    def __init__(self, transformer: nn.Module, mask_blocks: tuple[str, ...] = DEFAULT_MASK_BLOCKS,
                 adapter: str | None = None) -> None:
        self.transformer = transformer
        adapter = subject_adapter(transformer) if adapter is None else adapter
        blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        # (block, its attention role, subject LoRA off in its own layers): each block switches only its own layers
        self.blocks = [(block, FluxConceptrolAttention(name in mask_blocks), _switch([block], adapter))
                       for name, block in zip(block_names(transformer), blocks)]
        self.num_double = len(transformer.transformer_blocks)
        self._no_read = FluxConceptrolAttention(reads_mask=False)  # every block of a pass that reads no mask
        self._latent_lora_off = _switch([transformer.x_embedder], adapter)
        self._output_lora_off = _switch([transformer.norm_out, transformer.proj_out], adapter)

    @torch.no_grad()
    def __call__(self, latents: Tensor, inputs: StepInputs, condition: ConditionTokens | None, call: FluxCall,
                 condition_scale: float, read_masks: bool = True) -> Tensor:
        """The velocity prediction for the latent tokens [B, N, C_out].

        With `read_masks=False` no block reads Â: every block uses `call`'s current mask (true CFG's negative pass).
        """
        model = self.transformer
        with offload_hooks(model):  # as model(...) would: onload the model (or its top-level modules)
            streams = self._embed(latents, inputs, condition, call, condition_scale)
            for index, (block, attention, lora_off) in enumerate(self.blocks):
                router = attention if read_masks else self._no_read
                with offload_hooks(block):
                    (_double_block if index < self.num_double else _single_block)(block, streams, router, lora_off)
            with self._output_lora_off():
                return model.proj_out(model.norm_out(streams.latent, streams.temb))

    def _embed(self, latents: Tensor, inputs: StepInputs, condition: ConditionTokens | None, call: FluxCall,
               condition_scale: float) -> _Streams:
        """The three token streams entering the first block, with their timestep embeddings and rotary tables."""
        model, dtype = self.transformer, latents.dtype
        with self._latent_lora_off():
            x = model.x_embedder(latents)
        temb = _time_embedding(model, inputs.timestep, inputs, dtype)
        text = model.context_embedder(inputs.text)
        rotary = model.pos_embed(torch.cat((inputs.txt_ids, inputs.img_ids), dim=0))
        cond = cond_temb = cond_rotary = None
        if condition is not None:
            cond = model.x_embedder(condition.tokens.to(dtype))  # LoRA on: condition tokens
            cond_temb = _time_embedding(model, torch.zeros_like(inputs.timestep), inputs, dtype)
            cond_rotary = model.pos_embed(condition.ids)
        return _Streams(text, x, cond, temb, cond_temb, rotary, cond_rotary, call, condition_scale)


def _switch(modules: list[nn.Module], adapter: str | None) -> Callable[[], AbstractContextManager]:
    """A context to enter for text and latent tokens: `adapter` off in the LoRA layers of `modules` that carry it."""
    layers = [layer for module in modules for layer in lora_layers(module, adapter)] if adapter is not None else []
    return partial(adapter_off, layers, adapter)


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


def _double_block(block: nn.Module, s: _Streams, router: FluxConceptrolAttention,
                  lora_off: Callable[[], AbstractContextManager]) -> None:
    """FluxTransformerBlock with a condition stream (diffusers' FluxTransformerBlock.forward, three streams)."""
    attn, text_len, latent_len = block.attn, s.text.shape[1], s.latent.shape[1]
    with lora_off():  # latent and text tokens: subject LoRA off (text modules may carry none at all)
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
    with lora_off():
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


def _single_block(block: nn.Module, s: _Streams, router: FluxConceptrolAttention,
                  lora_off: Callable[[], AbstractContextManager]) -> None:
    """FluxSingleTransformerBlock with a condition stream (diffusers' FluxSingleTransformerBlock.forward)."""
    attn, text_len = block.attn, s.text.shape[1]
    joint = torch.cat((s.text, s.latent), dim=1)
    with lora_off():
        x, gate = block.norm(joint, emb=s.temb)
        mlp = block.act_mlp(block.proj_mlp(x))
        q, k, v = _image_qkv(attn, x)
    cq = ck = cv = None
    if s.cond is not None:
        c, cond_gate = block.norm(s.cond, emb=s.cond_temb)
        cond_mlp = block.act_mlp(block.proj_mlp(c))
        cq, ck, cv = _image_qkv(attn, c)
    out = _joint_attention(s, q, k, v, cq, ck, cv, router)
    with lora_off():
        joint = joint + gate.unsqueeze(1) * block.proj_out(torch.cat((out[:, : joint.shape[1]], mlp), dim=2))
    if joint.dtype == torch.float16:
        joint = joint.clip(-65504, 65504)
    if s.cond is not None:
        cond_in = torch.cat((out[:, joint.shape[1] :], cond_mlp), dim=2)
        s.cond = s.cond + cond_gate.unsqueeze(1) * block.proj_out(cond_in)
    s.text, s.latent = joint[:, :text_len], joint[:, text_len:]
