"""Conceptrol settings: a frozen, self-validating dataclass and per-architecture presets."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

from .errors import ConceptrolError

MaskingMode = Literal["global", "local", "none"]

# The concept-specific cross-attention layer of each U-Net family (arXiv 2503.06568, section 4).
CONCEPT_LAYERS: dict[str, str] = {
    "sd15": "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
    "sdxl": "up_blocks.0.attentions.1.transformer_blocks.3.attn2",
    "flux": "transformer_blocks.18",  # the last double-stream block of FLUX (section 2)
    # Provisional (ALGORITHM.md section 6): no published analysis exists for these; `conceptrol analyze` on real
    # weights decides (README, "Find the concept block of another model").
    "flux2": "transformer_blocks.7",  # FLUX.2's last double-stream block, as block 18 is on FLUX.1
    "qwenimage": "transformer_blocks.19",  # FLUX.1's relative depth: 19 of 57 blocks
}
PROVISIONAL_LAYERS = frozenset({"flux2", "qwenimage"})


@dataclass(frozen=True)
class ConceptrolConfig:
    """How Conceptrol masks the adapter. Defaults are the reference algorithm's own."""

    # "global": one concept layer's mask drives every layer (the paper's default);
    # "local": every layer uses its own mask; "none": plain adapter (masks still located, not applied).
    masking: MaskingMode = "global"
    # Attention layer whose text attention gives the concept mask; None = preset of the architecture.
    concept_layer: str | None = None
    # Architecture preset ("sd15", "sdxl"); None = detected from the U-Net.
    architecture: str | None = None
    # The adapter acts at step k only while start <= k/T and (k+1)/T <= end (T = steps run).
    start: float = 0.0
    end: float = 1.0
    # Adapter scale; None leaves it to diffusers (`pipe.set_ip_adapter_scale`).
    scale: float | None = None
    # Keep the concept layer's mask of every step for later inspection (`handle.masks`).
    record_masks: bool = True

    def __post_init__(self) -> None:
        if self.masking not in ("global", "local", "none"):
            raise ConceptrolError(f"masking must be 'global', 'local' or 'none', got {self.masking!r}")
        if self.architecture is not None and self.architecture not in CONCEPT_LAYERS:
            raise ConceptrolError(
                f"unknown architecture {self.architecture!r}; use one of {sorted(CONCEPT_LAYERS)} "
                "or leave it None to detect it"
            )
        check_window(self.start, self.end)
        if self.scale is not None and (
            isinstance(self.scale, bool) or not isinstance(self.scale, (int, float))
            or not math.isfinite(self.scale) or self.scale < 0
        ):
            raise ConceptrolError(f"scale must be a finite number >= 0, got {self.scale!r}")
        if self.concept_layer is not None:
            object.__setattr__(self, "concept_layer", normalize_layer_name(self.concept_layer))

    def with_architecture(self, architecture: str) -> ConceptrolConfig:
        """This config with the architecture (and its preset concept layer, unless one is set) filled in."""
        layer = self.concept_layer or CONCEPT_LAYERS[architecture]
        return replace(self, architecture=self.architecture or architecture, concept_layer=layer)


def check_fraction(name: str, value: float) -> None:
    """`value` is a fraction of the steps, in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ConceptrolError(f"{name} must be a fraction of the steps in [0, 1], got {value!r}")


def check_window(start: float, end: float) -> None:
    """start and end are fractions of the steps with start < end (else the adapter would never act)."""
    check_fraction("start", start)
    check_fraction("end", end)
    if start >= end:
        raise ConceptrolError(f"start ({start}) must be smaller than end ({end}): the adapter would never act")


def check_window_steps(start: float, end: float, total_steps: int) -> None:
    """Some of the `total_steps` denoising steps lie in the window [start, end] (else the adapter would never act)."""
    if not any(adapter_active(step, total_steps, start, end) for step in range(total_steps)):
        raise ConceptrolError(
            f"the window start {start:g} to end {end:g} holds none of the {total_steps} denoising steps (step k acts "
            f"when start <= k/{total_steps} and (k+1)/{total_steps} <= end), so the adapter would never act at "
            f"{total_steps} steps; widen the window or use more steps")


def normalize_layer_name(name: str) -> str:
    """`...attn2` and `...attn2.processor` name the same layer; keep the former."""
    return name.removesuffix(".processor")


def adapter_active(step: int, total_steps: int, start: float, end: float) -> bool:
    """The warm-up window: the adapter acts at step k unless k/T < start or (k+1)/T > end."""
    return not (step / total_steps < start or (step + 1) / total_steps > end)


@dataclass(kw_only=True)
class StepWindow:
    """Where a call is in its denoising steps, and whether the adapter acts in the running step.

    Processors read `active`, never the step: a compiled denoiser is specialised on every Python value its processors
    read, so reading the step would recompile it at every step. The handle calls `follow` between model calls.
    """

    total_steps: int  # best guess until the pipeline reports the steps it really runs
    step: int = 0  # read by the handle only
    active: bool = True  # the adapter acts in the running step (the [start, end] window)
    checked_steps: int | None = None  # the step count the window was last checked against

    def follow(self, start: float, end: float) -> None:
        """Set `active` for the running step; the window must hold some of the steps the pipeline runs."""
        if self.checked_steps != self.total_steps:
            check_window_steps(start, end, self.total_steps)
            self.checked_steps = self.total_steps
        self.active = adapter_active(self.step, self.total_steps, start, end)
