"""Reading users' reference images safely, and drawing concept-mask overlays (Pillow only)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ConceptrolError

if TYPE_CHECKING:
    import torch

MAX_PIXELS = 50_000_000  # a reference image is resized to ~224 px anyway; refuse absurd files early
# Longest side over shortest side. Image encoders resize the short side to ~224 px, so a 10000x1 strip
# would become a 2,240,000x224 image (gigabytes) before its centre is cropped.
MAX_ASPECT = 8.0


def load_reference_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An 8-bit RGB copy of the image at `path`; CMYK, 16-bit, palette and alpha images are converted."""
    path = Path(path)
    if not path.is_file():
        raise ConceptrolError(f"reference image {path} does not exist or is not a file")
    try:
        with Image.open(path) as image:
            if image.width * image.height > max_pixels:
                raise ConceptrolError(
                    f"reference image {path} is {image.width}x{image.height} pixels, more than the "
                    f"{max_pixels:,} pixel limit; downscale it first"
                )
            _check_aspect(path, image.width, image.height)
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as error:
        raise ConceptrolError(f"reference image {path} is too large to open safely: {error}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ConceptrolError(
            f"cannot read reference image {path} ({error}); pass an intact PNG, JPEG or WebP file"
        ) from None


def _check_aspect(path: Path, width: int, height: int) -> None:
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ConceptrolError(
            f"reference image {path} is {width}x{height} pixels, more than {MAX_ASPECT:g} times as wide as high "
            f"(or high as wide); crop it to the subject first"
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16/32-bit grey: rescale, don't clip
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if values.max() > 255 else 255.0
        return Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def mask_overlay(image: Image.Image, mask: torch.Tensor, alpha: float = 0.55) -> Image.Image:
    """The image with a concept mask [h, w] in [0, 1] laid over it as a heat map."""
    heat = Image.fromarray((mask.clamp(0, 1).float().numpy() * 255).astype(np.uint8), mode="L")
    heat = heat.resize(image.size, Image.BILINEAR)
    values = np.asarray(heat, dtype=np.float32)[..., None] / 255.0
    cold, hot = np.array([30, 30, 160], np.float32), np.array([255, 220, 40], np.float32)
    colored = cold * (1 - values) + hot * values
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    return Image.fromarray(np.clip(base * (1 - alpha) + colored * alpha, 0, 255).astype(np.uint8))
