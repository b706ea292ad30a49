"""A fail-loudly stand-in for torchvision, for running ComfyUI where no torchvision build matches the installed torch.

ComfyUI (comfy.sd, some comfy_extras nodes) and IPAdapterPlus.py import torchvision at module level, but no torchvision
build importable next to the CPU torch of this project's test environment exists. `placeholder_modules()` gives
modules named `torchvision`, `torchvision.transforms` and `torchvision.transforms.v2` whose every attribute access
raises RuntimeError("torchvision placeholder: the code under test reached torchvision ..."), so an exercised path that
really needs torchvision fails loudly instead of silently. Importing this module imports no torch (ComfyUI's main.py
wants to be first to import it).
"""

from __future__ import annotations

import sys
import types

PLACEHOLDER_NAMES = ("torchvision", "torchvision.transforms", "torchvision.transforms.v2")


class TorchvisionPlaceholder(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise RuntimeError(f"torchvision placeholder: the code under test reached torchvision ({self.__name__}."
                           f"{name}); install a torchvision build that matches torch to run this path")


def torchvision_imports() -> bool:
    """Whether a working torchvision imports here; a broken one (e.g. built for another torch) is unloaded again."""
    try:
        import torchvision  # noqa: F401
        return True
    except Exception:  # missing, or a build for another torch (e.g. 'operator torchvision::nms does not exist')
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        return False


def placeholder_modules() -> dict[str, types.ModuleType]:
    """The placeholder modules by name, linked as the real package's attributes are (torchvision.transforms.v2)."""
    # transformers decides once (cached) whether torchvision exists: let it see that it does not, before the
    # placeholder is in sys.modules (where importlib.util.find_spec would fail on it)
    from transformers.utils import import_utils

    import_utils.is_torchvision_available()
    root, transforms, v2 = (TorchvisionPlaceholder(name) for name in PLACEHOLDER_NAMES)
    object.__setattr__(root, "transforms", transforms)
    object.__setattr__(transforms, "v2", v2)
    return dict(zip(PLACEHOLDER_NAMES, (root, transforms, v2)))
