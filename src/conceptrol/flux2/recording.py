"""Recording the textual concept map of every FLUX.2 block, double- and single-stream (ALGORITHM.md section 5).

a[n]: the softmax over the text keys only of q_n · k_t / √d (q and k as they enter the block's attention), averaged
over heads and the concept span, for every latent query. Each recording processor computes the block's attention as
diffusers' FLUX.2 processors do, so the image is the stock pipeline's own.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..core.blocks import dual_stream_block_names
from ..core.masking import text_share
from ..core.recording import MapRecorder
from ..core.wrapping import DelegatesBackend
from .attention import BlockAttention, attend, double_outputs, double_qkv, single_output, single_qkv
from .text import MAX_TEXT_TOKENS, locate_concept

LATENT_TIME = 0  # the latent tokens' time coordinate; references have 10, 20, ...


class Flux2MapRecorder(MapRecorder):
    """Records a map at every block of `pipe.transformer` while a call runs; `remove()` restores the processors."""

    def __init__(self, pipe: Any) -> None:
        super().__init__()
        self.blocks = dual_stream_block_names(pipe.transformer)
        self.num_text = 0
        self.latent = slice(0, 0)  # of the query sequence
        self.grid: tuple[int, int] | None = None
        self.install_on_transformer(pipe, lambda stock, block: (
            _RecordingSingle if block.startswith("single_") else _RecordingDouble)(stock, self, block))

    def spans_for(self, prompt: str, concept: Any, max_sequence_length: int = MAX_TEXT_TOKENS) -> list[slice]:
        return [locate_concept(self.pipe, prompt, concept, max_sequence_length)]

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.on_denoiser_call()
        self.num_text = kwargs["encoder_hidden_states"].shape[1]
        ids = kwargs["img_ids"]
        ids = ids[0] if ids.ndim == 3 else ids
        latent = ids[:, 0] == LATENT_TIME
        first = int(latent.int().argmax())
        count = int(latent.sum())
        self.latent = slice(self.num_text + first, self.num_text + first + count)
        rows, cols = ids[latent][:, 1:3].amax(dim=0).tolist()
        self.grid = int(rows) + 1, int(cols) + 1


class _Recording(DelegatesBackend, nn.Module):
    def __init__(self, wrapped: Any, recorder: Flux2MapRecorder, name: str) -> None:
        nn.Module.__init__(self)
        object.__setattr__(self, "wrapped", wrapped)  # not a submodule: no duplicate state-dict keys
        self.recorder, self.name = recorder, name

    def _record(self, joint: BlockAttention) -> None:
        recorder = self.recorder
        query = joint.query[:, recorder.latent].transpose(1, 2)  # [S, H, N, d]
        key = joint.key[:, : recorder.num_text].transpose(1, 2)  # [S, H, T, d]
        concept_map = text_share(query, key, recorder.call.weights(key.shape[2], key.device))  # [S, N]
        recorder.store(self.name, concept_map.unflatten(-1, recorder.grid))


class _RecordingDouble(_Recording):
    """The stock attention of a double-stream block, plus its concept map."""

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, image_rotary_emb: Any = None, kv_cache: Any = None,
                 kv_cache_mode: str | None = None, num_ref_tokens: int = 0) -> Any:
        kv = {"kv_cache": kv_cache, "kv_cache_mode": kv_cache_mode, "num_ref_tokens": num_ref_tokens}
        if not self.recorder.recording:
            kv = kv if kv_cache_mode is not None else {}
            return self.wrapped(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **kv)
        joint = double_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        output = attend(joint, attention_mask, self, **kv)
        self._record(joint)
        return double_outputs(attn, output, joint.num_text)


class _RecordingSingle(_Recording):
    """The stock attention of a single-stream block, plus its concept map."""

    def __call__(self, attn: Any, hidden_states: Tensor, attention_mask: Tensor | None = None,
                 image_rotary_emb: Any = None, kv_cache: Any = None, kv_cache_mode: str | None = None,
                 num_txt_tokens: int = 0, num_ref_tokens: int = 0) -> Tensor:
        if not self.recorder.recording:
            kv = {} if kv_cache_mode is None else {"kv_cache": kv_cache, "kv_cache_mode": kv_cache_mode,
                                                     "num_txt_tokens": num_txt_tokens, "num_ref_tokens": num_ref_tokens}
            return self.wrapped(attn, hidden_states, attention_mask, image_rotary_emb, **kv)
        joint, mlp = single_qkv(attn, hidden_states, image_rotary_emb, self.recorder.num_text)
        output = attend(joint, attention_mask, self, kv_cache, kv_cache_mode, num_ref_tokens)
        self._record(joint)
        return single_output(attn, output, mlp)
