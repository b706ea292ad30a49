"""Where the prompt's text, the latent image and the reference tokens sit in FLUX.1's joint sequence, and the
reference strength of a step (ALGORITHM.md sections 2 and 4)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..core.config import adapter_active

OUTSIDE_WINDOW_SCALE = 0.5  # the reference's condition scale outside the [start, end] window


def condition_scale_at(step: int, total_steps: int, start: float, end: float, scale: float) -> float:
    """Condition scale c at step k: the requested one inside the window, 0.5 outside (as the reference)."""
    return scale if adapter_active(step, total_steps, start, end) else OUTSIDE_WINDOW_SCALE


@dataclass(frozen=True, eq=False)
class SequenceLayout:
    """Where the prompt's text, the latent image and the reference tokens sit in a joint attention sequence."""

    length: int
    text: slice  # the prompt's (T5) text tokens, whose attention gives the concept mask
    latent: slice  # the image being generated
    reference: slice  # the reference tokens (OminiControl's condition, Kontext's or Redux's); may be empty

    @property
    def has_reference(self) -> bool:
        return self.reference.stop > self.reference.start

    @property
    def key(self) -> tuple[int, ...]:
        """A hashable identity (slices are not hashable before Python 3.12)."""
        return (self.length, *(getattr(part, end) for part in (self.text, self.latent, self.reference)
                               for end in ("start", "stop")))


@dataclass(frozen=True, eq=False)
class JointLayout(SequenceLayout):
    """OminiControl's sequence [text | latent | condition]; all counts derived from tensor shapes."""

    def __init__(self, num_text: int, num_latent: int, num_condition: int) -> None:
        end = num_text + num_latent
        super().__init__(end + num_condition, slice(0, num_text), slice(num_text, end), slice(end, end + num_condition))

    @property
    def num_text(self) -> int:
        return self.text.stop

    @property
    def num_latent(self) -> int:
        return self.latent.stop - self.latent.start

    @property
    def num_condition(self) -> int:
        return self.reference.stop - self.reference.start


def latent_grid(img_ids: Tensor) -> tuple[int, int]:
    """(rows, cols) of the latent tokens, from their position ids (0, row, col); one device sync per call."""
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids  # [N (+ reference), 3]
    latent = ids[:, 1:].masked_fill(ids[:, :1] != 0, -1)  # a reference's ids (Kontext) have first coordinate 1
    rows, cols = latent.amax(dim=0).tolist()
    return int(rows) + 1, int(cols) + 1
