"""`conceptrol analyze` as a user runs it, on tiny SD 1.5, SDXL and FLUX.1 folders saved as the hub lays them out."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import run_main
from PIL import Image

PROMPT = "a photo of a dog surfing a wave"
RUN = ["--steps", "2", "--size", "48x32"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Stock pipelines (no adapter) saved as `hf download` leaves them, and a mask of the image's shape."""
    from conceptrol.tiny import tiny_flux, tiny_sd15_pipeline, tiny_sdxl_pipeline

    root = tmp_path_factory.mktemp("analysis-models")
    for name, build in (("sd15", tiny_sd15_pipeline), ("sdxl", tiny_sdxl_pipeline), ("flux", tiny_flux)):
        pipe = build()
        if getattr(pipe, "image_encoder", None) is not None:
            pipe.register_modules(image_encoder=None)
        pipe.save_pretrained(root / name)
    mask = np.zeros((64, 96), dtype=np.uint8)
    mask[16:48, 24:72] = 255  # twice the image's size, the same shape
    Image.fromarray(mask).save(root / "mask.png")
    return root


def user_environment() -> dict:
    """A user's shell: none of the test suite's quiet or offline switches."""
    return {k: v for k, v in os.environ.items()
            if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "TRANSFORMERS_OFFLINE")}


def test_analyze_on_an_sd15_folder_in_a_users_shell_writes_the_analysis_and_never_overwrites(folders, tmp_path):
    out = tmp_path / "analysis"
    command = [str(Path(sys.executable).with_name("conceptrol")), "analyze", "--model", str(folders / "sd15"),
               "--prompt", PROMPT, "--concept", "dog", "--mask", str(folders / "mask.png"), "--seed", "0", *RUN,
               "--out", str(out)]
    first = subprocess.run(command, capture_output=True, text=True, env=user_environment(), timeout=300)
    assert first.returncode == 0, first.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["analysis.html", "analysis.json", "auc_over_steps.png", "case-0.png", "maps.safetensors",
                     "mask-0.png", "panel.png"]
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["model"] == str((folders / "sd15").resolve()) and analysis["architecture"] == "sd15"
    assert len(analysis["layers"]) == 10 and all(layer.endswith(".attn2") for layer in analysis["layers"])
    assert analysis["layers"][0].startswith("down_blocks") and analysis["layers"][-1].startswith("up_blocks")
    assert analysis["cases"] == [{"prompt": PROMPT, "concept": "dog", "seed": 0, "mask": str(folders / "mask.png"),
                                  "mask_source": str(folders / "mask.png"), "image": "case-0.png"}]
    assert all(len(per_case) == 1 and len(per_case[0]) == 2 for per_case in analysis["auc"].values())
    means = {layer: sum(per_case[0]) / 2 for layer, per_case in analysis["auc"].items()}
    assert analysis["mean_auc"] == pytest.approx(means)
    assert analysis["ranking"] == sorted(analysis["layers"], key=lambda layer: -means[layer])
    assert analysis["best"] == analysis["ranking"][0] and f"best block: {analysis['best']}" in first.stdout
    assert f"--concept-layer {analysis['best']}" in first.stdout
    with Image.open(out / "case-0.png") as image:
        assert image.size == (48, 32)
    for picture in ("auc_over_steps.png", "panel.png"):
        with Image.open(out / picture) as image:
            assert image.width > 300
    page = (out / "analysis.html").read_text()
    assert page.count("<tr>") == 11 and "addEventListener(\"click\"" in page and 'alt="panel"' in page
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = subprocess.run(command, capture_output=True, text=True, env=user_environment(), timeout=300)
    assert again.returncode == 0, again.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in before} == before
    assert "analysis-2.json" in {p.name for p in out.iterdir()}


@pytest.mark.parametrize("model,architecture,blocks", [("sdxl", "sdxl", 19), ("flux", "flux", 57)])
def test_analyze_on_sdxl_and_flux_folders_names_blocks_as_concept_layer_takes_them(folders, tmp_path, capsys, model,
                                                                                    architecture, blocks):
    code, out, err = run_main(capsys, "analyze", "--model", str(folders / model), "--prompt", PROMPT, "--concept",
                              "dog", "--mask", str(folders / "mask.png"), *RUN, "--out", str(tmp_path / "a"))
    assert code == 0, err
    analysis = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert analysis["architecture"] == architecture and len(analysis["layers"]) == blocks
    if model == "flux":
        assert analysis["layers"][18] == "transformer_blocks.18" == analysis["preset"]
        assert analysis["layers"][-1] == "single_transformer_blocks.37"
    else:
        assert analysis["preset"] == "up_blocks.0.attentions.1.transformer_blocks.3.attn2" in analysis["layers"]


def test_many_cases_from_a_jsonl_file_ranked_on_a_steps_range(folders, tmp_path, capsys):
    lines = [{"prompt": PROMPT, "concept": "dog", "mask": "mask.png", "seed": 0},
             {"prompt": "a cat on a sofa", "concept": "cat", "mask": str(folders / "mask.png"), "seed": 1}]
    (folders / "cases.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    code, out, err = run_main(capsys, "analyze", "--model", str(folders / "sd15"), "--cases",
                              str(folders / "cases.jsonl"), "--steps", "3", "--size", "48x32", "--steps-range", "1:3",
                              "--out", str(tmp_path / "a"))
    assert code == 0, err
    analysis = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert [case["seed"] for case in analysis["cases"]] == [0, 1] and analysis["steps_range"] == [1, 3]
    for layer, per_case in analysis["auc"].items():
        assert analysis["mean_auc"][layer] == pytest.approx(sum(c[k] for c in per_case for k in (1, 2)) / 4)


@pytest.mark.parametrize("args,message", [
    (["--mask", "{bad}"], "is not an image Pillow can read"),
    (["--mask", "{black}"], "has no subject pixel"),
    (["--mask", "{white}"], "has no background pixel"),
    (["--mask", "{square}"], "another aspect ratio than the 48x32 image"),
    (["--mask", "{mask}", "--steps-range", "2-5"], "--steps-range must look like 0:10"),
    (["--mask", "{mask}", "--steps-range", "1:9"], "--steps-range 1:9 is past the 2 steps run"),
    (["--mask", "{mask}", "--concept", "horse"], "concept 'horse' not found in prompt"),
    (["--cases", "{noprompt}"], "cases.jsonl line 2 has no prompt"),
    ([], "could not load the owlv2-sam segmenter's model from 'google/owlv2-base-patch16-ensemble'"),
])
def test_bad_input_is_one_line_before_any_weights_load(folders, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setattr("conceptrol.app.loading.load_base_pipeline", lambda *a, **k: pytest.fail("loaded weights"))
    (tmp_path / "bad.png").write_text("not an image")
    for name, value in (("black", 0), ("white", 255)):
        Image.new("L", (48, 32), value).save(tmp_path / f"{name}.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "square.png")
    (tmp_path / "cases.jsonl").write_text(json.dumps({"prompt": PROMPT, "concept": "dog", "mask": str(folders / "mask.png")})
                                          + "\n" + json.dumps({"concept": "dog"}) + "\n")
    files = {"bad": tmp_path / "bad.png", "black": tmp_path / "black.png", "white": tmp_path / "white.png",
             "square": tmp_path / "square.png", "mask": folders / "mask.png", "noprompt": tmp_path / "cases.jsonl"}
    args = [a.format(**files) for a in args]
    case = [] if "--cases" in args else ["--prompt", PROMPT] + ([] if "--concept" in args else ["--concept", "dog"])
    code, out, err = run_main(capsys, "analyze", "--model", str(folders / "sd15"), *case, *args, *RUN,
                              "--out", str(tmp_path / "a"))
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "a").exists()
    if not args:
        assert "pass --mask FILE (the subject white on black) for every case" in err[0]


def test_the_best_block_feeds_generate_through_concept_layer_auto(folders, tmp_path, capsys):
    code, _, err = run_main(capsys, "analyze", "--model", str(folders / "sd15"), "--prompt", PROMPT, "--concept", "dog",
                            "--mask", str(folders / "mask.png"), *RUN, "--out", str(tmp_path / "a"))
    assert code == 0, err
    best = json.loads((tmp_path / "a" / "analysis.json").read_text())["best"]
    Image.new("RGB", (32, 32), "brown").save(tmp_path / "dog.png")
    generate = ["generate", "--model", "tiny-sd15", "--prompt", PROMPT, "--image", str(tmp_path / "dog.png"),
                "--concept", "dog", "--steps", "2", "--size", "48x32"]
    code, _, err = run_main(capsys, *generate, "--concept-layer", f"auto:{tmp_path / 'a'}", "--out", str(tmp_path / "g"))
    assert code == 0, err
    assert json.loads((tmp_path / "g" / "global-seed0-0.json").read_text())["concept_layer"] == best
    code, _, err = run_main(capsys, "analyze", "--model", str(folders / "sdxl"), "--prompt", PROMPT, "--concept", "dog",
                            "--mask", str(folders / "mask.png"), *RUN, "--out", str(tmp_path / "x"))
    assert code == 0, err
    code, _, err = run_main(capsys, *generate, "--concept-layer", f"auto:{tmp_path / 'x'}", "--out", str(tmp_path / "h"))
    assert code == 2 and "that analysis is of an sdxl model, this is an sd15 model" in err[0]


def test_evaluate_sweeps_concept_layers_and_the_report_shows_each(tmp_path, capsys):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "dog.png")
    rows = [{"id": "d", "image": "dog.png", "prompt": "a dog on the moon", "concept": "dog"}]
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    layers = ["up_blocks.1.attentions.0.transformer_blocks.0.attn2", "mid_block.attentions.0.transformer_blocks.0.attn2"]
    code, out, err = run_main(capsys, "evaluate", "--benchmark", str(tmp_path / "set.jsonl"), "--model", "tiny-sd15",
                              "--steps", "2", "--size", "32x32", "--no-score", "--concept-layer", layers[0],
                              "--concept-layer", layers[1], "--out", str(tmp_path / "run"))
    assert code == 0 and any("3 generated (0 failed)" in line for line in out), (out, err)
    records = [json.loads(line) for line in (tmp_path / "run" / "generations.rank0.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r.get("concept_layer")) for r in records) == [
        ("conceptrol", layers[1]), ("conceptrol", layers[0]), ("ip-adapter", None)]
    code, out, err = run_main(capsys, "report", str(tmp_path / "run"))
    assert code == 0 and any(line.startswith(f"conceptrol@{layers[0]} ") for line in out)
    assert any(line.startswith(f"conceptrol@{layers[1]} ") for line in out)
