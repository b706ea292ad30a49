"""Conceptrol on diffusers' own FLUX forward (ALGORITHM.md section 4): one processor per transformer block.

Each processor wraps the one diffusers put on its block (FluxAttnProcessor, or FluxIPAdapterAttnProcessor
after `pipe.load_ip_adapter`) and is installed with `set_attn_processor`; its role is fixed by block name
at install. Two ways a reference acts:
- "gate" (XLabs IP-Adapter): the double blocks add `scale · IP[n]`; Conceptrol multiplies it by
  M[n] = r[n] / (max r + 1e-6), and by the user's own `ip_adapter_masks` on the latent grid (flux/ip_masks.py),
  which diffusers' FluxIPAdapterAttnProcessor ignores.
- "bias" (Kontext, Redux): the reference tokens are in the joint sequence; every block's attention gets
  section 2's additive bias with them as the condition, log Â mean-normalised.
Attention stays on diffusers' `dispatch_attention_fn` with an additive float mask; explicit probabilities are
computed only for the latent-to-text logits at the blocks that read (or, with the IP-Adapter, compute a local
mask). Outside a handle's call, and whenever Conceptrol changes nothing, the wrapped processor runs as is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from torch import Tensor

from ..core.config import ConceptrolConfig, StepWindow
from ..core.masking import flux_concept_mask, flux_gate_mask, reference_bias, span_weights
from ..core.wrapping import DelegatesBackend, DelegatesScale
from .ip_masks import resize_user_masks
from .sequence import OUTSIDE_WINDOW_SCALE, SequenceLayout

try:  # diffusers' own projection helper (handles fused projections); the plain projections otherwise
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections
except ImportError:  # pragma: no cover - older diffusers
    def _get_qkv_projections(attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None) -> tuple:
        context = [None] * 3
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            context = [attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                       attn.add_v_proj(encoder_hidden_states)]
        return attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states), *context

Mode = Literal["gate", "bias"]



@dataclass
class AdapterCall(StepWindow):
    """One call of a FLUX adapter handle: spans, where the denoising loop is, and the latest mask.

    The handle updates it between transformer calls; processors read only what changes at most a few times a call
    (`active`, `negative`, whether a mask exists) and tensors, never the step number: a compiled transformer is
    specialised on every Python value its processors read, so reading the step would recompile it every step.
    """

    spans: list[list[slice]] | None  # [sample][concept] spans in the T5 tokens (0-based); None = masking off
    num_t5: int | None = None  # Redux: the T5 tokens before the reference tokens in the text stream
    passes: int = 0  # transformer calls in this step: the first is the positive pass, a second the true-CFG negative
    negative: bool = False  # the running transformer call is a true-CFG negative pass: it reads no mask
    layout: SequenceLayout | None = None  # of the running transformer call
    grid: tuple[int, int] | None = None  # (rows, cols) of the latent tokens
    mask: Tensor | None = None  # the latest read: M [B, J, N] (gate) or Â [B, N] (bias)
    concept_read: Tensor | None = None  # the concept block's read in the running step, recorded when it ends
    user_masks: list[Tensor | None] | None = None  # IP-Adapter: the users' ip_adapter_masks, [K, H, W] per adapter
    user_tokens: list[Tensor | None] | None = None  # the same on the latent grid, [K, N] per adapter (`prepare`)
    records: list[Tensor] = field(default_factory=list)  # the concept block's read of every step
    local_masks: dict[str, Tensor] = field(default_factory=dict)  # local masking: each block's M in this step
    _base: dict[tuple, Tensor] = field(default_factory=dict)
    _bias: dict[tuple, Tensor] = field(default_factory=dict)
    _weights: dict[tuple, Tensor] = field(default_factory=dict)

    def end_step(self, step: int) -> None:
        """Between steps: record the concept block's read (outside any compiled graph) and count the next step."""
        if self.concept_read is not None:
            self.records.append(self.concept_read)
            self.concept_read = None
        self.step, self.passes = step + 1, 0

    def weights(self, num_text: int, device: torch.device) -> Tensor:
        """[B, J, T] span-averaging weights over the T5 tokens, built once per call (by `prepare`, outside a
        compiled transformer: reading the spans there would specialise its graph on the concept's position)."""
        key = (num_text, device)
        if key not in self._weights:
            self._weights[key] = span_weights(self.spans, num_text, device)
        return self._weights[key]

    def store(self, mask: Tensor, record: bool) -> None:
        self.mask = mask
        self._bias = {}
        if record:
            self.concept_read = mask.detach()

    def base_bias(self, layout: SequenceLayout, scale: float, conceptrol: bool, device: torch.device) -> Tensor:
        """Section 2's table without the Â term, fp32 [B, 1, L, L]; built once per layout and scale."""
        key = (layout.key, scale, conceptrol, device)
        if key not in self._base:
            spans = [sample[0] for sample in self.spans] if conceptrol else None
            self._base[key] = reference_bias(layout.length, layout.text, layout.latent, layout.reference, spans,
                                             scale, None, device)
        return self._base[key]

    def bias(self, layout: SequenceLayout, scale: float, conceptrol: bool, device: torch.device,
             dtype: torch.dtype) -> Tensor:
        """Section 2's table for this layout, scale and the current Â; built once until one of them changes."""
        key = (layout.key, scale, conceptrol, device, dtype)
        if key not in self._bias:
            bias = self.base_bias(layout, scale, conceptrol, device)
            if conceptrol and self.mask is not None:  # log Â of each latent row on its reference columns
                bias = bias.clone()
                bias[:, 0, layout.latent, layout.reference] += self.mask.log().to(bias.device)[:, :, None]
            self._bias[key] = bias.to(dtype)
        return self._bias[key]


class FluxAdapterState:
    """Owned by one handle; its processors read and write the running call through it."""

    def __init__(self, config: ConceptrolConfig, mode: Mode) -> None:
        self.config, self.mode = config, mode
        self.call: AdapterCall | None = None

    @property
    def masking(self) -> bool:
        call = self.call
        return call is not None and call.spans is not None and self.config.masking != "none"

    def follow_window(self) -> None:
        """Set `call.active` from the step; the handle calls it between transformer calls."""
        self.call.follow(self.config.start, self.config.end)

    def active(self) -> bool:
        return self.call.active

    def prepare(self, device: torch.device) -> None:
        """Before a transformer call: build from the spans what its processors read (the span weights and the
        bias without Â), so that a compiled transformer reads tensors only and is not specialised on the spans."""
        call, layout = self.call, self.call.layout
        if self.masking:
            call.weights(layout.text.stop - layout.text.start, device)
        if call.user_masks is not None and call.user_tokens is None and call.grid is not None:  # once a call
            call.user_tokens = resize_user_masks(call.user_masks, call.grid, device)
        if self.biased(layout):
            call.base_bias(layout, self.reference_scale(), self.masking, device)

    def biased(self, layout: SequenceLayout) -> bool:
        """Whether a transformer call of this layout gets an attention bias: the bias mode, reference tokens in the
        sequence (Redux's negative pass has none), and masking or a strength other than 1."""
        return self.mode == "bias" and layout.has_reference and (self.masking or self.reference_scale() != 1.0)

    def reference_scale(self) -> float:
        """c for the bias mode: the requested strength inside the window, 0.5 outside (section 2)."""
        c = 1.0 if self.config.scale is None else self.config.scale
        return c if self.active() else OUTSIDE_WINDOW_SCALE


@dataclass
class _Attention:
    """A block's joint attention, split as diffusers splits it."""

    query: Tensor  # [B, L, H, d] after the q/k norms and RoPE
    key: Tensor
    image_query: Tensor  # [B, N_img, H, d] after the norms, before RoPE (what the IP-Adapter attends with)
    output: Tensor  # [B, L, H*d]


class FluxBlockProcessor(DelegatesScale, DelegatesBackend, torch.nn.Module):
    """Conceptrol's processor for one block; whether it reads the mask is fixed by its name at install.

    Wrapping an IP-Adapter processor, it shares `to_k_ip`, `to_v_ip` and `scale` with it by reference, so
    state dicts, `pipe.set_ip_adapter_scale` and `unload_ip_adapter` keep working.
    """

    def __init__(self, wrapped: Any, state: FluxAdapterState, name: str, reads: bool, is_concept_block: bool) -> None:
        torch.nn.Module.__init__(self)
        object.__setattr__(self, "wrapped", wrapped)  # not a submodule: no duplicate state-dict keys
        self.state = state
        self.name = name
        self.reads = reads
        self.is_concept_block = is_concept_block
        self.gates = hasattr(wrapped, "to_k_ip")  # the XLabs IP-Adapter's double blocks
        if self.gates:
            self.to_k_ip, self.to_v_ip = wrapped.to_k_ip, wrapped.to_v_ip

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, image_rotary_emb: Any = None,
                 ip_hidden_states: list[Tensor] | None = None, ip_adapter_masks: Any = None) -> Any:
        # `ip_adapter_masks` arrives here as the user passed it; the handle has checked the same object before the
        # first step and resized it to the latent grid once per call (`call.user_tokens`), which the branch reads.
        call = self.state.call
        if call is None or not self._changes_anything(call):
            extra = {"ip_hidden_states": ip_hidden_states} if self.gates else {}
            return self.wrapped(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **extra)
        layout = call.layout
        bias = self._bias(call, layout, hidden_states.device, hidden_states.dtype) if self.state.mode == "bias" else None
        joint = _attend(attn, hidden_states, encoder_hidden_states, image_rotary_emb,
                        bias if bias is not None else attention_mask, self.wrapped)
        mask = self._read(call, joint, layout)
        return self._outputs(attn, joint, encoder_hidden_states, ip_hidden_states, mask, call)

    def _changes_anything(self, call: AdapterCall) -> bool:
        """False when the stock processor gives the same result (then it runs, bit for bit)."""
        state, layout = self.state, call.layout
        if layout is None:
            return False
        if state.mode == "bias":
            return state.biased(layout)
        if state.masking:
            return self.reads or self.gates
        # a user's ip_adapter_masks: the stock processor would ignore them
        return self.gates and (state.config.scale is not None or not state.active() or call.user_tokens is not None)

    def _bias(self, call: AdapterCall, layout: SequenceLayout, device: torch.device, dtype: torch.dtype) -> Tensor | None:
        state = self.state
        if not state.biased(layout):
            return None
        return call.bias(layout, state.reference_scale(), state.masking, device, dtype)

    def _read(self, call: AdapterCall, joint: _Attention, layout: SequenceLayout) -> Tensor | None:
        """Read the concept mask where this block reads; returns the gate mask this block applies (gate mode).

        A true-CFG negative pass reads none: it keeps the mask its step's positive pass left.
        """
        state = self.state
        if not state.masking:
            return None
        if state.mode == "bias":
            if self.reads and not call.negative:
                weights = self._weights(call, layout, joint)[:, 0]
                call.store(flux_concept_mask(*_latent_and_text(joint, layout), weights), record=self.is_concept_block)
            return None
        if state.config.masking == "local":
            return self._local_gate(call, joint, layout)
        if (call.negative or not self.reads) and call.mask is not None:  # the latest read (from the call's first on)
            return call.mask
        mask = flux_gate_mask(*_latent_and_text(joint, layout), self._weights(call, layout, joint))  # [B, J, N]
        if self.reads and not call.negative:
            call.store(mask, record=self.is_concept_block)
        return mask

    def _local_gate(self, call: AdapterCall, joint: _Attention, layout: SequenceLayout) -> Tensor | None:
        """Local masking: each double block its own M; a negative pass reuses the block's mask of the positive pass."""
        if not self.gates:
            return None
        if call.negative and self.name in call.local_masks:
            return call.local_masks[self.name]
        mask = flux_gate_mask(*_latent_and_text(joint, layout), self._weights(call, layout, joint))
        call.local_masks[self.name] = mask
        if self.is_concept_block and not call.negative:
            call.concept_read = mask.detach()
        return mask

    @staticmethod
    def _weights(call: AdapterCall, layout: SequenceLayout, joint: _Attention) -> Tensor:
        return call.weights(layout.text.stop - layout.text.start, joint.query.device)

    def _outputs(self, attn: Any, joint: _Attention, encoder_hidden_states: Tensor | None,
                 ip_hidden_states: list[Tensor] | None, mask: Tensor | None, call: AdapterCall) -> Any:
        """As diffusers' processors return them: the image part (and the text part, and the IP-Adapter's output)."""
        outputs = block_outputs(attn, joint, encoder_hidden_states)
        if not self.gates or encoder_hidden_states is None:
            return outputs
        return (*outputs, self._ip_branch(attn, joint.image_query, ip_hidden_states, mask, call))

    def _ip_branch(self, attn: Any, image_query: Tensor, ip_hidden_states: list[Tensor] | None, mask: Tensor | None,
                   call: AdapterCall) -> Tensor:
        """Σ_i scale_i · U_i ⊙ M_i ⊙ softmax(Q K_ip,iᵀ/√d) V_ip,i (diffusers' FluxIPAdapterAttnProcessor, gated by
        the concept mask M and the user's ip_adapter_masks U, each where given; U on both passes of true CFG)."""
        batch, tokens = image_query.shape[:2]
        output = image_query.new_zeros(batch, tokens, attn.heads * attn.head_dim)
        if ip_hidden_states is None or not self.state.active():
            return output  # outside the window the adapter scale is 0
        override = self.state.config.scale
        users = call.user_tokens or [None] * len(ip_hidden_states)
        for index, (states, scale, to_k, to_v) in enumerate(zip(ip_hidden_states, self.wrapped.scale,
                                                                 self.wrapped.to_k_ip, self.wrapped.to_v_ip)):
            key = to_k(states).view(batch, -1, attn.heads, attn.head_dim)
            value = to_v(states).view(batch, -1, attn.heads, attn.head_dim)
            branch = dispatch_attention_fn(image_query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                           backend=self.wrapped._attention_backend,
                                           parallel_config=self.wrapped._parallel_config)
            branch = branch.reshape(batch, -1, attn.heads * attn.head_dim).to(image_query.dtype)
            weight = scale if override is None else override
            if mask is not None:  # [B, J, N]: this adapter's concept
                branch = branch * mask[:, index, :, None].to(branch.dtype)
            if users[index] is not None:  # [K, N], K = 1 (broadcast over the samples) or B (one per sample)
                branch = branch * users[index][:, :, None].to(branch.dtype)
            output = output + weight * branch
        return output


def block_outputs(attn: Any, joint: _Attention, encoder_hidden_states: Tensor | None) -> Any:
    """diffusers' FluxAttnProcessor after the attention: the single block's output, or a double block's image and text
    parts through their output projections."""
    hidden = joint.output
    if encoder_hidden_states is None:
        return hidden
    text, image = hidden.split_with_sizes([encoder_hidden_states.shape[1], hidden.shape[1] - encoder_hidden_states.shape[1]], dim=1)
    image = attn.to_out[1](attn.to_out[0](image.contiguous()))
    return image, attn.to_add_out(text.contiguous())


def _latent_and_text(joint: _Attention, layout: SequenceLayout) -> tuple[Tensor, Tensor]:
    """The latent queries [B, H, N, d] and the T5 text keys [B, H, T5, d], as they enter the attention."""
    return joint.query[:, layout.latent].transpose(1, 2), joint.key[:, layout.text].transpose(1, 2)


def _attend(attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None, rotary: Any,
            attn_mask: Tensor | None, wrapped: Any) -> _Attention:
    """diffusers' FluxAttnProcessor up to the attention output (transformer_flux.py), with an additive mask."""
    query, key, value, text_query, text_key, text_value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
    query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))  # [B, N, H, d]
    query, key = attn.norm_q(query), attn.norm_k(key)
    image_query = query
    if attn.added_kv_proj_dim is not None and encoder_hidden_states is not None:
        text_query, text_key, text_value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (text_query, text_key, text_value))
        text_query, text_key = attn.norm_added_q(text_query), attn.norm_added_k(text_key)
        query, key, value = (torch.cat(pair, dim=1) for pair in ((text_query, query), (text_key, key), (text_value, value)))
    if rotary is not None:
        query = apply_rotary_emb(query, rotary, sequence_dim=1)
        key = apply_rotary_emb(key, rotary, sequence_dim=1)
    output = dispatch_attention_fn(query, key, value, attn_mask=attn_mask, backend=getattr(wrapped, "_attention_backend", None),
                                   parallel_config=getattr(wrapped, "_parallel_config", None))
    return _Attention(query, key, image_query, output.flatten(2, 3).to(query.dtype))
