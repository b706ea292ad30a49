"""Recording every block's textual concept map during a stock pipeline call (ALGORITHM.md section 5).

A family's recorder installs one recording processor per block (unet/recording.py, flux/recording.py); this base
follows the steps and the passes, holds the concept spans, and keeps each block's map of each step. Recording
changes nothing: the processors return exactly what the stock ones return.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from .masking import span_weights
from .wrapping import ProcessorSwap


@dataclass
class RecordingCall:
    """One pipeline call being recorded: the spans, where the loop is, and the maps so far."""

    spans: list[slice]  # one concept span per sample, in the text tokens the denoiser sees
    step: int = 0
    passes: int = 0  # denoiser calls in this step: only the first (the conditional / positive pass) is recorded
    maps: dict[str, list[Tensor]] = field(default_factory=dict)  # block -> one [S, h, w] map per step
    order: list[str] = field(default_factory=list)  # blocks in the order they first ran: execution order
    _weights: dict[tuple, Tensor] = field(default_factory=dict)

    def weights(self, num_text: int, device: torch.device) -> Tensor:
        """[S, T] with 1/|S_s| on sample s's concept span."""
        key = (num_text, device)
        if key not in self._weights:
            self._weights[key] = span_weights([[span] for span in self.spans], num_text, device)[:, 0]
        return self._weights[key]


class MapRecorder:
    """Owned by one analysis; a family subclass installs the processors in `__init__` and restores them in `remove`."""

    def __init__(self) -> None:
        self.call: RecordingCall | None = None

    def begin(self, spans: list[slice]) -> None:
        self.call = RecordingCall(spans=spans)

    def end(self) -> dict[str, Tensor]:
        """The call's maps: block -> [steps, S, h, w], in execution order; the call's state is released."""
        call, self.call = self.call, None
        return {block: torch.stack(call.maps[block]) for block in call.order} if call is not None else {}

    @property
    def recording(self) -> bool:
        """Whether the running denoiser call is recorded: the first pass of a step of a recorded call."""
        return self.call is not None and self.call.passes == 1

    def store(self, block: str, concept_map: Tensor) -> None:
        """Keep `block`'s map [S, h, w] of the running step (on the CPU, fp32)."""
        call = self.call
        if block not in call.maps:
            call.maps[block] = []
            call.order.append(block)
        call.maps[block].append(concept_map.detach().float().cpu())

    def on_denoiser_call(self) -> None:
        """Count the passes of a step (true CFG runs a second, negative one)."""
        if self.call is not None:
            self.call.passes += 1

    def on_step_end(self, step: int) -> None:
        if self.call is not None:
            self.call.step, self.call.passes = step + 1, 0

    def spans_for(self, prompt: str, concept: Any) -> list[slice]:  # pragma: no cover - each family's own
        raise NotImplementedError

    def install_on_transformer(self, pipe: Any, recording: Callable[[Any, str], Any]) -> None:
        """Every attention processor of `pipe.transformer` replaced by `recording(stock processor, block name)` (the
        stock ones kept for `remove`), and the subclass's `_on_forward(module, args, kwargs)` called before each
        transformer call."""
        self.pipe = pipe
        self._swap = ProcessorSwap(pipe.transformer, lambda key, stock: recording(stock, key.removesuffix(
            ".attn.processor")), self._on_forward)

    def remove(self) -> None:
        """The stock processors back, the hook gone."""
        self._swap.restore()
