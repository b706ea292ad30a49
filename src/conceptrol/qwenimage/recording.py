"""Recording the textual concept map of every Qwen-Image block (ALGORITHM.md section 5).

a[n]: the softmax over the text keys only (those the call's text mask keeps) of q_n · k_t / √d, q and k as they enter
the block's attention, averaged over heads and the concept span, for every latent query. Each recording processor
computes the block's attention as diffusers' QwenDoubleStreamAttnProcessor2_0 does, with the same text mask, so the
image is the stock pipeline's own. The Edit pipelines take their references through the pipeline keywords
(`analyze_blocks(pipe, ..., image=[...])`).

The concept is counted from the end of the valid text keys, which the images never move (they come before the
prompt; text.py), and placed at the first transformer call of the recorded pipeline call, as the handle places it.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..core.blocks import dual_stream_block_names
from ..core.masking import text_share
from ..core.recording import MapRecorder
from ..core.wrapping import DelegatesBackend
from .attention import attend, joint_outputs, joint_qkv, stock_mask
from .text import place_from_end, span_from_end, valid_lengths


class QwenMapRecorder(MapRecorder):
    """Records a map at every block of `pipe.transformer` while a call runs; `remove()` restores the processors."""

    def __init__(self, pipe: Any) -> None:
        super().__init__()
        self.blocks = dual_stream_block_names(pipe.transformer)
        self.num_text = 0
        self.latent = slice(0, 0)  # of the joint sequence
        self.grid: tuple[int, int] | None = None
        self.text_keep: Tensor | None = None
        self.install_on_transformer(pipe, lambda stock, block: _RecordingProcessor(stock, self, block))

    def spans_for(self, prompt: str, concept: Any, max_sequence_length: int | None = None) -> list[slice]:
        """The concept's span from the end of the valid text keys (a negative slice), placed at the first transformer
        call; `max_sequence_length` is taken for the analysis' sake (the Edit pipelines cut no prompt)."""
        return [span_from_end(self.pipe, prompt, concept)]

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.on_denoiser_call()
        self.num_text = kwargs["encoder_hidden_states"].shape[1]
        latent = kwargs["img_shapes"][0][0]  # (frames, rows, cols) of the latent, the first image part
        self.latent = slice(self.num_text, self.num_text + latent[0] * latent[1] * latent[2])
        self.grid = int(latent[1]), int(latent[2])
        mask = kwargs.get("encoder_hidden_states_mask")
        self.text_keep = None if mask is None else mask.bool()
        if self.recording and any(span.start < 0 for span in self.call.spans):
            valid = valid_lengths(kwargs["encoder_hidden_states"], mask)
            self.call.spans = [place_from_end(span, n) for span, n in zip(self.call.spans, valid)]


class _RecordingProcessor(DelegatesBackend, nn.Module):
    """The stock attention of a dual-stream block, plus its concept map."""

    def __init__(self, wrapped: Any, recorder: QwenMapRecorder, name: str) -> None:
        nn.Module.__init__(self)
        object.__setattr__(self, "wrapped", wrapped)  # not a submodule: no duplicate state-dict keys
        self.recorder, self.name = recorder, name

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 encoder_hidden_states_mask: Tensor | None = None, attention_mask: Tensor | None = None,
                 image_rotary_emb: Any = None) -> tuple[Tensor, Tensor]:
        recorder = self.recorder
        if not recorder.recording or attention_mask is not None or encoder_hidden_states is None:
            return self.wrapped(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, attention_mask,
                                image_rotary_emb)
        joint = joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        output = attend(joint, stock_mask(encoder_hidden_states_mask, hidden_states), self)
        query = joint.query[:, recorder.latent].transpose(1, 2)  # [S, H, N, d]
        key = joint.key[:, : joint.num_text].transpose(1, 2)  # [S, H, T, d]
        concept_map = text_share(query, key, recorder.call.weights(key.shape[2], key.device), recorder.text_keep)
        recorder.store(self.name, concept_map.unflatten(-1, recorder.grid))  # [S, h, w]
        return joint_outputs(attn, output, joint.num_text)
