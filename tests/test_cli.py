"""The CLI and the offline demo as a user runs them; reference-image checks."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conceptrol import ConceptrolError
from conceptrol.cli import main
from conceptrol.generate import GenerateSettings, generate, safe_name
from conceptrol.images import load_reference_image
from conceptrol.tiny import load_tiny_ip_adapter, tiny_sd15_pipeline


def run_cli(*args, cwd=None):
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "conceptrol.cli", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def test_demo_writes_images_masks_and_a_note(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("demo", "--out", str(out), "--steps", "3")
    assert result.returncode == 0, result.stderr
    names = {p.name for p in out.iterdir()}
    assert {"reference.png", "global-seed0-0.png", "global-seed0-0-mask0-dog.png", "none-seed0-0.png", "NOTE.txt"} <= names
    assert Image.open(out / "global-seed0-0.png").size == (96, 64)
    assert "RANDOM weights" in (out / "NOTE.txt").read_text()
    assert not np.array_equal(np.asarray(Image.open(out / "global-seed0-0.png")), np.asarray(Image.open(out / "none-seed0-0.png")))


def test_flux_demo_writes_conceptrol_and_plain_ominicontrol(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("demo", "--model", "flux", "--out", str(out), "--steps", "2")
    assert result.returncode == 0, result.stderr
    assert {"global-seed0-0.png", "global-seed0-0-mask0-dog.png", "none-seed0-0.png"} <= {p.name for p in out.iterdir()}
    assert "--model flux" in (out / "NOTE.txt").read_text()
    assert "torchvision" not in result.stderr


def test_generate_with_unreachable_hub_says_how_to_use_a_local_folder(tmp_path):
    ref = tmp_path / "ref.png"
    Image.new("RGB", (32, 32), "red").save(ref)
    result = run_cli("generate", "--prompt", "a dog", "--image", str(ref), "--concept", "dog", "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not load the model" in lines[0] and "--model DIR" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--concept", "dog", "--concept", "cat"], "2 concept(s) for 1 reference image(s)"),
        (["--concept", "dog", "--start", "0.9", "--end", "0.5"], "must be smaller than end"),
        (["--concept", "dog", "--scale", "nan"], "scale must be a number >= 0"),
        (["--concept", "dog", "--scale", "-1"], "scale must be a number >= 0"),
        (["--concept", "dog", "--size", "100x64"], "multiples of 8"),
    ],
)
def test_bad_arguments_print_one_line_and_exit_non_zero(tmp_path, capsys, args, message, tiny_generate):
    ref = tmp_path / "ref.png"
    Image.new("RGB", (32, 32), "red").save(ref)
    code = main(["generate", "--prompt", "a dog", "--image", str(ref), "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]


@pytest.fixture
def tiny_generate(monkeypatch):
    """Route `conceptrol generate` to a tiny offline pipeline instead of downloading weights."""
    pipe = tiny_sd15_pipeline()
    load_tiny_ip_adapter(pipe, "plus")
    pipe.set_progress_bar_config(disable=True)
    monkeypatch.setattr("conceptrol.loading.load_pipeline", lambda *a, **k: pipe)
    return pipe


def test_generate_writes_images_and_masks_into_the_output_folder(tmp_path, capsys, tiny_generate):
    ref = tmp_path / "ref.png"
    Image.new("RGB", (32, 32), "red").save(ref)
    out = tmp_path / "out"
    code = main(["generate", "--prompt", "a corgi on the moon", "--image", str(ref), "--concept", "corgi",
                 "--steps", "3", "--size", "48x32", "--num-images", "2", "--out", str(out), "--save-masks"])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [
        "global-seed0-0-mask0-corgi.png", "global-seed0-0.png", "global-seed0-1-mask0-corgi.png", "global-seed0-1.png"]


def test_concept_not_in_prompt_is_one_line_from_the_cli(tmp_path, capsys, tiny_generate):
    ref = tmp_path / "ref.png"
    Image.new("RGB", (32, 32), "red").save(ref)
    code = main(["generate", "--prompt", "a dog on a beach", "--image", str(ref), "--concept", "dgo", "--steps", "2",
                 "--size", "48x32", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "did you mean 'dog'" in err[0]


def test_output_path_that_is_a_file_is_refused_before_anything_else(tmp_path, monkeypatch):
    monkeypatch.setattr("conceptrol.loading.load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
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

    from conceptrol.loading import pick_dtype

    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    gpu = torch.device("cuda")
    for flux in ("flux", "flux-dev", "black-forest-labs/FLUX.1-schnell", str(tmp_path)):
        assert pick_dtype("auto", gpu, flux) == torch.bfloat16, flux
    assert pick_dtype("auto", gpu, "sdxl") == torch.float16
    assert pick_dtype("auto", torch.device("cpu"), str(tmp_path)) == torch.float32
