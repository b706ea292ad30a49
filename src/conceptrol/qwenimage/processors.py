"""Conceptrol's processor for Qwen-Image's dual-stream blocks (ALGORITHM.md section 6).

It wraps the processor diffusers put on the block (QwenDoubleStreamAttnProcessor2_0) and runs it as is whenever
Conceptrol changes nothing (masking off at strength 1 over the full window, and outside a handle's call). Otherwise it
computes the block's attention as diffusers does with section 6's bias in place of the stock text mask (the bias
hides the same text keys); the concept block also reads every reference's mask from its positive pass.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..core.joint import ReferenceProcessor
from .attention import JointAttention, attend, joint_outputs, joint_qkv


class QwenEditProcessor(ReferenceProcessor):
    """One dual-stream block: [text | latent | ref_1 ... ref_R] with separate text and image projections."""

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 encoder_hidden_states_mask: Tensor | None = None, attention_mask: Tensor | None = None,
                 image_rotary_emb: Any = None) -> tuple[Tensor, Tensor]:
        if attention_mask is not None or encoder_hidden_states is None or not self._acts():
            return self.wrapped(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, attention_mask,
                                image_rotary_emb)  # the stock attention (and its errors)
        joint = joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        output = attend(joint, self.state.bias(joint.query.device, joint.query.dtype), self)
        self._read(joint)
        return joint_outputs(attn, output, joint.num_text)

    def _acts(self) -> bool:
        """Whether this call differs from the stock processor's: a bias (the concept block reads only under one)."""
        call = self.state.call
        return call is not None and call.layout is not None and self.state.biased()

    def _read(self, joint: JointAttention) -> None:
        """At the concept block of a positive pass: every reference's Â from the latent queries and the text keys."""
        state = self.state
        if not (self.reads and state.masking) or state.call.negative:
            return
        latent, text = state.call.layout.latent, joint.num_text
        state.read(joint.query[:, latent].transpose(1, 2), joint.key[:, :text].transpose(1, 2))  # [B, H, N|T, d]
