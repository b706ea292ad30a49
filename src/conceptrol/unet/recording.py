"""Recording the textual concept map of every cross-attention layer of a U-Net (ALGORITHM.md section 5).

a[n] = mean over heads and t in S of A_txt[cond, h, n, t]: section 1's local mask before its max-normalisation,
read from the conditional rows of the CFG batch. Each recording processor runs the stock processor for the output
(so the image is the stock pipeline's own) and recomputes only the conditional rows' queries and text keys.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..core.concepts import resolve_concepts
from ..core.errors import ConceptrolError
from ..core.masking import layer_grid, text_attention_probs, text_share
from ..core.recording import MapRecorder
from ..core.wrapping import ProcessorSwap
from .processor import _attention_bias, _tokens_in

PROCESSOR_SUFFIX = ".processor"


class UNetMapRecorder(MapRecorder):
    """Records a map at every `*.attn2` of `pipe.unet` while a call runs; `remove()` restores the processors."""

    def __init__(self, pipe: Any) -> None:
        super().__init__()
        self.pipe = pipe
        unet = pipe.unet
        if any(hasattr(p, "to_k_ip") for p in unet.attn_processors.values()):
            raise ConceptrolError("the block analysis reads the stock model; unload the IP-Adapter first "
                                  "(pipe.unload_ip_adapter())")
        self.latent_hw: tuple[int, int] | None = None
        self._swap = ProcessorSwap(unet, lambda key, stock: RecordingProcessor(stock, self, key.removesuffix(
            PROCESSOR_SUFFIX)) if key.endswith("attn2" + PROCESSOR_SUFFIX) else stock, self._on_forward)

    def spans_for(self, prompt: str, concept: Any) -> list[slice]:
        """The concept's span in the CLIP tokens (positions count the start token)."""
        tokenizer = getattr(self.pipe, "tokenizer", None) or self.pipe.tokenizer_2
        return resolve_concepts(tokenizer, [prompt], [concept], 1).spans[0]

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        self.latent_hw = tuple(sample.shape[-2:])
        self.on_denoiser_call()


class RecordingProcessor(nn.Module):
    """The stock cross-attention processor of one layer, plus its concept map of the conditional rows."""

    def __init__(self, wrapped: Any, recorder: UNetMapRecorder, name: str) -> None:
        super().__init__()
        object.__setattr__(self, "wrapped", wrapped)  # not a submodule: no duplicate state-dict keys
        self.recorder, self.name = recorder, name

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Any = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args: Any, **kwargs: Any) -> Tensor:
        if self.recorder.recording and encoder_hidden_states is not None:
            text = encoder_hidden_states[0] if isinstance(encoder_hidden_states, tuple) else encoder_hidden_states
            self._record(attn, hidden_states, text, attention_mask, temb)
        return self.wrapped(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

    def _record(self, attn: Any, hidden_states: Tensor, text: Tensor, attention_mask: Tensor | None,
                temb: Tensor | None) -> None:
        """a[n] of the conditional rows: the last S rows under CFG ([uncond | cond]), every row without it."""
        call = self.recorder.call
        samples = len(call.spans)
        cond = slice(text.shape[0] - samples, text.shape[0])
        x, _ = _tokens_in(attn, hidden_states[cond], temb[cond] if temb is not None else None)
        context = attn.norm_encoder_hidden_states(text[cond]) if attn.norm_cross else text[cond]
        query, key = attn.to_q(x), attn.to_k(context)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(samples, -1, attn.heads, head_dim).transpose(1, 2)  # [S, H, N, d]
        key = key.view(samples, -1, attn.heads, head_dim).transpose(1, 2)  # [S, H, T, d]
        weights = call.weights(key.shape[2], key.device)  # [S, T]
        bias = _attention_bias(attn, attention_mask, text)
        if bias is None:
            concept_map = text_share(query, key, weights)  # [S, N], a few heads at a time
        else:
            probs = text_attention_probs(query, key, bias[cond])  # [S, H, N, T]
            concept_map = (probs * weights[:, None, None]).sum(-1).mean(1)
        grid = layer_grid(self.recorder.latent_hw, query.shape[2])
        self.recorder.store(self.name, concept_map.unflatten(-1, grid))  # [S, h, w]
