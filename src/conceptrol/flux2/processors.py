"""Conceptrol's processors for FLUX.2's double- and single-stream blocks (ALGORITHM.md section 6).

Each wraps the processor diffusers put on its block (Flux2AttnProcessor / Flux2ParallelSelfAttnProcessor, or their
KV-cache variants) and runs it as is whenever Conceptrol changes nothing (masking off at strength 1 and the full
window, and outside a handle's call). Otherwise it computes the block's attention as diffusers does with section 6's
bias added to the logits; the concept block also reads every reference's mask from its positive pass.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..core.joint import ReferenceProcessor
from .attention import BlockAttention, attend, double_outputs, double_qkv, single_output, single_qkv


class _Flux2Processor(ReferenceProcessor):
    def _acts(self) -> bool:
        """Whether this call differs from the stock processor's: a bias, or the concept block reading."""
        state = self.state
        call = state.call
        if call is None or call.layout is None:
            return False
        return state.biased() or (self.reads and state.masking and not call.negative)

    def _bias(self, query_device: Any, dtype: Any, kv_cache_mode: str | None) -> Tensor | None:
        state = self.state
        if not state.biased():
            return None
        layout = state.call.layout
        rows = (layout.text, layout.latent) if kv_cache_mode is not None else None  # the KV modes' attending rows
        return state.bias(query_device, dtype, rows)

    def _read(self, joint: BlockAttention, kv_cache_mode: str | None) -> None:
        """At the concept block of a positive pass: every reference's Â from the latent queries and the text keys."""
        state = self.state
        call = state.call
        if not (self.reads and state.masking) or call.negative:
            return
        layout = call.layout
        text = joint.num_text
        latent = slice(text, text + layout.latent.stop - layout.latent.start) if kv_cache_mode == "cached" else layout.latent
        state.read(joint.query[:, latent].transpose(1, 2), joint.key[:, :text].transpose(1, 2))


class Flux2DoubleProcessor(_Flux2Processor):
    """A double-stream block: [text | image] with separate projections, two outputs."""

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, image_rotary_emb: Any = None, kv_cache: Any = None,
                 kv_cache_mode: str | None = None, num_ref_tokens: int = 0) -> Any:
        if not self._acts():
            kv = {} if kv_cache_mode is None else {"kv_cache": kv_cache, "kv_cache_mode": kv_cache_mode,
                                                     "num_ref_tokens": num_ref_tokens}
            return self.wrapped(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **kv)
        joint = double_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        bias = self._bias(joint.query.device, joint.query.dtype, kv_cache_mode)
        output = attend(joint, bias if bias is not None else attention_mask, self, kv_cache, kv_cache_mode,
                        num_ref_tokens)
        self._read(joint, kv_cache_mode)
        return double_outputs(attn, output, joint.num_text)


class Flux2SingleProcessor(_Flux2Processor):
    """A single-stream block: one fused projection for attention and MLP over [text | image]."""

    def __call__(self, attn: Any, hidden_states: Tensor, attention_mask: Tensor | None = None,
                 image_rotary_emb: Any = None, kv_cache: Any = None, kv_cache_mode: str | None = None,
                 num_txt_tokens: int = 0, num_ref_tokens: int = 0) -> Tensor:
        if not self._acts():
            kv = {} if kv_cache_mode is None else {"kv_cache": kv_cache, "kv_cache_mode": kv_cache_mode,
                                                     "num_txt_tokens": num_txt_tokens, "num_ref_tokens": num_ref_tokens}
            return self.wrapped(attn, hidden_states, attention_mask, image_rotary_emb, **kv)
        num_text = self.state.call.layout.text.stop
        joint, mlp = single_qkv(attn, hidden_states, image_rotary_emb, num_text)
        bias = self._bias(joint.query.device, joint.query.dtype, kv_cache_mode)
        output = attend(joint, bias if bias is not None else attention_mask, self, kv_cache, kv_cache_mode,
                        num_ref_tokens)
        self._read(joint, kv_cache_mode)
        return single_output(attn, output, mlp)
