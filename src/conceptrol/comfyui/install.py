"""`conceptrol comfyui install PATH`: a small loader in PATH/custom_nodes that imports this installed package's nodes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.errors import ConceptrolError

FOLDER = "ComfyUI-Conceptrol"  # not "conceptrol": ComfyUI puts custom_nodes on sys.path, which would shadow the package
MARKER = "# written by `conceptrol comfyui install`"


def loader_text(requirement: str) -> str:
    """The loader ComfyUI imports: it imports the installed package's nodes, or says how to install the package."""
    return f'''{MARKER}; remove this folder to uninstall.
"""Loads the Conceptrol nodes from the `conceptrol` package installed in ComfyUI's Python."""

REQUIREMENT = {requirement!r}  # where that package comes from (requirements.txt says the same)

try:
    from conceptrol.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError as error:
    import sys

    raise ImportError(
        f"the Conceptrol nodes need the conceptrol package in ComfyUI's Python: run "
        f"`{{sys.executable}} -m pip install '{{REQUIREMENT}}'` ({{error}})"
    ) from error

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
'''


def comfyui_files(requirement: str) -> dict[str, str]:
    """What `install` writes into custom_nodes/ComfyUI-Conceptrol/: the loader, and the requirements.txt that
    ComfyUI-Manager installs into ComfyUI's Python ("Install" / "Try fix")."""
    return {"__init__.py": loader_text(requirement), "requirements.txt": requirement + "\n"}


@dataclass(frozen=True)
class InstallResult:
    """Where the loader is, and whether this call wrote it."""

    path: Path
    changed: bool  # False: the same loader was there already

    def line(self) -> str:
        if self.changed:
            return f"installed the Conceptrol nodes: {self.path} (restart ComfyUI to load them)"
        return f"the Conceptrol nodes are already installed: {self.path} (unchanged)"


def install_comfyui_loader(comfyui: Path) -> InstallResult:
    """Write (or leave, if identical) custom_nodes/ComfyUI-Conceptrol/{__init__.py, requirements.txt} in the ComfyUI
    folder `comfyui`."""
    comfyui = Path(comfyui).expanduser()
    if not comfyui.exists():
        raise ConceptrolError(f"{comfyui} does not exist; pass the ComfyUI folder (the one holding main.py, comfy/ and "
                              "custom_nodes/)")
    if not _is_comfyui(comfyui):
        raise ConceptrolError(f"{comfyui} is not a ComfyUI folder (it needs main.py, comfy/ and custom_nodes/); "
                              "pass the folder you start ComfyUI from")
    folder = comfyui / "custom_nodes" / FOLDER
    files = comfyui_files(install_requirement())
    loader = folder / "__init__.py"
    if all(_holds(folder / name, text) for name, text in files.items()):
        return InstallResult(loader, changed=False)
    if folder.exists() and not (loader.is_file() and loader.read_text(encoding="utf-8").startswith(MARKER)):
        raise ConceptrolError(f"{folder} exists and was not written by conceptrol; move it away and run this again")
    _write_all(folder, files)
    return InstallResult(loader, changed=True)


def install_requirement() -> str:
    """How pip installs the conceptrol that runs now: from its clone, wheel or repository when it came from one
    (pip's direct_url.json), else by name from the package index."""
    import json
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        origin = json.loads(distribution("conceptrol").read_text("direct_url.json") or "{}")
    except (PackageNotFoundError, ValueError):
        origin = {}
    url = origin.get("url")
    if not url:
        return "conceptrol"
    vcs = origin.get("vcs_info")
    if vcs:
        return f"conceptrol @ {vcs['vcs']}+{url}@{vcs.get('commit_id', '')}".rstrip("@")
    return f"conceptrol @ {url}"


def _write_all(folder: Path, files: dict[str, str]) -> None:
    """Write every file or none: each to a temporary name first, renamed into place once all are written."""
    created = not folder.exists()
    written: list[Path] = []
    try:
        folder.mkdir(exist_ok=True)
        for name, text in files.items():
            temporary = folder / f".{name}.tmp"
            written.append(temporary)
            temporary.write_text(text, encoding="utf-8")
        for name in files:
            (folder / f".{name}.tmp").replace(folder / name)
    except OSError as error:
        for temporary in written:
            temporary.unlink(missing_ok=True)
        if created and folder.exists():
            folder.rmdir()
        where = folder if folder.exists() else folder.parent
        reason = "permission denied" if isinstance(error, PermissionError) else (error.strerror or str(error))
        raise ConceptrolError(f"cannot write to {where} ({reason}); run as the user that owns ComfyUI, or make "
                              "that folder writable") from None


def _holds(path: Path, text: str) -> bool:
    return path.is_file() and path.read_text(encoding="utf-8") == text


def _is_comfyui(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "comfy").is_dir() and (path / "custom_nodes").is_dir()
