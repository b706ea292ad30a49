"""XLabs' FLUX IP-Adapter, Kontext and Redux from the command line: the real loading path on tiny folders laid out
as `hf download` leaves them, the checks before loading, the offline demo and the evaluation methods."""

import json

import pytest
import torch
from helpers import run_main
from PIL import Image
from test_eval_cli import manifest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from conceptrol.tiny import save_tiny_flux_folders

    return save_tiny_flux_folders(tmp_path_factory.mktemp("flux-weights"))


@pytest.fixture
def ref(tmp_path):
    path = tmp_path / "dog.png"
    Image.new("RGB", (64, 48), (140, 90, 40)).save(path)
    return path


def model_flags(folders, adapter):
    return {"xlabs-ip": ["--model", str(folders["flux-dev"]), "--adapter", "xlabs-ip", "--adapter-repo",
                         str(folders["xlabs-ip-adapter"])],
            "kontext": ["--model", str(folders["flux-kontext"]), "--condition-size", "32"],
            "redux": ["--model", str(folders["flux-dev"]), "--adapter", "redux", "--adapter-repo",
                      str(folders["flux-redux"])]}[adapter]


@pytest.mark.parametrize("adapter,profile", [("xlabs-ip", "flux-ip"), ("kontext", "flux-kontext"),
                                             ("redux", "flux-redux")])
def test_generate_loads_each_adapter_as_users_do_and_writes_conceptrol_images(folders, ref, tmp_path, capsys, adapter,
                                                                               profile):
    out = tmp_path / "out"
    args = ["generate", *model_flags(folders, adapter), "--prompt", "a dog on a beach", "--image", str(ref),
            "--concept", "dog", "--steps", "2", "--size", "48x32", "--out", str(out)]
    code, printed, err = run_main(capsys, *args, "--save-masks")
    assert code == 0, err
    assert [line.rsplit("/", 1)[-1] for line in printed] == [
        "global-seed0-0.png", "global-seed0-0.json", "global-seed0-0-mask0-dog.png"]
    with Image.open(out / "global-seed0-0.png") as image:
        settings = json.loads(image.text["conceptrol"])
        assert image.size == (48, 32)
    assert (settings["architecture"], settings["steps"], settings["scale"], settings["start"]) == (profile, 2, 1.0, 0.0)
    code, _, err = run_main(capsys, *args, "--masking", "none")  # the stock adapter: another picture
    assert code == 0, err
    assert not torch.equal(torch.tensor(list(Image.open(out / "global-seed0-0.png").getdata())),
                           torch.tensor(list(Image.open(out / "none-seed0-0.png").getdata())))


@pytest.mark.parametrize("adapter,extra,message", [
    ("kontext", ["--adapter", "subject"], "unknown adapter 'subject' for a FLUX.1 Kontext model"),
    ("kontext", ["--masking", "local"], "FLUX.1 Kontext has no local masking"),
    ("redux", ["--condition-size", "64"], "--condition-size sizes OminiControl's and Kontext's reference"),
    ("redux", ["--negative-prompt", "blurry"], "--negative-prompt applies to SD 1.5 / SDXL"),
    ("xlabs-ip", ["--concept", "sun"], "concept 'sun' not found in prompt"),
])
def test_mistakes_are_found_before_the_flux_model_loads(folders, ref, tmp_path, capsys, monkeypatch, adapter, extra,
                                                          message):
    monkeypatch.setattr("conceptrol.app.loading.load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    flags = model_flags(folders, adapter)
    if "--adapter" in extra:
        flags = flags[:2]
    concept = [] if "--concept" in extra else ["--concept", "dog"]
    code, _, err = run_main(capsys, "generate", *flags, "--prompt", "a dog on a beach", "--image", str(ref), *concept,
                       *extra, "--out", str(tmp_path / "o"))
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_xlabs_without_its_image_encoder_says_where_to_put_one(folders, ref, tmp_path, capsys):
    import shutil

    adapters = tmp_path / "xlabs"
    adapters.mkdir()
    shutil.copy(folders["xlabs-ip-adapter"] / "ip_adapter.safetensors", adapters)  # no image_encoder/ beside it
    code, _, err = run_main(capsys, "generate", "--model", str(folders["flux-dev"]), "--adapter", "xlabs-ip",
                       "--adapter-repo", str(adapters), "--prompt", "a dog", "--image", str(ref), "--concept", "dog",
                       "--out", str(tmp_path / "o"))
    assert code == 2 and len(err) == 1
    assert "openai/clip-vit-large-patch14" in err[0] and "<--adapter-repo>/image_encoder" in err[0]


@pytest.mark.parametrize("model", ["flux-ip", "flux-kontext", "flux-redux"])
def test_the_offline_demo_runs_each_adapter(tmp_path, capsys, model):
    code, printed, err = run_main(capsys, "demo", "--model", model, "--steps", "2", "--out", str(tmp_path / "demo"))
    assert code == 0, err
    names = {line.rsplit("/", 1)[-1] for line in printed}
    assert {"global-seed0-0.png", "global-seed0-0-mask0-dog.png", "none-seed0-0.png", "NOTE.txt"} <= names
    assert f"--model {model}" in (tmp_path / "demo" / "NOTE.txt").read_text()


def test_evaluate_runs_the_adapters_baseline_and_conceptrol_by_default(tmp_path, capsys):
    code, printed, err = run_main(capsys, "evaluate", "--benchmark", str(manifest(tmp_path, ("a dog on the moon",))),
                             "--model", "tiny-flux-kontext", "--condition-size", "32", "--steps", "2", "--size", "32x32",
                             "--no-score", "--out", str(tmp_path / "run"))
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "run" / "generations.rank0.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in records) == ["conceptrol", "kontext"] and all(r["status"] == "ok" for r in records)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["settings"]["architecture"] == "flux-kontext"
    code, _, err = run_main(capsys, "evaluate", "--benchmark", str(manifest(tmp_path, ("a dog on the moon",))), "--model",
                       "tiny-flux-ip", "--method", "ip-adapter", "--no-score", "--out", str(tmp_path / "run2"))
    assert code == 2 and "--method ip-adapter does not apply to this model and adapter (flux-ip); its baseline is xlabs-ip" in err[-1]
