"""Conceptrol as a ComfyUI node pack (issue 13): `conceptrol comfyui install PATH/TO/ComfyUI` makes ComfyUI load it.

Importing this package imports no ComfyUI module and no torch: the nodes load on first use of the mappings below
(ComfyUI reads them when it loads the pack), and they import ComfyUI's modules at run time, inside ComfyUI.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(".nodes", __name__), name)
