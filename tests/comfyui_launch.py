"""Start ComfyUI's server (main.py) where torchvision cannot be imported: `python comfyui_launch.py COMFYUI [ARGS...]`.

ComfyUI's server imports torchvision (comfy.sd, IPAdapter_plus, some comfy_extras nodes), and no torchvision build
matches the CPU torch of this project's test environment. When `import torchvision` fails, this launcher puts the
fail-loudly placeholder of tests/torchvision_placeholder.py into sys.modules (the one the library-mode tests use; any
code that reaches torchvision raises "torchvision placeholder: ...") and then runs COMFYUI/main.py as `python main.py
ARGS...` would. Where torchvision imports, it runs main.py unchanged.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from torchvision_placeholder import placeholder_modules, torchvision_imports


def main(argv: list[str]) -> None:
    if not argv or not (Path(argv[0]) / "main.py").is_file():
        sys.exit("usage: python comfyui_launch.py PATH/TO/ComfyUI [main.py's arguments...]")
    root = Path(argv[0]).resolve()
    if not torchvision_imports():
        sys.modules.update(placeholder_modules())
        print("comfyui_launch: torchvision does not import here; a placeholder that fails loudly when reached stands "
              "in for it", file=sys.stderr, flush=True)
    sys.path.insert(0, str(root))
    sys.argv = [str(root / "main.py"), *argv[1:]]
    runpy.run_path(str(root / "main.py"), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
