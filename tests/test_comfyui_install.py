"""`conceptrol comfyui install PATH`: the loader it writes, through the real CLI entry (no ComfyUI needed)."""

import json
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path

import pytest
from helpers import run_main

from conceptrol.comfyui.install import FOLDER, loader_text

README = Path(__file__).parents[1] / "README.md"


def expected_requirement() -> str:
    """What pip needs to install the conceptrol running these tests (not on the package index: its clone's URL)."""
    origin = json.loads(distribution("conceptrol").read_text("direct_url.json") or "{}")
    return f"conceptrol @ {origin['url']}" if origin.get("url") and "vcs_info" not in origin else "conceptrol"


LOADER = loader_text(expected_requirement())


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
    assert loader.with_name("requirements.txt").read_text() == expected_requirement() + "\n"  # for ComfyUI-Manager
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


def test_the_loader_and_requirements_name_an_install_that_works_not_a_name_missing_from_the_index(comfyui, capsys):
    """conceptrol is installed from its clone here: `pip install conceptrol` would find nothing on the index."""
    assert cli(capsys, "comfyui", "install", str(comfyui))[0] == 0
    folder = comfyui / "custom_nodes" / FOLDER
    requirement = (folder / "requirements.txt").read_text().strip()
    assert requirement.startswith("conceptrol @ file://") and Path(requirement.split("file://")[1]).is_dir()
    assert f"REQUIREMENT = {requirement!r}" in (folder / "__init__.py").read_text()
    shutil.copytree(folder, comfyui / "custom_nodes" / "loader_copy")  # an importable name for the same loader
    failing = subprocess.run([sys.executable, "-c", "import sys; sys.modules['conceptrol'] = None; "
                              f"sys.path.insert(0, {str(comfyui / 'custom_nodes')!r}); import loader_copy"],
                             capture_output=True, text=True, timeout=60)
    assert failing.returncode == 1 and f"-m pip install '{requirement}'" in failing.stderr


def test_the_readmes_comfyui_install_does_not_use_a_package_name_missing_from_the_index():
    section = README.read_text(encoding="utf-8").split("### Install", 1)[1].split("\n### ", 1)[0]
    commands = [line for line in section.splitlines() if "pip install" in line]
    assert commands and not [line for line in commands if re.search(r"pip install conceptrol\b(?! @)", line)]


def test_install_into_a_missing_folder_says_it_does_not_exist(tmp_path, capsys):
    code, out, err = cli(capsys, "comfyui", "install", str(tmp_path / "nonexistent" / "x"))
    assert code == 2 and out == "" and err.count("\n") == 0
    assert err.startswith("conceptrol: error: ") and "does not exist" in err and not (tmp_path / "nonexistent").exists()


def test_install_help_names_every_folder_comfyui_needs(capsys):
    code, out, _ = run_main(capsys, "comfyui", "install", "--help")
    assert code == 0 and "main.py, comfy/ and custom_nodes/" in " ".join(" ".join(out).split())


def as_user_without_override(command: list[str]) -> list[str]:
    """Run `command` so that file modes count: as root, drop the capabilities that let root write anywhere."""
    if os.geteuid() != 0:
        return command
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("as root, this test needs setpriv (util-linux) to drop DAC_OVERRIDE")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps", "-dac_override", *command]


def install_command(comfyui: Path) -> list[str]:
    return as_user_without_override([sys.executable, "-m", "conceptrol.cli", "comfyui", "install", str(comfyui)])


@pytest.mark.parametrize("earlier", ["none", "loader without requirements.txt"])
def test_install_into_a_read_only_comfyui_says_so_in_one_line_and_writes_nothing(comfyui, earlier):
    folder = comfyui / "custom_nodes" / FOLDER
    if earlier != "none":  # an install from before requirements.txt existed, now in a read-only folder
        folder.mkdir()
        (folder / "__init__.py").write_text(LOADER.splitlines()[0] + "\nold version\n")
    before = {p: p.read_bytes() for p in comfyui.rglob("*") if p.is_file()}
    read_only = folder if earlier != "none" else comfyui / "custom_nodes"
    read_only.chmod(0o555)
    try:
        result = subprocess.run(install_command(comfyui), capture_output=True, text=True, timeout=120)
    finally:
        read_only.chmod(0o755)
    assert result.returncode == 2 and result.stdout == "", result
    [line] = result.stderr.splitlines()
    assert line.startswith("conceptrol: error: cannot write to ") and "permission denied" in line
    assert "run as the user that owns ComfyUI" in line
    assert {p: p.read_bytes() for p in comfyui.rglob("*") if p.is_file()} == before  # nothing half-written


def test_comfyui_install_imports_no_torch(comfyui):
    code = ("import sys\nfrom conceptrol.cli import main\n"
            f"code = main(['comfyui', 'install', {str(comfyui)!r}])\n"
            "print(code, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.split()[-2:] == ["0", "False"], result.stderr
