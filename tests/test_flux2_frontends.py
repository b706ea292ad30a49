"""FLUX.2 through the front-ends as users run them: `conceptrol generate` with --reference/--concept pairs, the
offline demo, `evaluate`, the web UI's backend, and a model folder in the real diffusers layout (checked before its
weights load, then loaded and run)."""

import json
import subprocess
import sys

import pytest
from helpers import cli, dog_and_hat
from PIL import Image

from conceptrol.cli import main

PROMPT = "a dog wearing a hat"


@pytest.fixture
def refs(tmp_path):
    return dog_and_hat(tmp_path)


def test_generate_two_references_as_a_user_runs_it(tmp_path, refs):
    """In the user's default environment: no offline or verbosity switches."""
    dog, hat = refs
    result = subprocess.run([sys.executable, "-m", "conceptrol.cli", "generate", "--model", "tiny-flux2", "--prompt",
                             PROMPT, "--reference", str(dog), "--concept", "dog", "--reference", str(hat), "--concept",
                             "hat", "--size", "64x64", "--steps", "2", "--save-masks", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["global-seed0-0-mask0-dog.png", "global-seed0-0-mask1-hat.png",
                                                     "global-seed0-0.json", "global-seed0-0.png"]
    sidecar = json.loads((out / "global-seed0-0.json").read_text())
    assert sidecar["concepts"] == ["dog", "hat"] and sidecar["architecture"] == "flux2-klein"
    assert sidecar["concept_layer"] == "transformer_blocks.7" and sidecar["adapter"] == "references"
    assert sidecar["references"] == [str(dog.resolve()), str(hat.resolve())]
    assert "Traceback" not in result.stderr


def test_a_global_reference_has_no_mask_file(tmp_path, refs, capsys):
    dog, hat = refs
    code, err = cli(capsys, "generate", "--model", "tiny-flux2", "--prompt", PROMPT, "--reference", str(dog),
                    "--concept", "dog", "--reference", str(hat), "--concept", "-", "--size", "64x64", "--steps", "1",
                    "--save-masks", "--out", str(tmp_path / "out"))
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["global-seed0-0-mask0-dog.png", "global-seed0-0.json", "global-seed0-0.png"]
    assert json.loads((tmp_path / "out" / "global-seed0-0.json").read_text())["concepts"] == ["dog", "-"]


@pytest.mark.parametrize("extra, message", [
    (["--concept", "dog"], "got 1 concept(s) for 2 reference image(s); pass one --concept per --reference"),
    (["--concept", "dog", "--concept", "cat"], "concept 'cat' not found in prompt 'a dog wearing a hat'"),
    (["--concept", "-", "--concept", "-"], "every --concept is '-'"),
    (["--concept", "dog", "--concept", "hat", "--masking", "local"], "FLUX.2 [klein] has no local masking"),
    (["--concept", "dog", "--concept", "hat", "--negative-prompt", "blurry"], "--negative-prompt applies to SD and Qwen"),
    (["--concept", "dog", "--concept", "hat", "--concept-layer", "transformer_blocks.8"],
     "'transformer_blocks.8' is not a block of this transformer"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, refs, capsys, extra, message):
    dog, hat = refs
    code, err = cli(capsys, "generate", "--model", "tiny-flux2", "--prompt", PROMPT, "--reference", str(dog),
                    "--reference", str(hat), *extra, "--out", str(tmp_path / "out"))
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_references_the_model_cannot_take_are_refused_in_one_line(tmp_path, refs, capsys):
    dog, _ = refs
    Image.new("RGB", (32, 48), "red").save(tmp_path / "small.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    for reference, message in [(tmp_path / "small.png", "reference 1 is 32x48 pixels; FLUX.2 needs both sides at "
                                                         "least 64"),
                               (tmp_path / "broken.png", "broken.png"), (tmp_path / "missing.png", "missing.png")]:
        code, err = cli(capsys, "generate", "--model", "tiny-flux2", "--prompt", PROMPT, "--reference", str(reference),
                        "--concept", "dog", "--out", str(tmp_path / "out"))
        assert code == 2 and len(err) == 1 and message in err[0], err
    code, err = cli(capsys, "generate", "--model", "tiny-sd15", "--prompt", PROMPT, "--reference", str(dog),
                    "--concept", "dog", "--reference", str(dog), "--concept", "-", "--out", str(tmp_path / "out"))
    assert code == 2 and "applies to FLUX.2 and Qwen-Image-Edit" in err[0], err


def test_the_demo_shows_both_references_and_their_masks(tmp_path, capsys):
    code, err = cli(capsys, "demo", "--model", "flux2", "--steps", "2", "--out", str(tmp_path / "demo"))
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "demo").iterdir())
    assert names == ["NOTE.txt", "global-seed0-0-mask0-dog.png", "global-seed0-0-mask1-wave.png", "global-seed0-0.json",
                     "global-seed0-0.png", "none-seed0-0.json", "none-seed0-0.png", "reference-wave.png",
                     "reference.png"]
    assert "FLUX.2 [klein]" in (tmp_path / "demo" / "NOTE.txt").read_text()


def test_evaluate_runs_the_stock_pipeline_and_conceptrol(tmp_path, capsys):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "dog.png")
    (tmp_path / "set.jsonl").write_text(json.dumps({"id": "d0", "image": "dog.png", "prompt": "a dog on the moon",
                                                    "concept": "dog"}))
    code = main(["evaluate", "--benchmark", str(tmp_path / "set.jsonl"), "--model", "tiny-flux2", "--steps", "1",
                 "--size", "32x32", "--no-score", "--out", str(tmp_path / "run")])
    assert code == 0, capsys.readouterr().err
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["settings"]["adapter"] == "references" and run["settings"]["architecture"] == "flux2-klein"
    images = sorted(p.relative_to(tmp_path / "run" / "images").parts[0] for p in (tmp_path / "run" / "images").rglob("*.png"))
    assert images == ["conceptrol", "flux2"]


def test_the_web_ui_backend_shows_a_mask_per_reference(refs):
    from conceptrol.core.concepts import Concept
    from conceptrol.demo.backend import DEMO_CHOICES, CompareRequest, LocalBackend

    backend = LocalBackend(DEMO_CHOICES)
    request = CompareRequest(model="tiny-flux2", prompt=PROMPT, references=refs, concepts=(Concept("dog"), Concept("hat")),
                             scale=1.0, start=0.0, steps=1, seed=0, size=(64, 64))
    result = backend(request, lambda *_: None)
    assert [label for _, label in result.overlays] == ["mask of 'dog'", "mask of 'hat'"]
    assert result.conceptrol.size == (64, 64)


def test_the_web_ui_backend_keeps_a_reference_without_concept_global(refs):
    from conceptrol.core.concepts import Concept
    from conceptrol.core.errors import ConceptrolError
    from conceptrol.demo.backend import DEMO_CHOICES, CompareRequest, LocalBackend

    loads = []
    backend = LocalBackend(DEMO_CHOICES)
    load = backend._load
    backend._load = lambda choice: loads.append(choice.key) or load(choice)
    ask = dict(prompt=PROMPT, references=refs, scale=1.0, start=0.0, steps=1, seed=0, size=(64, 64))
    for model, concepts, message in [("tiny-sd15", (Concept("dog"), None), "applies to FLUX.2 and Qwen-Image-Edit"),
                                     ("tiny-flux2", (None, None), "every reference is marked 'no concept'")]:
        with pytest.raises(ConceptrolError, match=message):
            backend(CompareRequest(model=model, concepts=concepts, **ask), lambda *_: None)
    assert loads == []  # refused before any model loads
    result = backend(CompareRequest(model="tiny-flux2", concepts=(Concept("dog"), None), **ask), lambda *_: None)
    assert [label for _, label in result.overlays] == ["mask of 'dog'"]
    assert result.conceptrol.tobytes() != result.vanilla.tobytes()


def test_a_model_folder_in_the_diffusers_layout_is_checked_before_its_weights_load(tmp_path, refs, capsys):
    from conceptrol.tiny.flux2 import tiny_flux2_klein

    folder = tmp_path / "klein"
    tiny_flux2_klein(double=1, single=1, distilled=True).save_pretrained(folder)
    dog, hat = refs
    common = ["generate", "--model", str(folder), "--prompt", PROMPT, "--reference", str(dog), "--reference", str(hat),
              "--size", "64x64", "--steps", "1", "--device", "cpu"]
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").rename(tmp_path / "weights")  # no weights
    code, err = cli(capsys, *common, "--concept", "dog", "--concept", "cat", "--out", str(tmp_path / "a"))
    assert code == 2 and "concept 'cat' not found in prompt" in err[0], err
    code, err = cli(capsys, *common, "--concept", "dog", "--concept", "hat", "--out", str(tmp_path / "a"),
                    "--concept-layer", "transformer_blocks.1")
    assert code == 2 and "'transformer_blocks.1' is not a block" in err[0], err
    (tmp_path / "weights").rename(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    code, err = cli(capsys, *common, "--concept", "dog", "--concept", "hat", "--concept-layer", "transformer_blocks.0",
                    "--out", str(tmp_path / "b"))
    assert code == 0, err
    assert json.loads((tmp_path / "b" / "global-seed0-0.json").read_text())["concept_layer"] == "transformer_blocks.0"


def test_the_block_analysis_reads_flux2_and_its_best_block_drives_generate(tmp_path, refs, capsys):
    from PIL import ImageDraw

    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 48, 48), fill=255)
    mask.save(tmp_path / "mask.png")
    code, err = cli(capsys, "analyze", "--model", "tiny-flux2", "--prompt", "a dog on a beach", "--concept", "dog",
                    "--mask", str(tmp_path / "mask.png"), "--steps", "1", "--size", "64x64", "--out",
                    str(tmp_path / "analysis"))
    assert code == 0, err
    analysis = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert analysis["architecture"] == "flux2" and len(analysis["layers"]) == 8 + 48
    assert analysis["layers"][:2] == ["transformer_blocks.0", "transformer_blocks.1"]
    dog, hat = refs
    code, err = cli(capsys, "generate", "--model", "tiny-flux2", "--prompt", PROMPT, "--reference", str(dog),
                    "--concept", "dog", "--size", "64x64", "--steps", "1", "--concept-layer",
                    f"auto:{tmp_path / 'analysis'}", "--out", str(tmp_path / "out"))
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "global-seed0-0.json").read_text())["concept_layer"] == analysis["best"]


def test_recording_leaves_the_stock_image_as_it_is():
    import numpy as np
    import torch

    from conceptrol.analysis import analyze_blocks
    from conceptrol.tiny.flux2 import tiny_flux2_klein

    pipe = tiny_flux2_klein(double=2, single=2)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=2, height=32, width=32, guidance_scale=2.0, max_sequence_length=64)
    mask = np.zeros((32, 32))
    mask[8:24, 8:24] = 1
    analysis = analyze_blocks(pipe, "a dog on a beach", "dog", mask, seed=3, **kwargs)
    stock = pipe(prompt="a dog on a beach", generator=torch.Generator().manual_seed(3), **kwargs).images[0]
    assert np.array_equal(np.asarray(analysis.cases[0].image), np.asarray(stock))
    assert analysis.layers == ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
                               "single_transformer_blocks.1"]
    assert analysis.maps["transformer_blocks.0"][0].shape == (2, 8, 8)  # [steps, rows, cols] of the first case
