"""The package's folders are its architecture: who may import whom, read from the source (README, "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import conceptrol
from conceptrol.apply import FAMILIES

ROOT = Path(conceptrol.__file__).parent
LIBRARY = ("core", "apply", "analysis", "__init__")  # with the family folders: the library
APPS = ("app", "cli", "__main__", "eval", "demo", "comfyui", "tiny")
FAMILY_FOLDERS = tuple(family.package for family in FAMILIES)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every conceptrol module `path` imports, at any depth of the file (lazy imports in functions too)."""
    package = module_name(path).split(".") if path.name == "__init__.py" else module_name(path).split(".")[:-1]
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(block.test) for node in ast.walk(block)}  # no import at run time
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            elif (node.module or "").startswith("conceptrol"):
                target = node.module.removeprefix("conceptrol").lstrip(".")
            else:
                continue
            found.add(target)
            found.update(f"{target}.{alias.name}".strip(".") for alias in node.names)  # `from . import x`
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("conceptrol").lstrip(".") for a in node.names if a.name.startswith("conceptrol"))
    modules = {module_name(p) for p in ROOT.rglob("*.py")}
    return {name for name in found if name in modules}


GRAPH = {module_name(path): imported_modules(path) for path in ROOT.rglob("*.py")}


def top(name: str) -> str:
    return name.split(".")[0] if name else "__init__"


def test_core_imports_nothing_above_it():
    for module, imports in GRAPH.items():
        if top(module) == "core":
            assert {top(i) for i in imports} <= {"core"}, (module, imports)


@pytest.mark.parametrize("family", FAMILY_FOLDERS)
def test_a_family_imports_core_and_itself_only(family):
    for module, imports in GRAPH.items():
        if top(module) == family:
            assert {top(i) for i in imports} <= {"core", family}, (module, imports)


def test_the_library_never_imports_an_app():
    for module, imports in GRAPH.items():
        if top(module) in LIBRARY + FAMILY_FOLDERS:
            assert not {top(i) for i in imports} & set(APPS), (module, imports)


def test_every_folder_has_a_place_in_the_layout():
    folders = {top(module) for module in GRAPH}
    assert folders <= set(LIBRARY + FAMILY_FOLDERS + APPS), folders - set(LIBRARY + FAMILY_FOLDERS + APPS)


def test_no_import_cycles():
    """Depth-first search over module-to-module imports (a package's __init__ counts as the package)."""
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(GRAPH.get(module, ())):
            if target == module or module.startswith(target + ".") or target.startswith(module + "."):
                continue  # a package and its own submodules
            if state.get(target) == "open":
                pytest.fail("import cycle: " + " -> ".join([*path, module, target]))
            if target not in state:
                visit(target, [*path, module])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [])


def test_folders_depend_one_way():
    """The folders' imports form no cycle either: apps stack on each other in one order (cli on top)."""
    edges = {(top(m), top(i)) for m, imports in GRAPH.items() for i in imports if top(m) != top(i)}
    folders = {top(m) for m in GRAPH}
    order = []
    while folders - set(order):
        free = sorted(f for f in folders - set(order) if all(t in order for s, t in edges if s == f))
        assert free, f"the folders {sorted(folders - set(order))} import each other in a cycle"
        order += free


def test_readme_layout_names_every_folder():
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    for folder in folders:
        assert f"`{folder}/`" in section, folder
