"""Qwen-Image-Edit-Plus through the front-ends as users run them: `conceptrol generate` with --reference/--concept
pairs and true CFG, the offline demo, the web UI's backend, `conceptrol analyze` with the image it edits, and the
weightless concept check a model folder gets before its weights load.

The tiny pipeline's VAE downsamples 64 times (the real one 8 times), so its sizes are multiples of 128 pixels."""

import json
import subprocess
import sys

import pytest
from helpers import cli, dog_and_hat
from PIL import Image, ImageDraw

from conceptrol.app.offline_demo import reference_picture
from conceptrol.cli import main

PROMPT = "a dog wearing a hat"
SIZE = "256x256"


@pytest.fixture
def refs(tmp_path):
    return dog_and_hat(tmp_path)


def test_generate_two_references_as_a_user_runs_it(tmp_path, refs):
    """In the user's default environment: no offline or verbosity switches."""
    dog, hat = refs
    result = subprocess.run([sys.executable, "-m", "conceptrol.cli", "generate", "--model", "tiny-qwen-edit", "--prompt",
                             PROMPT, "--reference", str(dog), "--concept", "dog", "--reference", str(hat), "--concept",
                             "hat", "--size", SIZE, "--steps", "2", "--save-masks", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["global-seed0-0-mask0-dog.png", "global-seed0-0-mask1-hat.png",
                                                     "global-seed0-0.json", "global-seed0-0.png"]
    sidecar = json.loads((out / "global-seed0-0.json").read_text())
    assert sidecar["concepts"] == ["dog", "hat"] and sidecar["architecture"] == "qwen-edit"
    assert sidecar["concept_layer"] == "transformer_blocks.19" and sidecar["adapter"] == "references"
    assert sidecar["guidance"] == 4.0 and sidecar["negative_prompt"] == " "  # Qwen-Image-Edit-2509's true CFG
    assert sidecar["references"] == [str(dog.resolve()), str(hat.resolve())]
    assert Image.open(out / "global-seed0-0.png").size == (256, 256)
    masks = [Image.open(out / f"global-seed0-0-mask{i}-{c}.png") for i, c in enumerate(("dog", "hat"))]
    assert masks[0].tobytes() != masks[1].tobytes()  # each reference read from its own word
    assert "Traceback" not in result.stderr


def test_a_global_reference_and_the_users_negative_prompt(tmp_path, refs, capsys):
    dog, hat = refs
    code, err = cli(capsys, "generate", "--model", "tiny-qwen-edit", "--prompt", PROMPT, "--reference", str(dog),
                    "--concept", "dog", "--reference", str(hat), "--concept", "-", "--size", SIZE, "--steps", "1",
                    "--negative-prompt", "blurry", "--guidance", "2.5", "--save-masks", "--out", str(tmp_path / "out"))
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["global-seed0-0-mask0-dog.png", "global-seed0-0.json", "global-seed0-0.png"]
    sidecar = json.loads((tmp_path / "out" / "global-seed0-0.json").read_text())
    assert sidecar["concepts"] == ["dog", "-"] and sidecar["negative_prompt"] == "blurry" and sidecar["guidance"] == 2.5


@pytest.mark.parametrize("extra, message", [
    (["--concept", "dog"], "got 1 concept(s) for 2 reference image(s); pass one --concept per --reference"),
    (["--concept", "dog", "--concept", "cat"], "concept 'cat' not found in prompt 'a dog wearing a hat'"),
    (["--concept", "dog", "--concept", "hat", "--masking", "local"], "Qwen-Image-Edit-Plus has no local masking"),
    (["--concept", "dog", "--concept", "hat", "--size", "192x256"], "multiples of 128 pixels"),
    (["--concept", "dog", "--concept", "hat", "--concept-layer", "transformer_blocks.60"],
     "'transformer_blocks.60' is not a block of this transformer"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, refs, capsys, extra, message):
    dog, hat = refs
    code, err = cli(capsys, "generate", "--model", "tiny-qwen-edit", "--prompt", PROMPT, "--reference", str(dog),
                    "--reference", str(hat), *extra, "--out", str(tmp_path / "out"))
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_the_demo_shows_both_references_and_their_masks(tmp_path, capsys):
    code, err = cli(capsys, "demo", "--model", "qwen-edit", "--steps", "2", "--out", str(tmp_path / "demo"))
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "demo").iterdir())
    assert names == ["NOTE.txt", "global-seed0-0-mask0-dog.png", "global-seed0-0-mask1-wave.png", "global-seed0-0.json",
                     "global-seed0-0.png", "none-seed0-0.json", "none-seed0-0.png", "reference-wave.png",
                     "reference.png"]
    assert "Qwen-Image-Edit-Plus" in (tmp_path / "demo" / "NOTE.txt").read_text()
    ours, stock = (Image.open(tmp_path / "demo" / f"{name}-seed0-0.png") for name in ("global", "none"))
    assert ours.tobytes() != stock.tobytes()  # Conceptrol changed the stock image


def test_evaluate_runs_the_stock_pipeline_and_conceptrol(tmp_path, capsys):
    reference_picture(64).save(tmp_path / "dog.png")
    (tmp_path / "set.jsonl").write_text(json.dumps({"id": "d0", "image": "dog.png", "prompt": "a dog on the moon",
                                                    "concept": "dog"}))
    code = main(["evaluate", "--benchmark", str(tmp_path / "set.jsonl"), "--model", "tiny-qwen-edit", "--steps", "1",
                 "--size", "256x256", "--no-score", "--out", str(tmp_path / "run")])
    assert code == 0, capsys.readouterr().err
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["settings"]["adapter"] == "references" and run["settings"]["architecture"] == "qwen-edit"
    images = sorted(p.relative_to(tmp_path / "run" / "images").parts[0] for p in (tmp_path / "run" / "images").rglob("*.png"))
    assert images == ["conceptrol", "qwen-edit"]
    ours, stock = (Image.open(next((tmp_path / "run" / "images" / name).rglob("*.png"))) for name in images)
    assert ours.size == stock.size == (256, 256) and ours.tobytes() != stock.tobytes()


def test_the_web_ui_backend_shows_a_mask_per_reference(refs):
    from conceptrol.core.concepts import Concept
    from conceptrol.demo.backend import DEMO_CHOICES, CompareRequest, LocalBackend

    backend = LocalBackend(DEMO_CHOICES)
    request = CompareRequest(model="tiny-qwen-edit", prompt=PROMPT, references=refs,
                             concepts=(Concept("dog"), Concept("hat")), scale=1.0, start=0.0, steps=1, seed=0,
                             size=(256, 256))
    result = backend(request, lambda *_: None)
    assert [label for _, label in result.overlays] == ["mask of 'dog'", "mask of 'hat'"]
    assert result.conceptrol.size == (256, 256)


def test_the_block_analysis_reads_the_edited_image_and_its_best_block_drives_generate(tmp_path, refs, capsys):
    mask = Image.new("L", (256, 256), 0)
    ImageDraw.Draw(mask).rectangle((64, 64, 192, 192), fill=255)
    mask.save(tmp_path / "mask.png")
    dog, hat = refs
    case = ["analyze", "--model", "tiny-qwen-edit", "--prompt", "a dog on a beach", "--concept", "dog", "--mask",
            str(tmp_path / "mask.png"), "--steps", "1", "--size", "256x256"]
    code, err = cli(capsys, *case, "--out", str(tmp_path / "none"))
    assert code == 2 and len(err) == 1 and "Qwen-Image-Edit edits an image: pass --reference IMAGE" in err[0], err
    code, err = cli(capsys, *case, "--reference", str(tmp_path / "missing.png"), "--out", str(tmp_path / "none"))
    assert code == 2 and len(err) == 1 and "missing.png" in err[0], err
    assert not (tmp_path / "none").exists()
    code, err = cli(capsys, *case, "--reference", str(dog), "--out", str(tmp_path / "analysis"))
    assert code == 0, err
    analysis = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert analysis["architecture"] == "qwenimage" and len(analysis["layers"]) == 60
    assert analysis["preset"] == "transformer_blocks.19"
    assert analysis["settings"] == {"num_inference_steps": 1, "width": 256, "height": 256,
                                    "references": [str(dog.resolve())]}  # what reproduces its image
    code, err = cli(capsys, "generate", "--model", "tiny-qwen-edit", "--prompt", PROMPT, "--reference", str(dog),
                    "--concept", "dog", "--size", SIZE, "--steps", "1", "--concept-layer",
                    f"auto:{tmp_path / 'analysis'}", "--out", str(tmp_path / "out"))
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "global-seed0-0.json").read_text())["concept_layer"] == analysis["best"]


def test_a_reference_is_refused_where_the_analysis_reads_the_model_alone(tmp_path, refs, capsys):
    dog, _ = refs
    code, err = cli(capsys, "analyze", "--model", "tiny-sd15", "--prompt", "a dog", "--concept", "dog", "--reference",
                    str(dog), "--out", str(tmp_path / "analysis"))
    assert code == 2 and "--reference applies to FLUX.2 and Qwen-Image-Edit" in err[0], err


@pytest.mark.parametrize("pipeline", ["QwenImageEditPlusPipeline", "QwenImageEditPipeline"])
def test_the_weightless_check_places_concepts_where_the_loaded_pipeline_does(pipeline):
    """A model folder is checked from its processor alone (no weights): the same spans as the loaded pipeline's."""
    from conceptrol.core.errors import ConceptrolError
    from conceptrol.qwenimage.text import locate_concept, locate_in_template
    from conceptrol.tiny.qwen import tiny_qwen_edit, tiny_qwen_edit_plus

    pipe = (tiny_qwen_edit_plus if pipeline == "QwenImageEditPlusPipeline" else tiny_qwen_edit)()
    for concept in ("dog", "hat", "a dog"):
        assert locate_in_template(pipe.processor, PROMPT, concept, pipeline) == locate_concept(pipe, PROMPT, concept)
    assert locate_in_template(pipe.processor, PROMPT, "hat", pipeline) != locate_in_template(pipe.processor, PROMPT,
                                                                                            "dog", pipeline)
    with pytest.raises(ConceptrolError, match="concept 'cat' not found"):
        locate_in_template(pipe.processor, PROMPT, "cat", pipeline)


def test_the_analysis_image_is_the_stock_edit_with_true_cfg(tmp_path, refs, capsys):
    """--guidance and --negative-prompt reach Qwen-Image-Edit as its true CFG: the case image is the stock pipeline's."""
    import numpy as np
    import torch

    from conceptrol.core.images import load_reference_image
    from conceptrol.tiny.qwen import tiny_qwen_edit_plus

    mask = Image.new("L", (256, 256), 0)
    ImageDraw.Draw(mask).rectangle((64, 64, 192, 192), fill=255)
    mask.save(tmp_path / "mask.png")
    dog, _ = refs
    code, err = cli(capsys, "analyze", "--model", "tiny-qwen-edit", "--reference", str(dog), "--prompt",
                    "a dog on a beach", "--concept", "dog", "--mask", str(tmp_path / "mask.png"), "--steps", "2",
                    "--size", "256x256", "--guidance", "2.5", "--negative-prompt", "blurry", "--seed", "3", "--out",
                    str(tmp_path / "analysis"))
    assert code == 0, err
    stock = tiny_qwen_edit_plus()(prompt="a dog on a beach", image=[load_reference_image(dog)], height=256, width=256,
                                  num_inference_steps=2, true_cfg_scale=2.5, negative_prompt="blurry",
                                  generator=torch.Generator("cpu").manual_seed(3)).images[0]
    analysed = Image.open(tmp_path / "analysis" / "case-0.png")
    assert np.array_equal(np.asarray(analysed), np.asarray(stock))
