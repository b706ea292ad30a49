"""Conceptrol as a ComfyUI node pack (issue 13): `conceptrol comfyui install PATH/TO/ComfyUI` makes ComfyUI load it.

Importing this package imports no ComfyUI module; the nodes import ComfyUI's at run time, inside ComfyUI.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
