"""The node pack in ComfyUI's real server: /object_info, the example workflows through /prompt, /history and /view,
the executor's output cache, a failing workflow, and the UI-format examples in ComfyUI's own page.

Skipped unless CONCEPTROL_COMFYUI names a ComfyUI folder (see tests/comfyui_env.py); .ci/run sets it. The server is
`python main.py --cpu` in a temporary copy of that tree, on 127.0.0.1 and a free port (tests/comfyui_server.py), with
the pack installed by `conceptrol comfyui install` and tiny model files (tests/comfyui_files.py). Every expected
picture and mask comes from running the same graph in library mode (tests/comfyui_graph.py: the same node classes
and files, no server, no cache).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import comfyui_env as env
import numpy as np
import pytest

if env.comfy_root() is None:
    pytest.skip(env.SKIP_REASON, allow_module_level=True)

pytestmark = pytest.mark.usefixtures("one_thread")  # the server runs with one thread too: identical arithmetic

import comfyui_files  # noqa: E402
import comfyui_graph  # noqa: E402
from comfyui_server import ComfyServer, copy_comfyui  # noqa: E402

EXAMPLES_DIR = Path(__file__).parents[1] / "examples" / "comfyui"
EXAMPLES = ["sd15_one_subject", "sdxl_one_subject", "sd15_two_subjects"]
FILES = comfyui_files.TinyFiles()
SIZE, STEPS = 128, 2  # the tiny runs: 128 x 128 pixels (a 4 x 4 mask at SD 1.5's concept layer), 2 steps


def example(name: str) -> dict:
    return json.loads((EXAMPLES_DIR / f"{name}_api.json").read_text(encoding="utf-8"))


def tiny(prompt: dict, seed: int | None = None) -> dict:
    """An example prompt pointed at the tiny files, at SIZE pixels and STEPS steps (and another seed if given).

    The SDXL example gets the tiny SD 1.5 files too: a checkpoint ComfyUI detects as SDXL carries a full-size CLIP-G
    text encoder (695 M parameters); the SDXL path itself is tested in library mode (tests/test_comfyui.py).
    """
    prompt = copy.deepcopy(prompt)
    files = {"CheckpointLoaderSimple": ("ckpt_name", FILES.checkpoint),
             "CLIPVisionLoader": ("clip_name", FILES.clip_vision),
             "IPAdapterModelLoader": ("ipadapter_file", FILES.ipadapter)}
    for node in prompt.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind in files:
            inputs[files[kind][0]] = files[kind][1]
        elif kind == "EmptyLatentImage":
            inputs.update(width=SIZE, height=SIZE)
        elif kind == "KSampler":
            inputs.update(steps=STEPS, **({} if seed is None else {"seed": seed}))
    return prompt


def nodes_of(prompt: dict, class_type: str) -> list[str]:
    return [node_id for node_id, node in prompt.items() if node["class_type"] == class_type]


def as_saved(images) -> np.ndarray:
    """An IMAGE batch's first picture as SaveImage / PreviewImage write it: 255 x value, clipped, truncated to uint8."""
    return np.clip(255.0 * images[0].cpu().numpy(), 0, 255).astype(np.uint8)


def reference_images() -> list[str]:
    """Every reference picture the examples load (LoadImage), so the copy's input/ folder has them."""
    return sorted({node["inputs"]["image"] for name in EXAMPLES for node in example(name).values()
                   if node["class_type"] == "LoadImage"})


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory):
    """A temporary ComfyUI folder: ComfyUI's code, the pack installed as a user installs it, the tiny files (removed
    afterwards: the checkpoint alone is 474 MB, and pytest keeps its last three temporary folders)."""
    root = copy_comfyui(env.comfy_root(), tmp_path_factory.mktemp("comfyui") / "ComfyUI")
    script = Path(sys.executable).with_name("conceptrol")  # the console script pip installed
    installed = subprocess.run([str(script), "comfyui", "install", str(root)], capture_output=True, text=True,
                               timeout=120)
    assert installed.returncode == 0 and "installed the Conceptrol nodes" in installed.stdout, installed
    comfyui_files.write_tiny_files(root, reference_images())
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def server(comfyui, tmp_path_factory):
    log = tmp_path_factory.mktemp("comfyui-log") / "server.log"
    with ComfyServer(comfyui, log) as running:
        yield running
    assert not running.running
    assert "Traceback" not in _startup(log), _startup(log)


def _startup(log: Path) -> str:
    """The server's log up to 'Starting server', less import failures of comfy_extras nodes this test needs none of
    (they want kornia, spandrel, torchaudio), which ComfyUI reports and skips."""
    text = log.read_text(errors="replace").split("Starting server")[0]
    return "\n".join(block for block in text.split("\n\n") if "comfy_extras" not in block)


@pytest.fixture(scope="module")
def library(comfyui):
    """Run an API-format prompt in library mode over the same folder: node id -> outputs."""
    classes, done = comfyui_graph.node_classes(), {}

    def run(prompt: dict) -> dict:
        key = json.dumps(prompt, sort_keys=True)
        if key not in done:  # one library-mode run per distinct prompt: some tests compare with the same one
            with comfyui_graph.comfyui_folders(comfyui):
                done[key] = comfyui_graph.run_graph(prompt, classes)
        return done[key]

    return run


def test_the_server_lists_both_nodes_with_their_inputs(server):
    info = server.get_json("/object_info")
    conceptrol, mask = info["Conceptrol"], info["ConceptrolMask"]
    assert (conceptrol["display_name"], mask["display_name"]) == ("Conceptrol", "Conceptrol Mask")
    assert conceptrol["category"] == mask["category"] == "conceptrol"
    assert conceptrol["python_module"] == mask["python_module"] == "custom_nodes.ComfyUI-Conceptrol"
    input_order = conceptrol["input_order"]
    assert input_order == {"required": ["model", "clip", "prompt", "concepts"], "optional": ["masking"]}
    required = conceptrol["input"]["required"]
    assert [required[name][0] for name in input_order["required"]] == ["MODEL", "CLIP", "STRING", "STRING"]
    assert required["prompt"][1]["multiline"] is True
    assert conceptrol["input"]["optional"]["masking"][0] == ["global", "local"]
    assert conceptrol["input"]["optional"]["masking"][1]["default"] == "global"
    assert conceptrol["output"] == ["MODEL"]
    assert mask["input_order"] == {"required": ["model", "samples", "concept"]}
    required = mask["input"]["required"]
    assert [required[name][0] for name in ("model", "samples", "concept")] == ["MODEL", "LATENT", "INT"]
    assert {key: required["concept"][1][key] for key in ("default", "min")} == {"default": 0, "min": 0}
    assert mask["output"] == ["MASK", "IMAGE"] and mask["output_node"] is False
    assert all(info[name]["description"] for name in ("Conceptrol", "ConceptrolMask"))
    assert {"IPAdapterAdvanced", "IPAdapterModelLoader", "PrimitiveStringMultiline"} <= set(info)  # what examples use


@pytest.mark.parametrize("name", EXAMPLES)
def test_each_example_runs_through_prompt_history_and_view_as_in_library_mode(server, library, name):
    prompt = tiny(example(name))
    finished = server.run(prompt)
    assert finished.ok, finished.entry["status"]
    expected = library(prompt)
    shown = {}
    for node in nodes_of(prompt, "SaveImage") + nodes_of(prompt, "PreviewImage"):
        [ref] = finished.image_refs(node)
        shown[node] = server.image(ref)
        assert shown[node].shape == (SIZE, SIZE, 3)
        np.testing.assert_array_equal(shown[node], as_saved(expected[node][0]), err_msg=f"{name}, node {node}")
    [picture] = nodes_of(prompt, "SaveImage")
    assert shown[picture].std() > 10  # a picture, not a flat field
    masks = [shown[node] for node in nodes_of(prompt, "PreviewImage")]
    assert len(masks) == len(nodes_of(prompt, "ConceptrolMask")) and all(mask.std() > 10 for mask in masks)
    assert len({mask.tobytes() for mask in masks}) == len(masks)  # two subjects: two different masks


def from_the_first_step(prompt: dict) -> dict:
    """IPAdapter from step 0 (start_at 0, its default): it then acts before the concept layer's first read of a run,
    where a mask left over from the previous run would show (with the examples' start_at 0.2 it never could)."""
    for node in nodes_of(prompt, "IPAdapterAdvanced"):
        prompt[node]["inputs"]["start_at"] = 0.0
    return prompt


def test_a_new_seed_samples_again_and_its_masks_are_that_runs(server, library):
    first = from_the_first_step(tiny(example("sd15_one_subject"), seed=0))
    second = from_the_first_step(tiny(example("sd15_one_subject"), seed=1))
    [sampler], [save], [preview] = (nodes_of(first, kind) for kind in ("KSampler", "SaveImage", "PreviewImage"))
    before = server.run(first)
    after = server.run(second)
    assert before.ok and after.ok, after.entry["status"]
    loaded = set(nodes_of(second, "CheckpointLoaderSimple") + nodes_of(second, "Conceptrol"))
    assert sampler not in after.cached and loaded <= after.cached  # sampled again; checkpoint and Conceptrol cached
    expected = library(second)
    for node in (save, preview):
        np.testing.assert_array_equal(server.image(after.image_refs(node)[0]), as_saved(expected[node][0]))
        assert not np.array_equal(server.image(after.image_refs(node)[0]), server.image(before.image_refs(node)[0]))


def one_mask_preview(prompt: dict, concept: int) -> dict:
    """The two-subject example with a single Conceptrol Mask preview (the first), showing `concept`."""
    prompt = copy.deepcopy(prompt)
    first, *others = nodes_of(prompt, "ConceptrolMask")
    for mask in others:
        del prompt[mask]
        for preview in [n for n in nodes_of(prompt, "PreviewImage") if prompt[n]["inputs"]["images"][0] == mask]:
            del prompt[preview]
    prompt[first]["inputs"]["concept"] = concept
    return prompt


def test_changing_only_the_concept_index_reruns_only_the_mask_and_shows_that_concept(server, library):
    both = tiny(example("sd15_two_subjects"), seed=0)
    cat, bear = one_mask_preview(both, 0), one_mask_preview(both, 1)
    [mask] = nodes_of(cat, "ConceptrolMask")
    [preview] = nodes_of(cat, "PreviewImage")
    server.run(cat)
    finished = server.run(bear)
    assert finished.ok, finished.entry["status"]
    assert set(bear) - finished.cached == {mask, preview}  # the sampler, decoder and saver came from the cache
    expected = library(both)  # both mask nodes, one run: concept 0's and concept 1's masks
    concept_mask = {0: as_saved(expected[nodes_of(both, "PreviewImage")[0]][0]),
                    1: as_saved(expected[nodes_of(both, "PreviewImage")[1]][0])}
    assert not np.array_equal(concept_mask[0], concept_mask[1])
    np.testing.assert_array_equal(server.image(finished.image_refs(preview)[0]), concept_mask[1])


def test_a_missing_concept_is_an_execution_error_naming_it_and_the_server_keeps_serving(server, library):
    prompt = tiny(example("sd15_one_subject"), seed=5)
    [node] = nodes_of(prompt, "Conceptrol")
    prompt[node]["inputs"]["concepts"] = "cat"
    failed = server.run(prompt)
    assert not failed.ok
    [error] = failed.messages("execution_error")
    assert error["node_id"] == node and error["node_type"] == "Conceptrol"
    message = error["exception_message"]
    assert "concept 'cat' is not in the prompt 'a dog surfing a wave, sunny day'" in message
    assert "its words are 'a', 'dog', 'surfing', 'wave', 'sunny', 'day'" in message and "</w>" not in message
    fixed = tiny(example("sd15_one_subject"), seed=5)
    again = server.run(fixed)  # the same server samples the next prompt
    assert again.ok, again.entry["status"]
    [save] = nodes_of(fixed, "SaveImage")
    np.testing.assert_array_equal(server.image(again.image_refs(save)[0]), as_saved(library(fixed)[save][0]))
    assert server.get_json("/queue") == {"queue_running": [], "queue_pending": []}


def test_a_cache_lru_server_pairs_each_latent_with_its_own_runs_mask(comfyui, library, tmp_path):
    """--cache-lru keeps outputs of earlier prompts: back to seed 0 with another concept, the KSampler's LATENT comes
    from the cache (the seed 0 run), while the Conceptrol output was last sampled with seed 1."""
    both = {seed: tiny(example("sd15_two_subjects"), seed=seed) for seed in (0, 1)}
    [preview] = nodes_of(one_mask_preview(both[0], 0), "PreviewImage")
    with ComfyServer(comfyui, tmp_path / "server.log", ("--cache-lru", "100")) as server:
        for seed, concept in ((0, 0), (1, 0)):
            assert server.run(one_mask_preview(both[seed], concept)).ok
        finished = server.run(one_mask_preview(both[0], 1))
        assert finished.ok, finished.entry["status"]
        assert set(nodes_of(both[0], "KSampler")) <= finished.cached  # the seed 0 sampling was not run again
        shown = server.image(finished.image_refs(preview)[0])
        group = server.process.pid
    assert not server.running  # stopped, with its whole process group
    deadline = time.monotonic() + 10
    while _group_alive(group) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _group_alive(group)
    expected = library(both[0])
    np.testing.assert_array_equal(shown, as_saved(expected[nodes_of(both[0], "PreviewImage")[1]][0]))
    assert not np.array_equal(shown, as_saved(library(both[1])[nodes_of(both[1], "PreviewImage")[1]][0]))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_the_examples_are_what_build_py_writes(tmp_path):
    import runpy

    written = runpy.run_path(str(EXAMPLES_DIR / "build.py"))["write_all"](tmp_path)
    assert sorted(path.name for path in written) == sorted(
        path.name for path in EXAMPLES_DIR.glob("*.json")), "examples/comfyui has files build.py does not write"
    for path in written:
        assert path.read_text() == (EXAMPLES_DIR / path.name).read_text(), "run python examples/comfyui/build.py"


# What the page logs without the internet, a user.css or the workflow-templates package; any other error fails.
EXPECTED_CONSOLE_ERRORS = ("Failed to load resource", "Error fetching workflow templates")


def test_the_ui_examples_open_in_comfyuis_page_and_queue_as_their_api_files(server, tmp_path):
    """Each UI-format example, loaded as a drop loads it, gives ComfyUI's frontend the API-format example's prompt.

    CONCEPTROL_SCREENSHOT_DIR=docs/comfyui keeps a screenshot of each graph (the README shows them)."""
    from playwright.sync_api import sync_playwright
    from test_ui_browser import CHROMIUM_FLAGS, chromium_path

    shots = Path(os.environ.get("CONCEPTROL_SCREENSHOT_DIR", tmp_path))
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
        try:
            server.post_json("/settings/Comfy.TutorialCompleted", True)  # no first-run template browser
            page = browser.new_page(viewport={"width": 1800, "height": 1100})
            page.goto(server.url)
            page.wait_for_function("window.app && window.app.graph", timeout=120_000)
            page.evaluate("() => window.app.extensionManager.setting.set('Comfy.Minimap.Visible', false)")
            page.wait_for_timeout(500)  # errors from here on: the page's own start-up is not under test
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            for name in EXAMPLES:
                workflow = json.loads((EXAMPLES_DIR / f"{name}.json").read_text(encoding="utf-8"))
                page.evaluate("([graph, name]) => window.app.loadGraphData(graph, true, true, name)", [workflow, name])
                assert page.evaluate("() => window.app.graph.nodes.length") == len(workflow["nodes"])
                queued = page.evaluate("async () => (await window.app.graphToPrompt()).output")
                assert _graph(queued) == _graph(example(name)), name
                page.evaluate("() => window.app.extensionManager.command.execute('Comfy.Canvas.FitView')")
                page.wait_for_timeout(500)
                page.screenshot(path=str(shots / f"comfyui-{name}.png"))
        finally:
            browser.close()
    unexpected = [error for error in errors if not error.startswith(EXPECTED_CONSOLE_ERRORS)]
    assert not unexpected, unexpected


def _graph(prompt: dict) -> dict:
    """What a prompt runs: each node's class and inputs (not the titles the page shows)."""
    return {node_id: (node["class_type"], node["inputs"]) for node_id, node in prompt.items()}
