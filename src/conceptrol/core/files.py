"""Files that are never written over: a free name suffix for a set of files, and exclusive creation."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .errors import ConceptrolError


def safe_name(text: str) -> str:
    """A file-name fragment of letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "concept"


def free_suffix(out: Path, names: list[str]) -> str:
    """'' if none of `names` exists in `out`, else the first '-2', '-3', ... that makes all of them new."""
    for number in range(1, 100_000):
        suffix = "" if number == 1 else f"-{number}"
        if not any((out / with_suffix(name, suffix)).exists() for name in names):
            return suffix
    raise ConceptrolError(f"{out} holds too many earlier results; pass another --out")


def with_suffix(name: str, suffix: str) -> str:
    """'global-seed0-0.png' with '-2' -> 'global-seed0-0-2.png'."""
    stem, dot, extension = name.rpartition(".")
    return f"{stem}{suffix}{dot}{extension}" if dot else name + suffix


def write_new_png(image: Image.Image, path: Path, pnginfo: PngInfo | None = None) -> Path:
    """Write a PNG that must not exist yet (exclusive create), with text chunks when given."""
    try:
        with path.open("xb") as file:
            image.save(file, format="PNG", pnginfo=pnginfo)
    except FileExistsError:
        raise ConceptrolError(f"{path} appeared while writing (another run into the same folder?); run again") from None
    return path


def write_new_text(text: str, path: Path) -> Path:
    """Write a text file that must not exist yet (exclusive create)."""
    try:
        with path.open("x", encoding="utf-8") as file:
            file.write(text)
    except FileExistsError:
        raise ConceptrolError(f"{path} appeared while writing (another run into the same folder?); run again") from None
    return path
