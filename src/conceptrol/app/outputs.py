"""Writing result files: never over an existing file, settings inside each PNG, and atomic writes for runs."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..core.errors import ConceptrolError
from ..core.files import write_new_png as write_png


def check_output_dir(out: Path) -> Path:
    """Prove the output folder can be written without creating it: the folder itself if it exists, else the nearest
    folder above it (a test file is created there and removed). Nothing is left behind when a later check fails."""
    out = Path(out).expanduser()
    existing = next(folder for folder in (out, *out.parents) if folder.exists() or folder == folder.parent)
    if not existing.is_dir():
        raise ConceptrolError(f"cannot write to output folder {out}: {existing} is a file; pass another --out")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".conceptrol-write-test-"):
            pass
    except OSError as error:
        where = "" if existing == out else f" (creating it in {existing})"
        raise ConceptrolError(f"cannot write to output folder {out}{where}: {error.strerror or error}; pass a "
                              "writable --out") from None
    return out


def make_output_dir(out: Path) -> Path:
    """Create the output folder (and the folders above it) when results are about to be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConceptrolError(f"cannot create output folder {out} ({error.strerror or error}); pass a writable --out") from None
    return out


def prepare_output_dir(out: Path) -> Path:
    """Check, then create the output folder: for runs that write as soon as their checks have passed."""
    return make_output_dir(check_output_dir(out))


def png_info(parameters: dict[str, Any]) -> PngInfo:
    """PNG text chunks: 'parameters' (AUTOMATIC1111's format, which image tools read) and 'conceptrol' (all, JSON)."""
    info = PngInfo()
    info.add_text("parameters", infotext(parameters))
    info.add_text("conceptrol", json.dumps(parameters, sort_keys=True))
    return info


def infotext(parameters: dict[str, Any]) -> str:
    """The settings as AUTOMATIC1111 writes them: the prompt, `Negative prompt: ...`, then one `Key: value, ...` line."""
    get = parameters.get
    guidance = "Distilled CFG Scale" if str(get("architecture", "")).startswith("flux") else "CFG scale"
    concepts = [f"{c}@{n + 1}" if n else str(c) for c, n in zip(get("concepts", []), get("occurrences") or [0] * 99)]
    fields = {"Steps": get("steps"), guidance: get("guidance"), "Seed": get("seed"), "Size": get("size"),
              "Model": get("model"), "Conceptrol concepts": ", ".join(concepts) or None,
              "Conceptrol mask of": get("mask_of"), "Conceptrol masking": get("masking"),
              "Conceptrol scale": get("scale"), "Conceptrol window": f"{get('start', 0):g}-{get('end', 1):g}",
              "Conceptrol layer": get("concept_layer"), "Conceptrol adapter": get("adapter"),
              "Version": f"conceptrol {get('conceptrol')}" if get("conceptrol") else None}
    lines = [str(get("prompt", ""))] + ([f"Negative prompt: {get('negative_prompt')}"] if get("negative_prompt") else [])
    return "\n".join([*lines, ", ".join(f"{key}: {_quoted(value)}" for key, value in fields.items() if value is not None)])


def _quoted(value: Any) -> str:
    """A value as AUTOMATIC1111 quotes it: JSON-quoted when it holds a comma, a colon or a line break."""
    text = str(value)
    return json.dumps(text) if any(mark in text for mark in ",:\n") else text


def write_new_png(image: Image.Image, path: Path, parameters: dict[str, Any] | None = None) -> Path:
    """Write a PNG that must not exist yet (exclusive create), with the settings in its text chunks."""
    return write_png(image, path, png_info(parameters) if parameters else None)


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
