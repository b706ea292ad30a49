"""Per-call state shared by the U-Net processors of one handle (no module-level state)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..core.config import ConceptrolConfig, StepWindow
from ..core.masking import layer_grid, resize_mask, span_weights
from ..core.masks import ConceptMasks


@dataclass
class CallState(StepWindow):
    """What one pipeline call needs: spans, the step, and the stored global mask."""

    spans: list[list[slice]]  # [sample][concept] token span in the text context
    labels: list[list[str]]  # [sample][concept] for display
    latent_hw: tuple[int, int] | None = None  # set from the U-Net input on every evaluation
    global_mask: Tensor | None = None  # [S, J, h, w] from the concept layer
    _resized: dict[tuple, Tensor] = field(default_factory=dict)
    _weights: dict[tuple[int, torch.device], Tensor] = field(default_factory=dict)
    records: list[Tensor] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return len(self.spans)

    @property
    def num_concepts(self) -> int:
        return len(self.spans[0])

    def weights(self, num_tokens: int, device: torch.device) -> Tensor:
        """Span-averaging weights [S, J, T], checked against the text length and built once per call and device.

        The handle builds them before each U-Net evaluation, so a compiled U-Net reads a tensor and never the
        spans: reading them would specialise its graph on the concept's position.
        """
        key = (num_tokens, device)
        if key not in self._weights:
            self._weights[key] = span_weights(self.spans, num_tokens, device)
        return self._weights[key]

    def store_global(self, mask: Tensor) -> None:
        """The concept layer's mask [S, J, h, w] becomes the one every other layer uses."""
        self.global_mask = mask
        self._resized = {}

    def set_latent_size(self, latent_hw: tuple[int, int]) -> None:
        self.latent_hw = latent_hw

    def grid(self, num_tokens: int) -> tuple[int, int]:
        """The (h, w) grid of a layer with `num_tokens` positions, for this call's latent size."""
        return layer_grid(self.latent_hw, num_tokens)  # plain arithmetic: no cache a compiled U-Net would guard on

    def global_weights(self, grid: tuple[int, int], dtype: torch.dtype) -> Tensor:
        """The stored mask resized to a layer's grid (nearest neighbour), as weights [S, J, h*w, 1].

        Built once per grid and dtype until the concept layer stores the next mask.
        """
        key = (grid, dtype)
        if key not in self._resized:
            self._resized[key] = resize_mask(self.global_mask.to(dtype), grid).unsqueeze(-1)
        return self._resized[key]


class ConceptrolState:
    """Owned by one handle; its processors read and write the current call through it."""

    def __init__(self, config: ConceptrolConfig) -> None:
        self.config = config
        self.call: CallState | None = None
        self.last_masks: ConceptMasks | None = None

    def begin(self, spans: list[list[slice]], labels: list[list[str]], total_steps: int) -> None:
        self.call = CallState(spans=spans, labels=labels, total_steps=total_steps)
        self.last_masks = None

    def end(self, completed: bool = True) -> None:
        """Release the call's tensors, keeping the recorded masks on the CPU (none from a call that failed)."""
        call, self.call = self.call, None
        if completed and call is not None and call.records:
            self.last_masks = ConceptMasks(
                masks=torch.stack([r.float().cpu() for r in call.records]),
                concepts=call.labels,
                layer=self.config.concept_layer,
            )

    def follow_window(self) -> None:
        """Set `call.active` from the step; the handle calls it between U-Net calls."""
        self.call.follow(self.config.start, self.config.end)
