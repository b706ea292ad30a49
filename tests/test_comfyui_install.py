"""`conceptrol comfyui install PATH`: the loader it writes, through the real CLI entry (no ComfyUI needed)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_main
from conceptrol.comfyui.install import FOLDER, LOADER


@pytest.fixture
def comfyui(tmp_path):
    """A folder shaped like ComfyUI's: main.py, comfy/, custom_nodes/."""
    for folder in ("comfy", "custom_nodes"):
        (tmp_path / folder).mkdir()
    (tmp_path / "main.py").write_text("")
    return tmp_path


def files(root):
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


def cli(capsys, *args):
    code, out, err = run_main(capsys, *args)
    return code, "\n".join(out), "\n".join(err)


def test_install_writes_the_loader_once_and_says_so_again(comfyui, capsys):
    before = files(comfyui)
    code, out, _ = cli(capsys, "comfyui", "install", str(comfyui))
    loader = comfyui / "custom_nodes" / FOLDER / "__init__.py"
    assert code == 0 and out.startswith("installed the Conceptrol nodes") and str(loader) in out
    assert files(comfyui) == sorted(before + [f"custom_nodes/{FOLDER}", f"custom_nodes/{FOLDER}/__init__.py",
                                              f"custom_nodes/{FOLDER}/requirements.txt"])
    assert loader.read_text() == LOADER and "from conceptrol.comfyui import NODE_CLASS_MAPPINGS" in LOADER
    assert loader.with_name("requirements.txt").read_text().split() == ["conceptrol"]  # for ComfyUI-Manager
    code, out, _ = cli(capsys, "comfyui", "install", str(comfyui))
    assert code == 0 and "already installed" in out and "unchanged" in out
    loader.write_text(LOADER.splitlines()[0] + "\nold version\n")  # an older loader of ours is replaced
    assert cli(capsys, "comfyui", "install", str(comfyui))[:2] == (0, f"installed the Conceptrol nodes: {loader} "
                                                                      "(restart ComfyUI to load them)")
    assert loader.read_text() == LOADER


def test_install_refuses_a_folder_that_is_not_comfyui(tmp_path, capsys):
    (tmp_path / "custom_nodes").mkdir()
    code, out, err = cli(capsys, "comfyui", "install", str(tmp_path))
    assert code == 2 and out == "" and err.count("\n") == 0
    assert err.startswith("conceptrol: error: ") and "is not a ComfyUI folder" in err
    assert files(tmp_path) == ["custom_nodes"]


def test_install_leaves_someone_elses_folder_alone(comfyui, capsys):
    theirs = comfyui / "custom_nodes" / FOLDER / "__init__.py"
    theirs.parent.mkdir()
    theirs.write_text("# another project\n")
    code, _, err = cli(capsys, "comfyui", "install", str(comfyui))
    assert code == 2 and "was not written by conceptrol" in err and theirs.read_text() == "# another project\n"


def test_install_with_the_console_script_in_a_users_environment(comfyui):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_VERBOSITY",
                                                             "DIFFUSERS_VERBOSITY", "OMP_WAIT_POLICY")}
    script = Path(sys.executable).with_name("conceptrol")  # what `pip install` put next to this Python
    result = subprocess.run([str(script), "comfyui", "install", str(comfyui)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and "installed the Conceptrol nodes" in result.stdout and result.stderr == ""
    assert (comfyui / "custom_nodes" / FOLDER / "__init__.py").read_text() == LOADER


def test_the_library_and_the_node_pack_import_no_comfyui():
    code = ("import sys, conceptrol, conceptrol.comfyui, conceptrol.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('comfy', 'nodes', 'folder_paths')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr
