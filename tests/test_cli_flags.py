"""The command line's flags, help texts and checks as a user meets them (audit of 2026-12-05, rows named per test)."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_main
from PIL import Image

from conceptrol.cli import build_parser

TINY = ["--model", "tiny-sd15", "--steps", "2", "--size", "64x48"]


@pytest.fixture
def ref(tmp_path):
    path = tmp_path / "dog.png"
    Image.new("RGB", (32, 32), "brown").save(path)
    return path


def subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every (sub)command's parser by its name ("generate", "comfyui install", ...)."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[f"{prefix}{name}"] = sub
                found |= subcommands(sub, f"{prefix}{name} ")
    return found


COMMANDS = subcommands(build_parser())


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_and_argument_has_help_text(command):  # D18
    missing = [action.dest for action in COMMANDS[command]._actions
               if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) and not action.help]
    assert missing == []


def option_names(command: str) -> set[str]:
    return {name for action in COMMANDS[command]._actions for name in action.option_strings}


def test_one_flag_name_per_setting_across_subcommands():  # D17
    for command in ("generate", "evaluate", "ui"):
        assert {"--model", "--adapter", "--adapter-repo", "--device", "--dtype"} <= option_names(command), command
    assert "--seed" in option_names("evaluate") and "--seed" in option_names("generate") and "--seed" in option_names("demo")
    help_texts = " ".join(a.help for a in COMMANDS["ui"]._actions if a.help)
    assert "deprecated: use --adapter-repo" in help_texts  # the old ui flags still work, marked as such


def test_tiny_models_have_one_name_in_every_subcommand(ref, tmp_path, capsys):  # D17
    for model in ("tiny-sd15", "tiny-flux"):
        code, out, err = run_main(capsys, "demo", "--model", model, "--steps", "2", "--out", str(tmp_path / model))
        assert code == 0, err
    code, out, err = run_main(capsys, "generate", "--prompt", "a dog on a wave", "--image", str(ref), "--concept", "dog",
                              *TINY, "--out", str(tmp_path / "g"))
    assert code == 0, err
    assert json.loads((tmp_path / "g" / "global-seed0-0.json").read_text())["model"] == "tiny-sd15"


def test_evaluate_takes_several_seeds_written_either_way(tmp_path, capsys):  # D17
    Image.new("RGB", (16, 16), "red").save(tmp_path / "dog.png")
    (tmp_path / "set.jsonl").write_text(json.dumps({"id": "d", "image": "dog.png", "prompt": "a dog", "concept": "dog"}))
    for flags in (["--seed", "0", "1"], ["--seed", "0", "--seed", "1"], ["--seeds", "0", "1"]):
        code, out, err = run_main(capsys, "evaluate", "--benchmark", str(tmp_path / "set.jsonl"), "--model", "tiny",
                                  "--steps", "2", "--size", "32x32", "--no-score", "--dry-run", *flags,
                                  "--out", str(tmp_path / "run"))
        assert code == 0 and any("4 of 4 jobs" in line for line in out), (flags, out, err)


def test_kontext_adapter_help_names_its_real_value(capsys):  # D16
    code, out, _ = run_main(capsys, "generate", "--help")
    text = " ".join(" ".join(out).split())
    assert code == 0 and "Kontext: kontext (the default)" in text and "Kontext: none" not in text
    assert "the adapter as is (vanilla IP-Adapter, plain OminiControl" in text  # --masking none, not only IP-Adapter


def test_a_repeated_concept_warns_and_word_at_n_picks_the_later_one(ref, tmp_path, capsys):  # D14
    args = ["generate", "--prompt", "a dog and a dog", "--image", str(ref), "--image", str(ref), *TINY]
    code, _, err = run_main(capsys, *args, "--concept", "dog", "--concept", "dog", "--out", str(tmp_path / "same"))
    warnings = [line for line in err if line.startswith("conceptrol: warning: ")]
    assert code == 0 and len(warnings) == 1 and "pick the same words" in warnings[0] and "dog@2" in warnings[0]
    code, _, err = run_main(capsys, *args, "--concept", "dog", "--concept", "dog@2", "--out", str(tmp_path / "two"))
    assert code == 0 and not [line for line in err if "warning" in line], err
    sidecar = json.loads((tmp_path / "two" / "global-seed0-0.json").read_text())
    assert sidecar["concepts"] == ["dog", "dog"] and sidecar["occurrences"] == [0, 1]
    code, _, err = run_main(capsys, *args, "--concept", "dog", "--concept", "dog@3", "--out", str(tmp_path / "three"))
    assert code == 2 and "occurs 2 time(s)" in err[0]


def test_the_concept_at_n_is_the_nth_whole_word_in_the_tokens(clip_tok):  # D14
    from conceptrol.app.settings import parse_concept
    from conceptrol.core.concepts import resolve_concepts

    prompt = "a dog and a dog"
    ids = clip_tok(prompt).input_ids  # [start, a, dog, and, a, dog, end]: the second dog is position 5
    dog = clip_tok("dog", add_special_tokens=False).input_ids
    second = [i for i in range(len(ids)) if ids[i : i + len(dog)] == dog][1]
    resolved = resolve_concepts(clip_tok, [prompt], [parse_concept("dog"), parse_concept("dog@2")], 1)
    assert resolved.spans == [[slice(2, 3), slice(second, second + len(dog))]]


@pytest.mark.parametrize("args,message", [
    (["--start", "0.2", "--end", "0.3"], "holds none of the 2 denoising steps"),  # D3
    (["--end", "0"], "start (0.2, the default for SD 1.5) must be smaller than end (0)"),  # D24
    (["--end", "0.1"], "start (0.2, the default for SD 1.5) must be smaller than end (0.1)"),  # D24
])
def test_a_window_without_steps_is_refused_naming_the_start_that_applies(ref, tmp_path, capsys, args, message):
    code, _, err = run_main(capsys, "generate", "--prompt", "a dog surfing a wave", "--image", str(ref), "--concept",
                            "dog", *TINY, *args, "--out", str(tmp_path / "o"))
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()  # D21: a failed check leaves no output folder


def test_a_window_with_steps_at_more_steps_runs(ref, tmp_path, capsys):  # D3: the same window at 10 steps holds step 2
    code, _, err = run_main(capsys, "generate", "--prompt", "a dog surfing a wave", "--image", str(ref), "--concept",
                            "dog", "--model", "tiny-sd15", "--steps", "10", "--size", "64x48", "--start", "0.2",
                            "--end", "0.3", "--out", str(tmp_path / "o"))
    assert code == 0, err


def test_a_failed_check_leaves_no_empty_output_folder(tmp_path, capsys):  # D21
    code, _, err = run_main(capsys, "generate", "--prompt", "a dog", "--image", str(tmp_path / "nope.jpg"), "--concept",
                            "dog", *TINY, "--out", str(tmp_path / "newdir_fail"))
    assert code == 2 and "nope.jpg does not exist" in err[0] and not (tmp_path / "newdir_fail").exists()


def test_a_relative_path_that_is_not_a_folder_is_not_taken_for_a_hub_id(ref, tmp_path, capsys, monkeypatch,
                                                                        tiny_folder):  # D29
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    for flag in ("--model", "--adapter-repo"):
        extra = [flag, "models/ip-adapterX"] + (["--model", str(tiny_folder[0])] if flag == "--adapter-repo" else [])
        code, _, err = run_main(capsys, "generate", "--prompt", "a dog", "--image", str(ref), "--concept", "dog",
                                *extra, "--out", "out")
        assert code == 2 and len(err) == 1 and f"{flag} models/ip-adapterX: no such folder" in err[0], err
        assert "Hugging Face Hub" not in err[0]


def test_generate_writes_plain_progress_lines_into_a_log(ref, tmp_path):  # D31
    log = tmp_path / "log"
    with log.open("w") as stderr:
        result = subprocess.run([sys.executable, "-m", "conceptrol.cli", "generate", "--prompt", "a dog", "--image",
                                 str(ref), "--concept", "dog", "--model", "tiny-sd15", "--steps", "3", "--size", "64x48",
                                 "--out", str(tmp_path / "o")], stdout=subprocess.PIPE, stderr=stderr, text=True,
                                timeout=300, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    text = log.read_text()
    assert result.returncode == 0 and "\r" not in text, text
    assert [line for line in text.splitlines() if line.startswith("generating:")] == [
        "generating: step 1/3", "generating: step 2/3", "generating: step 3/3"]


def test_a_long_prompt_is_shortened_in_messages(ref, tmp_path, capsys):  # D33
    prompt = " ".join(f"word{i}" for i in range(120)) + " cat"
    code, _, err = run_main(capsys, "generate", "--prompt", prompt, "--image", str(ref), "--concept", "horse", *TINY,
                            "--out", str(tmp_path / "o"))
    assert code == 2 and len(err) == 1 and len(err[0]) < 600 and "word0" in err[0] and "cat" in err[0], err
    assert "word60" not in err[0] and " ... " in err[0]


def test_the_truncation_warning_names_the_dropped_words_briefly(ref, tmp_path, capsys):  # D33
    prompt = "a dog " + " ".join(f"w{i}" for i in range(150)) + " end"
    code, _, err = run_main(capsys, "generate", "--prompt", prompt, "--image", str(ref), "--concept", "dog", *TINY,
                            "--out", str(tmp_path / "o"))
    warnings = [line for line in err if line.startswith("conceptrol: warning: ")]
    assert code == 0 and len(warnings) == 1 and len(warnings[0]) < 300 and warnings[0].endswith("end'"), warnings


def read_a1111(text: str) -> tuple[str, str | None, dict[str, str]]:
    """(prompt, negative prompt, settings) as AUTOMATIC1111's PNG Info reads its `parameters` chunk."""
    *head, last = text.split("\n")
    negative = next((line.removeprefix("Negative prompt: ") for line in head if line.startswith("Negative prompt: ")),
                    None)
    prompt = "\n".join(line for line in head if not line.startswith("Negative prompt: "))
    settings, rest = {}, last
    while rest:
        key, _, rest = rest.partition(": ")
        if rest.startswith('"'):
            value, end = json.JSONDecoder().raw_decode(rest)
            rest = rest[end:].removeprefix(", ")
        else:
            value, _, rest = rest.partition(", ")
        settings[key] = value
    return prompt, negative, settings


def test_each_image_records_what_it_takes_to_make_it_again(ref, tmp_path, capsys, tiny_folder):  # D19
    model, adapters = tiny_folder
    relative = os.path.relpath(model)
    code, _, err = run_main(capsys, "generate", "--prompt", "a dog, on the moon", "--image", str(ref), "--concept", "dog",
                            "--model", relative, "--adapter-repo", str(adapters), "--steps", "2", "--size", "64x48",
                            "--num-images", "2", "--out", str(tmp_path / "o"))
    assert code == 0, err
    sidecar = json.loads((tmp_path / "o" / "global-seed0-1.json").read_text())
    expected = {"model": str(Path(model).resolve()), "adapter": "plus", "adapter_repo": str(Path(adapters).resolve()),
                "dtype": "fp32", "device": "cpu", "num_images": 2, "image_index": 1, "seed": 0}
    assert {key: sidecar[key] for key in expected} == expected
    with Image.open(tmp_path / "o" / "global-seed0-1.png") as image:
        prompt, negative, settings = read_a1111(image.text["parameters"])
        assert json.loads(image.text["conceptrol"])["adapter"] == "plus"
    assert prompt == "a dog, on the moon" and negative == sidecar["negative_prompt"]
    assert settings["Steps"] == "2" and settings["CFG scale"] == "7.5" and settings["Seed"] == "0"
    assert settings["Size"] == "64x48" and settings["Model"] == str(Path(model).resolve())
    assert settings["Conceptrol concepts"] == "dog" and settings["Conceptrol scale"] == "1.5"
