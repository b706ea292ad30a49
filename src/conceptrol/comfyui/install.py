"""`conceptrol comfyui install PATH`: a small loader in PATH/custom_nodes that imports this installed package's nodes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.errors import ConceptrolError

FOLDER = "ComfyUI-Conceptrol"  # not "conceptrol": ComfyUI puts custom_nodes on sys.path, which would shadow the package
MARKER = "# written by `conceptrol comfyui install`"
LOADER = f'''{MARKER}; remove this folder to uninstall.
"""Loads the Conceptrol nodes from the `conceptrol` package installed in ComfyUI's Python."""

try:
    from conceptrol.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError as error:
    import sys

    raise ImportError(
        f"the Conceptrol nodes need the conceptrol package in ComfyUI's Python: run "
        f"`{{sys.executable}} -m pip install conceptrol` ({{error}})"
    ) from error

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
'''
# ComfyUI-Manager installs a custom node's requirements.txt into ComfyUI's Python ("Install"/"Try fix")
REQUIREMENTS = "conceptrol\n"


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
    if not _is_comfyui(comfyui):
        raise ConceptrolError(f"{comfyui} is not a ComfyUI folder (it needs main.py, comfy/ and custom_nodes/); "
                              "pass the folder you start ComfyUI from")
    folder = comfyui / "custom_nodes" / FOLDER
    loader, requirements = folder / "__init__.py", folder / "requirements.txt"
    if _holds(loader, LOADER) and _holds(requirements, REQUIREMENTS):
        return InstallResult(loader, changed=False)
    if folder.exists() and not (loader.is_file() and loader.read_text(encoding="utf-8").startswith(MARKER)):
        raise ConceptrolError(f"{folder} exists and was not written by conceptrol; move it away and run this again")
    folder.mkdir(exist_ok=True)
    requirements.write_text(REQUIREMENTS, encoding="utf-8")
    loader.write_text(LOADER, encoding="utf-8")
    return InstallResult(loader, changed=True)


def _holds(path: Path, text: str) -> bool:
    return path.is_file() and path.read_text(encoding="utf-8") == text


def _is_comfyui(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "comfy").is_dir() and (path / "custom_nodes").is_dir()
