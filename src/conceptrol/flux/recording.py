"""Recording the textual concept map of every FLUX.1 block, double- and single-stream (ALGORITHM.md section 5).

a[n] = r[n] of section 4: the softmax over the text keys only of q_n · k_t / √d, q and k as they enter the block's
attention, averaged over heads and the concept span, for every latent query. Each recording processor computes the
block's attention as diffusers' FluxAttnProcessor does (the same operations in the same order, so the image is the
stock pipeline's own) and reads the map from the same queries and keys.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..core.concepts import resolve_concepts
from ..core.errors import ConceptrolError
from ..core.masking import text_share
from ..core.recording import MapRecorder
from ..core.wrapping import DelegatesBackend
from .block_processor import _attend, _latent_and_text, block_outputs
from .blocks import block_names
from .sequence import SequenceLayout, latent_grid

PROCESSOR_SUFFIX = ".attn.processor"
MAX_T5_TOKENS = 512


class FluxMapRecorder(MapRecorder):
    """Records a map at every block of `pipe.transformer` while a call runs; `remove()` restores the processors."""

    def __init__(self, pipe: Any) -> None:
        super().__init__()
        transformer = pipe.transformer
        if any(hasattr(p, "to_k_ip") for p in transformer.attn_processors.values()):
            raise ConceptrolError("the block analysis reads the stock model; unload the IP-Adapter first "
                                  "(pipe.unload_ip_adapter())")
        self.blocks = block_names(transformer)
        self.layout: SequenceLayout | None = None
        self.grid: tuple[int, int] | None = None
        self.install_on_transformer(pipe, lambda stock, block: RecordingBlockProcessor(stock, self, block))

    def spans_for(self, prompt: str, concept: Any, max_sequence_length: int = MAX_T5_TOKENS) -> list[slice]:
        """The concept's span in the T5 tokens (0-based: T5 has no start token)."""
        return resolve_concepts(self.pipe.tokenizer_2, [prompt], [concept], 1, max_length=max_sequence_length).spans[0]

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """The joint sequence of this call: [text | latent (| a reference's tokens, Kontext)]."""
        self.on_denoiser_call()
        text, image = kwargs["encoder_hidden_states"].shape[1], kwargs["hidden_states"].shape[1]
        self.grid = latent_grid(kwargs["img_ids"])
        end = text + self.grid[0] * self.grid[1]
        self.layout = SequenceLayout(text + image, slice(0, text), slice(text, end), slice(end, text + image))


class RecordingBlockProcessor(DelegatesBackend, nn.Module):
    """The stock FLUX.1 attention of one block, plus its concept map of the latent queries."""

    def __init__(self, wrapped: Any, recorder: FluxMapRecorder, name: str) -> None:
        nn.Module.__init__(self)
        object.__setattr__(self, "wrapped", wrapped)  # not a submodule: no duplicate state-dict keys
        self.recorder, self.name = recorder, name

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, image_rotary_emb: Any = None) -> Any:
        recorder = self.recorder
        if not recorder.recording:
            return self.wrapped(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        joint = _attend(attn, hidden_states, encoder_hidden_states, image_rotary_emb, attention_mask, self.wrapped)
        query, key = _latent_and_text(joint, recorder.layout)  # [S, H, N, d], [S, H, T, d]
        concept_map = text_share(query, key, recorder.call.weights(key.shape[2], key.device))  # [S, N]
        recorder.store(self.name, concept_map.unflatten(-1, recorder.grid))
        return block_outputs(attn, joint, encoder_hidden_states)
