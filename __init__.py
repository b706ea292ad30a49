"""The Conceptrol ComfyUI node pack, when ComfyUI-Manager or the Comfy registry installs this repository as a folder in
ComfyUI/custom_nodes/: ComfyUI imports this file, which loads the nodes from this folder's src/ (they need only torch,
which ComfyUI has, so nothing is pip-installed). Not part of the conceptrol package: pip installs src/conceptrol only;
`conceptrol comfyui install` is the other way in (see the README's ComfyUI section). Use one of the two, not both.
"""

import sys
from pathlib import Path

_SOURCE = str(Path(__file__).resolve().parent / "src")
if _SOURCE not in sys.path:
    sys.path.insert(0, _SOURCE)

from conceptrol.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
