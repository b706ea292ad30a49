"""Writing result files: never over an existing file, settings inside each PNG, and atomic writes for runs."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..core.errors import ConceptrolError


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


def png_info(parameters: dict[str, Any]) -> PngInfo:
    """PNG text chunks: 'parameters' (one readable line per setting, as image tools show it) and 'conceptrol' (JSON)."""
    info = PngInfo()
    info.add_text("parameters", "\n".join(f"{key}: {value}" for key, value in parameters.items()))
    info.add_text("conceptrol", json.dumps(parameters, sort_keys=True))
    return info


def write_new_png(image: Image.Image, path: Path, parameters: dict[str, Any] | None = None) -> Path:
    """Write a PNG that must not exist yet (exclusive create), with the settings in its text chunks."""
    try:
        with path.open("xb") as file:
            image.save(file, format="PNG", pnginfo=png_info(parameters) if parameters else None)
    except FileExistsError:
        raise ConceptrolError(f"{path} appeared while writing (another run into the same folder?); run again") from None
    return path


def write_new_text(text: str, path: Path) -> Path:
    try:
        with path.open("x", encoding="utf-8") as file:
            file.write(text)
    except FileExistsError:
        raise ConceptrolError(f"{path} appeared while writing (another run into the same folder?); run again") from None
    return path


def save_atomic(image: Image.Image, path: Path) -> None:
    """Write a PNG to a temporary file beside `path`, sync it, then rename it over `path`: never half a file.

    The temporary name follows from `path`, so a write cut off by a kill leaves one stale file that the
    next write of the same image replaces.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with temporary.open("wb") as file:
            image.save(file, format="PNG")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def write_json_atomic(data: Any, path: Path, replace: bool = True) -> None:
    """JSON written to a temporary file, synced, then renamed over `path` (replace=False: only if `path` is new,
    so of two processes writing at once the first one's file stays, whole)."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".json.tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(data, file, indent=2, sort_keys=True)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        if replace:
            os.replace(temporary, path)
        else:
            _link_if_new(Path(temporary), path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    _sync_folder(path.parent)


def _link_if_new(temporary: Path, path: Path) -> None:
    try:
        os.link(temporary, path)  # atomic, and fails if the file exists
    except FileExistsError:
        pass
    except OSError:  # a file system without hard links: a rename is still atomic
        if not path.exists():
            os.replace(temporary, path)


def _sync_folder(folder: Path) -> None:
    """Make a rename durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
