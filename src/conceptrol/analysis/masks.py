"""Reading a subject mask as ALGORITHM.md section 5 says: grayscale, resized to the image with nearest-neighbour,
subject where the value is at least half of full scale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ..core.errors import ConceptrolError

ASPECT_TOLERANCE = 0.01  # sizes rounded to the model's multiples keep the aspect ratio to within 1%


def mask_values(path: str | Path) -> np.ndarray:
    """The mask's grayscale values as fractions of full scale [H, W] (8-bit: /255, 16-bit: /65535)."""
    path = Path(path)
    if not path.is_file():
        raise ConceptrolError(f"mask {path} does not exist or is not a file")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                return np.asarray(image, dtype=np.float64) / 65535.0
            if image.mode == "F":
                return np.asarray(image, dtype=np.float64)
            return np.asarray(image.convert("L"), dtype=np.float64) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ConceptrolError(f"mask {path} is not an image Pillow can read ({error}); pass a PNG or JPEG with the "
                              "subject white on black") from None


def subject_pixels(values: np.ndarray, size: tuple[int, int], name: str = "the mask") -> Tensor:
    """Boolean subject mask [H, W] at `size` (width, height): values resized with F.interpolate(mode="nearest") when
    the sizes differ, subject where >= 0.5. Another aspect ratio, or no subject or no background, is an error."""
    width, height = size
    mask_h, mask_w = values.shape
    if abs(mask_w * height - mask_h * width) > ASPECT_TOLERANCE * mask_w * height:
        raise ConceptrolError(f"{name} is {mask_w}x{mask_h}, another aspect ratio than the {width}x{height} image; "
                              f"pass a mask of the image's shape ({width}x{height})")
    grid = torch.from_numpy(values)[None, None]
    if (mask_h, mask_w) != (height, width):
        grid = F.interpolate(grid, size=(height, width), mode="nearest")
    subject = grid[0, 0] >= 0.5
    check_subject(subject, name)
    return subject


def check_subject(subject: Tensor, name: str = "the mask") -> None:
    """A mask needs subject and background pixels: with either missing, no AUC exists."""
    if not bool(subject.any()):
        raise ConceptrolError(f"{name} has no subject pixel (none at or above half of full scale); the subject must be "
                              "white (or light) on a dark background")
    if bool(subject.all()):
        raise ConceptrolError(f"{name} has no background pixel (every pixel is at or above half of full scale); the "
                              "background must be black (or dark)")


def read_mask(path: str | Path, size: tuple[int, int]) -> Tensor:
    """The subject mask in file `path` for an image of `size` (width, height): boolean [H, W]."""
    return subject_pixels(mask_values(path), size, f"mask {path}")
