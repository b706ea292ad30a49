"""The CLI and the offline demo as a user runs them; reference-image checks."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import cli
from PIL import Image

from conceptrol import ConceptrolError
from conceptrol.app.generate import GenerateSettings, generate, safe_name
from conceptrol.core.images import load_reference_image


def run_cli(*args, cwd=None):
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "conceptrol.cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


@pytest.fixture
def ref(tmp_path):
    path = tmp_path / "ref.png"
    Image.new("RGB", (32, 32), "red").save(path)
    return path


def test_demo_writes_images_masks_and_a_note(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("demo", "--out", str(out), "--steps", "3")
    assert result.returncode == 0, result.stderr
    names = {p.name for p in out.iterdir()}
    assert {"reference.png", "global-seed0-0.png", "global-seed0-0-mask0-dog.png", "none-seed0-0.png", "NOTE.txt"} <= names
    assert Image.open(out / "global-seed0-0.png").size == (96, 64)
    assert "RANDOM weights" in (out / "NOTE.txt").read_text()
    assert not np.array_equal(np.asarray(Image.open(out / "global-seed0-0.png")), np.asarray(Image.open(out / "none-seed0-0.png")))
    again = run_cli("demo", "--out", str(out), "--steps", "3")  # a second demo into the same folder overwrites nothing
    assert again.returncode == 0 and {"reference-2.png", "global-seed0-0-2.png", "NOTE-2.txt"} <= {p.name for p in out.iterdir()}
    assert "global-seed0-0-2.png" in (out / "NOTE-2.txt").read_text()


def test_flux_demo_writes_conceptrol_and_plain_ominicontrol(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("demo", "--model", "flux", "--out", str(out), "--steps", "2")
    assert result.returncode == 0, result.stderr
    assert {"global-seed0-0.png", "global-seed0-0-mask0-dog.png", "none-seed0-0.png"} <= {p.name for p in out.iterdir()}
    assert "--model flux" in (out / "NOTE.txt").read_text()
    assert "torchvision" not in result.stderr


def test_generate_with_the_hub_switched_off_says_how_to_use_a_local_folder(ref, tmp_path):
    result = run_cli("generate", "--prompt", "a dog", "--image", str(ref), "--concept", "dog", "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not load the model" in lines[0] and "--model DIR" in lines[0]
    assert "HF_HUB_OFFLINE" in lines[0]


def user_environment(tmp_path):
    """The environment of a user's shell: none of the test suite's quiet or offline switches, an empty hub cache,
    and the hub pointed at a local address where nothing listens (unreachable, as it is here anyway)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "TRANSFORMERS_OFFLINE")}
    return env | {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf-home")}


def test_generate_in_a_users_shell_without_hub_access_is_one_line_and_quick(ref, tmp_path):
    began = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "conceptrol.cli", "generate", "--prompt", "a dog", "--image", str(ref),
                             "--concept", "dog", "--out", str(tmp_path / "o")], capture_output=True, text=True,
                            env=user_environment(tmp_path), timeout=300)
    assert result.returncode == 2 and time.monotonic() - began < 30  # not a minute of hub retries
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "the Hugging Face Hub at http://127.0.0.1:9 is unreachable" in lines[0] and "--model DIR" in lines[0]


def test_demo_in_a_users_shell_prints_no_library_noise(tmp_path):
    result = subprocess.run([sys.executable, "-m", "conceptrol.cli", "demo", "--out", str(tmp_path / "d"), "--steps", "2"],
                            capture_output=True, text=True, env=user_environment(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "[transformers]" not in result.stderr and "torchvision" not in result.stderr
    assert "warn" not in result.stderr.lower()


def test_the_library_imports_and_applies_without_library_noise():  # audit D27
    code = ("from conceptrol import ConceptrolHandle, apply_conceptrol\ntry:\n    apply_conceptrol(object())\n"
            "except Exception as error:\n    print(type(error).__name__)")
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.stdout.strip() == "ConceptrolError" and result.stderr == ""


def test_help_and_argument_mistakes_import_nothing_heavy():
    script = ("import sys\nfrom conceptrol.cli import main\n"
              "code = main(['generate', '--prompt', 'a dog', '--image', 'x.png', '--concept', 'dog', '--scale', 'inf'])\n"
              "print(code, sorted(m for m in ('torch', 'diffusers', 'transformers', 'gradio') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "2 []" and "scale must be a finite number" in result.stderr
    began = time.monotonic()
    shown = subprocess.run([sys.executable, "-m", "conceptrol.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "generate" in shown.stdout and time.monotonic() - began < 5


@pytest.mark.parametrize(
    "args,message",
    [
        (["--concept", "dog", "--concept", "cat"], "2 concept(s) for 1 reference image(s)"),
        (["--concept", "dog", "--start", "0.9", "--end", "0.5"], "must be smaller than end"),
        (["--concept", "dog", "--scale", "nan"], "scale must be a finite number >= 0"),
        (["--concept", "dog", "--scale", "-1"], "scale must be a finite number >= 0"),
        (["--concept", "dog", "--scale", "inf"], "scale must be a finite number >= 0"),
        (["--concept", "dog", "--guidance", "inf"], "guidance must be a finite number >= 0"),
        (["--concept", "dog", "--size", "100x64"], "multiples of 8"),
        (["--concept", "dog", "--size", "100000x100000"], "10,000.0 megapixels, 38,147x the pixels of 512x512"),
        (["--concept", "dog", "--size", "big"], "size must look like 512x768"),
        (["--concept", "dog", "--seed", "-1"], "seed must be an integer from 0 to 2**63-1"),
        (["--concept", "dog", "--seed", str(2**63)], "seed must be an integer from 0 to 2**63-1"),
        (["--concept", "dog", "--steps", "0"], "steps must be from 1 to 1000"),
        (["--concept", "dog", "--steps", "x"], "argument --steps: invalid int value: 'x'"),
        (["--concept", "dog", "--device", "gpu"], "did you mean 'cuda'?"),
        (["--concept", "dog", "--dtype", "float16"], "did you mean 'fp16'?"),
        (["--concept", "dog", "--masking", "none", "--save-masks"], "--save-masks needs a concept mask"),
        (["--concept", ","], "has no word in it"),
        (["--concept", "dog", "--model", "sd1.5"], "did you mean sd15?"),
        (["--concept", "dog", "--model", "./my-model"], "--model ./my-model: no such folder"),
        (["--concept", "dog", "--model", "stable diffusion"], "is not a preset, a hub id or an existing folder"),
    ],
)
def test_bad_arguments_print_one_line_and_exit_non_zero(ref, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setattr("conceptrol.app.loading.load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    code, err = cli(capsys, "generate", "--prompt", "a dog", "--image", str(ref), "--out", str(tmp_path / "o"), *args)
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_an_empty_prompt_is_refused(tmp_path, capsys):
    code, err = cli(capsys, "generate", "--prompt", "  ", "--image", "x.png", "--concept", "dog", "--out", str(tmp_path))
    assert code == 2 and len(err) == 1 and "the prompt is empty" in err[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_refused_before_loading(ref, tmp_path, capsys, tiny_folder):
    code, err = cli(capsys, "generate", "--prompt", "a dog", "--image", str(ref), "--concept", "dog", "--device", "cuda",
                    "--model", str(tiny_folder[0]), "--adapter-repo", str(tiny_folder[1]), "--out", str(tmp_path / "o"))
    assert code == 2 and len(err) == 1 and "device 'cuda' is not available here" in err[0] and "--device cpu" in err[0]


TINY_FLAGS = ["--steps", "2", "--size", "64x48"]


@pytest.mark.parametrize("args,message", [
    (["--concept", "cat"], "concept 'cat' not found in prompt 'a dog on the moon'"),
    (["--concept", "dgo"], "did you mean 'dog'?"),
    (["--concept", "dog", "--adapter", "subject"], "unknown adapter 'subject' for sd15; choose one of base, plus"),
    (["--concept", "dog", "--concept-layer", "up_blocks.1.attentions.0.transformer_blocks.0.attn3"],
     "did you mean one of ['up_blocks.1.attentions.0.transformer_blocks.0.attn2'"),
    (["--concept", "dog", "--condition-size", "256"], "--condition-size applies to FLUX"),
    (["--concept", "dog", "--adapter-repo", "./no-adapters"], "--adapter-repo ./no-adapters: no such folder"),
    (["--concept", "dog", "--adapter", "base"], "ip-adapter_sd15.safetensors does not exist"),
])
def test_mistakes_the_model_reveals_are_found_before_it_loads(ref, tmp_path, capsys, monkeypatch, tiny_folder, args, message):
    monkeypatch.setattr("conceptrol.app.loading.load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    model, adapters = tiny_folder
    flags = ["--model", str(model)] + ([] if "--adapter-repo" in args else ["--adapter-repo", str(adapters)])
    code, err = cli(capsys, "generate", "--prompt", "a dog on the moon", "--image", str(ref), *flags, *TINY_FLAGS,
                    "--out", str(tmp_path / "o"), *args)
    assert code == 2 and len(err) == 1 and message in err[0], err


def png_settings(path):
    with Image.open(path) as image:
        return json.loads(image.text["conceptrol"]), image.text["parameters"]


def test_generate_never_overwrites_and_records_its_settings_in_each_file(ref, tmp_path, capsys, tiny_folder):
    model, adapters = tiny_folder
    out = tmp_path / "out"
    args = ["generate", "--prompt", "a corgi on the moon", "--image", str(ref), "--concept", "corgi", "--model",
            str(model), "--adapter-repo", str(adapters), *TINY_FLAGS, "--save-masks", "--out", str(out)]
    code, err = cli(capsys, *args)
    assert code == 0, err
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(first) == ["global-seed0-0-mask0-corgi.png", "global-seed0-0.json", "global-seed0-0.png"]
    code, err = cli(capsys, *args, "--scale", "0.5")
    assert code == 0, err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in first} == first  # untouched
    assert sorted({p.name for p in out.iterdir()} - set(first)) == [
        "global-seed0-0-2.json", "global-seed0-0-2.png", "global-seed0-0-mask0-corgi-2.png"]
    expected = {"prompt": "a corgi on the moon", "concepts": ["corgi"], "model": str(model), "masking": "global",
                "scale": 1.5, "start": 0.2, "end": 1.0, "steps": 2, "seed": 0, "guidance": 7.5, "size": "64x48",
                "architecture": "sd15", "concept_layer": "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
                "references": [str(ref.resolve())]}
    settings, text = png_settings(out / "global-seed0-0.png")
    assert {k: settings[k] for k in expected} == expected and settings["conceptrol"] and settings["diffusers"]
    assert text.splitlines()[0] == "a corgi on the moon" and "Conceptrol scale: 1.5" in text  # AUTOMATIC1111's format
    assert png_settings(out / "global-seed0-0-2.png")[0]["scale"] == 0.5
    sidecar = json.loads((out / "global-seed0-0.json").read_text())
    assert {k: sidecar[k] for k in expected} == expected
    assert sidecar["files"] == ["global-seed0-0.png", "global-seed0-0-mask0-corgi.png"]


def test_a_prompt_past_the_token_limit_warns_in_one_line_naming_the_dropped_words(ref, tmp_path, capsys, tiny_folder):
    model, adapters = tiny_folder
    prompt = "a dog " + " ".join(["on the moon"] * 8) + " wearing a red hat"  # the tiny tokenizer spells words out
    code, err = cli(capsys, "generate", "--prompt", prompt, "--image", str(ref), "--concept", "dog", "--model", str(model),
                    "--adapter-repo", str(adapters), *TINY_FLAGS, "--out", str(tmp_path / "o"))
    assert code == 0, err
    warnings = [line for line in err if line.startswith("conceptrol: warning: ")]
    assert len(warnings) == 1 and "77-token limit" in warnings[0]
    assert warnings[0].endswith("wearing a red hat'") and "these words are dropped: '" in warnings[0]


def test_extreme_aspect_ratios_are_refused_before_decoding(tmp_path):
    strip = tmp_path / "strip.png"
    Image.new("RGB", (10000, 1)).save(strip)
    assert strip.stat().st_size < 1000  # a tiny file that would decode to gigabytes in an image encoder
    with pytest.raises(ConceptrolError, match="10000x1 pixels, more than 8 times as wide as high"):
        load_reference_image(strip)
    Image.new("RGB", (800, 100)).save(tmp_path / "wide.png")
    assert load_reference_image(tmp_path / "wide.png").size == (800, 100)



def test_output_path_that_is_a_file_is_refused_before_anything_else(tmp_path, monkeypatch):
    monkeypatch.setattr("conceptrol.app.loading.load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConceptrolError, match="cannot write to output folder"):
        generate(GenerateSettings(prompt="a dog", concept=("dog",), image=(tmp_path / "x.png",), out=blocker / "o"))


def test_file_names_never_leave_the_output_folder():
    assert safe_name("../../etc/passwd") == "etc-passwd"
    assert safe_name("/") == "concept"


def test_missing_truncated_and_non_image_files_are_clear_errors(tmp_path):
    with pytest.raises(ConceptrolError, match="does not exist"):
        load_reference_image(tmp_path / "nope.jpg")
    good = tmp_path / "good.jpg"
    Image.new("RGB", (64, 64), "blue").save(good, quality=95)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(ConceptrolError, match="cannot read reference image .*truncated"):
        load_reference_image(truncated)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ConceptrolError, match="cannot read reference image"):
        load_reference_image(text)


def test_cmyk_and_16_bit_images_become_faithful_8_bit_rgb(tmp_path):
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(cmyk)  # pure red in CMYK
    red = load_reference_image(cmyk)
    assert red.mode == "RGB" and red.getpixel((8, 8))[0] > 200 and red.getpixel((8, 8))[1] < 60
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16)).save(deep)  # mid grey at 16 bits
    grey = load_reference_image(deep)
    assert grey.mode == "RGB" and 120 <= grey.getpixel((0, 0))[0] <= 135  # rescaled, not clipped to white


def test_huge_images_are_refused_before_decoding(tmp_path):
    big = tmp_path / "big.png"
    Image.new("L", (4000, 3000)).save(big)
    with pytest.raises(ConceptrolError, match="4000x3000 pixels, more than"):
        load_reference_image(big, max_pixels=10_000_000)


def test_auto_dtype_is_bf16_for_flux_by_preset_hub_id_or_local_folder(tmp_path):
    import torch

    from conceptrol.app.loading import pick_dtype

    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    gpu = torch.device("cuda")
    for flux in ("flux", "flux-dev", "black-forest-labs/FLUX.1-schnell", str(tmp_path)):
        assert pick_dtype("auto", gpu, flux) == torch.bfloat16, flux
    assert pick_dtype("auto", gpu, "sdxl") == torch.float16
    assert pick_dtype("auto", torch.device("cpu"), str(tmp_path)) == torch.float32
