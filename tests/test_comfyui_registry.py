"""The repository as a ComfyUI node pack for ComfyUI-Manager and the Comfy registry: they install it as a folder in
custom_nodes/ (a git clone, or the registry's archive of it) and ComfyUI imports its __init__.py; the registry reads
pyproject.toml's [project] and [tool.comfy]. The tests that run ComfyUI skip without CONCEPTROL_COMFYUI.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import comfyui_env as env
import pytest
import tomllib

import conceptrol

REPO = Path(__file__).parents[1]
TESTS = Path(__file__).parent
needs_comfyui = pytest.mark.skipif(env.comfy_root() is None, reason=env.SKIP_REASON)


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


@needs_comfyui
def test_the_repository_folder_loads_in_comfyui_as_a_node_pack_with_nothing_pip_installed(tmp_path):
    """As ComfyUI-Manager leaves it: the repository in custom_nodes/conceptrol, and no conceptrol installed."""
    pack = tmp_path / "custom_nodes" / "conceptrol"
    shutil.copytree(REPO / "src", pack / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("__init__.py", "pyproject.toml", "README.md"):
        shutil.copyfile(REPO / name, pack / name)
    script = f"""
import asyncio, json, logging, sys
from pathlib import Path
sys.path[:] = [p for p in sys.path if not (Path(p or '.') / 'conceptrol').is_dir()]  # the installed conceptrol
sys.path.insert(0, {str(TESTS)!r})
records = []
class Recorder(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger().addHandler(Recorder())
import comfyui_env
nodes = comfyui_env.load_comfyui().nodes
loaded = asyncio.run(nodes.load_custom_node({str(pack)!r}))
import conceptrol
print(json.dumps({{"loaded": loaded, "conceptrol": conceptrol.__file__, "warnings": records,
                  "nodes": sorted(n for n in nodes.NODE_CLASS_MAPPINGS if n.startswith("Conceptrol"))}}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loaded"] and report["nodes"] == ["Conceptrol", "ConceptrolMask"]
    assert Path(report["conceptrol"]).is_relative_to(pack / "src")  # the pack's own copy, not an installed one
    assert not [w for w in report["warnings"] if "pyproject" in w], report["warnings"]  # ComfyUI read our metadata


@needs_comfyui
def test_comfyuis_own_parser_reads_the_registry_metadata():
    env.load_comfyui()
    from comfy_config import config_parser

    config = config_parser.extract_node_configuration(str(REPO))
    assert config.project.name == "conceptrol" and "2503.06568" in config.project.description
    assert config.project.license.text == "Apache-2.0" and config.project.supported_os == ["OS Independent"]
    assert config.project.supported_comfyui_version == ">=0.3.64"
    assert config.tool_comfy.display_name == "Conceptrol"


def test_the_registry_reads_the_packages_version_where_tool_comfy_version_points():
    """comfy-cli's contract for dynamic = ["version"]: the first line `__version__ = "X.Y.Z"` of that file."""
    data = pyproject()
    assert "version" in data["project"]["dynamic"]
    text = (REPO / data["tool"]["comfy"]["version"]["path"]).read_text(encoding="utf-8")
    found = re.search(r'^__version__\s*=\s*"([^"\\\n]*)"', text, re.MULTILINE)
    assert found and found.group(1) == conceptrol.__version__ and re.fullmatch(r"\d+\.\d+\.\d+", found.group(1))


def test_the_node_pack_needs_nothing_comfyui_lacks():
    """A Manager install pip-installs nothing: the nodes import with torch alone (diffusers, transformers, peft,
    accelerate, safetensors, PIL, tqdm, huggingface_hub blocked), and run with torch and numpy (ComfyUI has both)."""
    blocked = ["diffusers", "transformers", "peft", "accelerate", "safetensors", "PIL", "tqdm", "huggingface_hub"]
    script = (f"import sys\nfor name in {blocked!r}: sys.modules[name] = None\n"
              "import torch\nfrom conceptrol.comfyui import NODE_CLASS_MAPPINGS\n"
              "from conceptrol.comfyui import patch, tokens\n"
              "print(sorted(NODE_CLASS_MAPPINGS), patch.latent_key(torch.zeros(1, 4, 2, 2)))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("['Conceptrol', 'ConceptrolMask'] (1, 4, 2, 2):"), result.stdout
