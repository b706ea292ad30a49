"""`conceptrol evaluate` and `conceptrol report` as a user runs them (offline, tiny model)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from test_cli import run_cli
from test_eval_data import RELEASE, dreambench_plus

from conceptrol.cli import main

TINY = ["--model", "tiny", "--steps", "2", "--size", "32x32"]


def manifest(folder, prompts=("a dog on the moon", "a cat on a sofa"), concept="dog"):
    Image.new("RGB", (16, 16), "red").save(folder / "dog.png")
    rows = [{"id": f"d{i}", "image": "dog.png", "prompt": p, "concept": concept} for i, p in enumerate(prompts)]
    (folder / "set.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder / "set.jsonl"


def evaluate(capsys, *args):
    """`conceptrol evaluate ...` in this process: (exit status, stdout, stderr lines)."""
    code = main(["evaluate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def test_evaluate_then_report_writes_records_table_and_html(tmp_path):
    args = ["evaluate", "--benchmark", str(manifest(tmp_path)), *TINY, "--out", str(tmp_path / "run"), "--no-score"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert "4 generated (2 failed)" in first.stdout
    assert "1 of 2 cases do not have their concept in the prompt (e.g. d1: 'dog' in 'a cat on a sofa')" in first.stdout
    again = run_cli(*args)
    assert "2 generated (2 failed)" in again.stdout  # finished jobs are kept; only the failed ones run again
    report = run_cli("report", str(tmp_path / "run"))
    assert report.returncode == 0, report.stderr
    assert "2 jobs failed" in report.stdout and "steps 2" in report.stdout and "size 32x32" in report.stdout
    page = (tmp_path / "run" / "report.html").read_text()
    assert page.count("<img") == 1 + 2  # the reference and one output per method for the case that ran


def test_dreambench_plus_release_runs_every_category_and_says_how_many(tmp_path, capsys):
    root = dreambench_plus(tmp_path / "bench", RELEASE)
    code, out, err = evaluate(capsys, "--benchmark", str(root), *TINY, "--method", "conceptrol", "--limit", "4",
                              "--no-score", "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert f"benchmark {root}: 4 cases: live_subject/animal 3, live_subject/human 1" in out
    records = [json.loads(line) for line in (tmp_path / "run" / "generations.rank0.jsonl").read_text().splitlines()]
    assert {r["category"] for r in records} == {"live_subject/animal", "live_subject/human"}


@pytest.mark.parametrize("change,stored", [
    (["--steps", "3"], "steps 2 there, 3 now"),
    (["--size", "48x32"], "size '32x32' there, '48x32' now"),
    (["--start", "0.5"], "start 0.2 there, 0.5 now"),
    (["--guidance", "3.0"], "guidance 7.5 there, 3.0 now"),
    (["--negative-prompt", "blurry"], "negative_prompt"),
    (["--start", "0", "--end", "0.5"], "end 1.0 there, 0.5 now"),  # a window that still holds a step of 2
])
def test_resuming_with_other_settings_is_refused_in_one_line(tmp_path, capsys, change, stored):
    common = ["--benchmark", str(manifest(tmp_path, ("a dog on the moon",))), "--no-score", "--out", str(tmp_path / "run")]
    code, _, err = evaluate(capsys, *common, *TINY, "--method", "conceptrol")
    assert code == 0, err
    changed = [*TINY[:-2], "--size", "32x32", *change] if change[0] != "--size" else [*TINY[:-2], *change]
    code, out, err = evaluate(capsys, *common, *changed, "--method", "conceptrol")
    assert code == 2 and len(err) == 1 and stored in err[0] and "pass a new --out" in err[0]
    assert len((tmp_path / "run" / "generations.rank0.jsonl").read_text().splitlines()) == 1  # nothing new made
    code, out, err = evaluate(capsys, *common, *TINY, "--method", "conceptrol", "--scale", "0.5")  # same settings, more
    assert code == 0 and "1 generated" in out


def lines_of(path):
    return path.read_text().splitlines() if path.exists() else []


def test_resuming_with_another_benchmark_is_refused_in_one_line(tmp_path, capsys):
    first = manifest(tmp_path, ("a dog on the moon",))
    other = dreambench_plus(tmp_path / "other", {("object", "00"): "red backpack\na backpack on a rock\n"})
    run = tmp_path / "run"
    code, _, err = evaluate(capsys, "--benchmark", str(first), *TINY, "--method", "conceptrol", "--no-score",
                            "--out", str(run))
    assert code == 0, err
    made = lines_of(run / "generations.rank0.jsonl")
    for dry in ([], ["--dry-run"]):
        code, _, err = evaluate(capsys, "--benchmark", str(other), *TINY, "--method", "conceptrol", "--no-score",
                                *dry, "--out", str(run))
        assert code == 2 and len(err) == 1, err
        assert f"benchmark {first.resolve()} there, {other.resolve()} now" in err[0] and "pass a new --out" in err[0]
    assert lines_of(run / "generations.rank0.jsonl") == made  # nothing was added to the run


def test_adding_or_editing_cases_of_the_same_benchmark_resumes(tmp_path, capsys):
    common = ["--method", "conceptrol", "--no-score", "--out", str(tmp_path / "run")]
    code, _, err = evaluate(capsys, "--benchmark", str(manifest(tmp_path, ("a dog on the moon",))), *TINY, *common)
    assert code == 0, err
    grown = manifest(tmp_path, ("a dog on the sun", "a dog in a cafe"))  # d0 edited, d1 added: same file
    code, out, err = evaluate(capsys, "--benchmark", str(grown), *TINY, *common)
    assert code == 0 and "2 generated (0 failed)" in out, err


def test_a_moved_benchmark_resumes_and_a_moved_and_changed_one_is_refused(tmp_path, capsys):
    common = ["--method", "conceptrol", "--no-score", "--out", str(tmp_path / "run")]
    code, _, err = evaluate(capsys, "--benchmark", str(manifest(tmp_path, ("a dog on the moon",))), *TINY, *common)
    assert code == 0, err
    for copy in ("moved", "changed"):
        shutil.copytree(tmp_path, tmp_path / copy, ignore=shutil.ignore_patterns("run", "moved"))
    code, out, err = evaluate(capsys, "--benchmark", str(tmp_path / "moved" / "set.jsonl"), *TINY, *common)
    assert code == 0 and "0 generated" in out, err  # the same cases elsewhere: nothing to redo
    assert json.loads((tmp_path / "run" / "run.json").read_text())["benchmark"] == str(tmp_path / "moved" / "set.jsonl")
    manifest(tmp_path / "changed", ("a dog on the moon", "a dog in a cafe"))  # a copy with a case more
    code, _, err = evaluate(capsys, "--benchmark", str(tmp_path / "changed" / "set.jsonl"), *TINY, *common)
    assert code == 2 and len(err) == 1 and "now (with other cases)" in err[0], err


def test_a_run_json_from_before_the_benchmark_was_recorded_still_resumes(tmp_path, capsys):
    common = ["--benchmark", str(manifest(tmp_path, ("a dog on the moon",))), *TINY, "--method", "conceptrol",
              "--no-score", "--out", str(tmp_path / "run")]
    code, _, err = evaluate(capsys, *common)
    assert code == 0, err
    path = tmp_path / "run" / "run.json"
    stored = json.loads(path.read_text())
    older = {k: v for k, v in stored.items() if k not in ("cases", "protocol", "from_preset")}
    path.write_text(json.dumps(older))
    code, _, err = evaluate(capsys, *common, "--scale", "0.5")
    assert code == 0, err
    assert json.loads(path.read_text()) == older | {"cases": stored["cases"], "protocol": None, "from_preset": []}


def test_a_run_that_fails_before_generating_leaves_no_run_json(tmp_path, capsys):
    common = ["--benchmark", str(manifest(tmp_path, ("a dog on the moon",))), "--method", "conceptrol",
              "--out", str(tmp_path / "run")]
    for failing in ([], ["--no-score", "--judge-url", "http://127.0.0.1:9/v1"]):  # no CLIP here; no judge there
        code, _, err = evaluate(capsys, *common, *TINY, *failing)
        assert code == 2 and len(err) == 1, err
        assert not (tmp_path / "run" / "run.json").exists()
    code, out, err = evaluate(capsys, *common, *TINY[:2], "--steps", "4", "--size", "32x32", "--no-score")
    assert code == 0 and "1 generated" in out, err
    assert json.loads((tmp_path / "run" / "run.json").read_text())["settings"]["steps"] == 4


def test_a_folder_without_generation_records_takes_new_settings(tmp_path, capsys):
    common = ["--benchmark", str(manifest(tmp_path, ("a dog on the moon",))), "--method", "conceptrol", "--no-score"]
    code, _, err = evaluate(capsys, *common, *TINY, "--out", str(tmp_path / "first"))
    assert code == 0, err
    (tmp_path / "left").mkdir()  # a run.json left by a start that failed before any picture was made
    shutil.copy(tmp_path / "first" / "run.json", tmp_path / "left" / "run.json")
    code, out, err = evaluate(capsys, *common, *TINY, "--steps", "3", "--out", str(tmp_path / "left"))
    assert code == 0 and "1 generated" in out, err
    assert json.loads((tmp_path / "left" / "run.json").read_text())["settings"]["steps"] == 3


def test_a_dry_run_checks_the_scoring_models_as_the_run_does(tmp_path, capsys):
    common = ["--benchmark", str(manifest(tmp_path)), *TINY, "--out", str(tmp_path / "run")]
    code, _, run_err = evaluate(capsys, *common)
    code_dry, out, dry_err = evaluate(capsys, *common, "--dry-run")
    assert code == code_dry == 2 and len(dry_err) == 1 and dry_err == run_err
    assert "could not load the CLIP scoring model" in dry_err[0] and "--clip-model DIR" in dry_err[0]
    assert "or pass --no-score" in dry_err[0] and "dry run:" not in out


def test_a_dry_run_counts_what_the_run_then_generates_after_a_caption_changed(tmp_path, capsys):
    common = [*TINY, "--method", "conceptrol", "--no-score", "--out", str(tmp_path / "run")]
    code, _, err = evaluate(capsys, "--benchmark", str(manifest(tmp_path, ("a dog on the moon", "a dog in a cafe"))),
                            *common)
    assert code == 0, err
    edited = manifest(tmp_path, ("a dog on the sun", "a dog in a cafe"))  # the first case's prompt changed
    code, out, err = evaluate(capsys, "--benchmark", str(edited), *common, "--dry-run")
    assert code == 0 and "dry run: 1 of 2 jobs to generate conceptrol at scale 1: 1" in out, err
    assert "conceptrol/1/0/d0: 'a dog on the sun'" in out
    code, out, err = evaluate(capsys, "--benchmark", str(edited), *common)
    assert code == 0 and "1 generated" in out, err


def last_double_block(kind):
    from conceptrol.app.offline_demo import tiny_pipeline

    return f"transformer_blocks.{len(tiny_pipeline(kind).transformer.transformer_blocks) - 1}"


def test_tiny_flux_runs_with_its_own_default_concept_block(tmp_path, capsys):
    code, out, err = evaluate(capsys, "--benchmark", str(manifest(tmp_path, ("a dog on the moon",))),
                              "--model", "tiny-flux", *TINY[2:], "--condition-size", "32", "--method", "conceptrol",
                              "--no-score", "--out", str(tmp_path / "run"))
    assert code == 0 and "1 generated (0 failed)" in out, err
    stored = json.loads((tmp_path / "run" / "run.json").read_text())
    assert stored["settings"]["concept_layer"] == last_double_block("flux")


def test_a_concept_block_the_model_lacks_is_refused_by_the_dry_run(tmp_path, capsys):
    from conceptrol.tiny import tiny_kontext

    tiny_kontext(seed=0, double=2, single=1).save_pretrained(tmp_path / "short-kontext")  # a real folder, 2 blocks
    common = ["--benchmark", str(manifest(tmp_path)), *TINY[2:], "--condition-size", "32", "--no-score",
              "--dry-run", "--out", str(tmp_path / "run")]
    code, _, err = evaluate(capsys, "--model", str(tmp_path / "short-kontext"), *common)
    assert code == 2 and len(err) == 1, err
    assert "default concept block 'transformer_blocks.18' is not a block" in err[0]
    assert "--concept-layer transformer_blocks.1" in err[0]
    code, _, err = evaluate(capsys, "--model", "tiny-flux", *common, "--concept-layer", "transformer_blocks.25")
    assert code == 2 and len(err) == 1 and "'transformer_blocks.25' is not a block" in err[0], err


@pytest.mark.parametrize("model,adapter", [("tiny-flux-ip", "xlabs-ip"), ("tiny-flux-redux", "redux")])
def test_run_json_and_report_name_the_adapter_a_tiny_flux_model_carries(tmp_path, capsys, model, adapter):
    code, _, err = evaluate(capsys, "--benchmark", str(manifest(tmp_path, ("a dog on the moon",))), "--model", model,
                            *TINY[2:], "--method", "conceptrol", "--no-score", "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "run.json").read_text())["settings"]["adapter"] == adapter
    assert main(["report", str(tmp_path / "run")]) == 0
    assert f"adapter {adapter}," in capsys.readouterr().out


@pytest.mark.parametrize("model,args,message", [
    ("tiny", ["--adapter", "nonsense"], "unknown adapter 'nonsense'"),
    ("tiny", ["--adapter", "base"], "--model tiny carries the adapter plus only; leave out --adapter base"),
    ("tiny-flux", ["--adapter", "xlabs-ip"], "or use --model tiny-flux-ip"),
    ("tiny-flux-kontext", ["--size", "40x40", "--condition-size", "32"], "multiples of 16"),
    ("tiny", ["--size", "36x36"], "multiples of 8"),
])
def test_tiny_models_get_the_checks_real_models_get(tmp_path, capsys, model, args, message):
    code, _, err = evaluate(capsys, "--benchmark", str(manifest(tmp_path)), "--model", model, "--steps", "2",
                            "--no-score", *args, "--dry-run", "--out", str(tmp_path / "run"))
    assert code == 2 and len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("args,message", [
    (["--limit", "-1"], "--limit must be at least 1"),
    (["--seeds", "-3"], "seed must be an integer from 0 to 2**63-1"),
    (["--scale", "inf"], "scale must be a finite number >= 0"),
    (["--method", "ominicontrol"], "--method ominicontrol does not apply to this model and adapter (sd15); its baseline is ip-adapter"),
    (["--method", "ip-adapter", "--start", "0.3"], "--start is Conceptrol's warm-up"),
    (["--judge-url", "http://127.0.0.1:9/v1", "--judge-runs", "0"], "--judge-runs must be from 1 to 20"),
    (["--judge-model", "gpt-4o"], "pass --judge-url too"),
    (["--judge-url", "ftp://judge"], "--judge-url must be an http(s) address"),
    (["--judge-url", "http://127.0.0.1:9/v1"], "the judge at http://127.0.0.1:9/v1 is unreachable"),
    (["--clip-model", "openai/clip-vit-base-patch32"], "--no-score skips scoring"),
    (["--condition-size", "256"], "--condition-size applies to FLUX"),
    (["--concept-layer", "up_blocks.9.attn2"], "concept layer 'up_blocks.9.attn2' is not a cross-attention layer"),
    (["--device", "gpu"], "did you mean 'cuda'?"),
])
def test_evaluate_checks_every_setting_before_generating(tmp_path, capsys, args, message):
    code, _, err = evaluate(capsys, "--benchmark", str(manifest(tmp_path)), *TINY, "--no-score", *args,
                            "--out", str(tmp_path / "run"))
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not list((tmp_path / "run").glob("generations*"))  # refused before any image was made


def test_scoring_models_that_cannot_be_loaded_fail_before_generating(tmp_path, capsys):
    code, _, err = evaluate(capsys, "--benchmark", str(manifest(tmp_path)), *TINY, "--out", str(tmp_path / "run"))
    assert code == 2 and len(err) == 1  # conftest sets HF_HUB_OFFLINE: the default CLIP is not in the cache
    assert "openai/clip-vit-base-patch32" in err[0] and "--clip-model DIR" in err[0] and "--no-score" in err[0]
    code, _, err = evaluate(capsys, "--benchmark", str(manifest(tmp_path)), *TINY, "--clip-model", "./my-clip",
                            "--out", str(tmp_path / "run"))
    assert code == 2 and len(err) == 1 and "--clip-model ./my-clip: no such folder" in err[0] and "--no-score" in err[0]
    assert not list((tmp_path / "run").glob("generations*"))


def test_a_manifest_line_that_is_not_json_is_named_by_its_line_and_column(tmp_path, capsys):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "dog.jpg")
    good, bad = '{"image": "dog.jpg", "prompt": "a dog", "concept": "dog"}', '{"image": "dog.jpg" "prompt": "x"}'
    (tmp_path / "bad_json.jsonl").write_text(f"{good}\n{bad}\n")
    column = bad.index('"prompt"') + 1  # json counts columns from 1
    code, _, err = evaluate(capsys, "--benchmark", str(tmp_path / "bad_json.jsonl"), *TINY, "--no-score",
                            "--out", str(tmp_path / "run"))
    assert code == 2 and len(err) == 1
    assert f"bad_json.jsonl line 2: Expecting ',' delimiter (column {column})" in err[0], err


def test_manifest_extensions_are_read_in_any_case_and_a_json_file_is_told_to_become_jsonl(tmp_path, capsys):
    upper = tmp_path / "GOOD.JSONL"
    upper.write_text(manifest(tmp_path).read_text())
    code, out, err = evaluate(capsys, "--benchmark", str(upper), *TINY, "--no-score", "--dry-run",
                              "--out", str(tmp_path / "run"))
    assert code == 0 and f"benchmark {upper}: 2 cases" in out, err
    (tmp_path / "GOOD.CSV").write_text("id,image,prompt,concept\nd0,dog.png,a dog on the moon,dog\n")
    code, out, err = evaluate(capsys, "--benchmark", str(tmp_path / "GOOD.CSV"), *TINY, "--no-score", "--dry-run",
                              "--out", str(tmp_path / "run"))
    assert code == 0 and "1 cases" in out, err
    (tmp_path / "good.json").write_text(upper.read_text())
    code, _, err = evaluate(capsys, "--benchmark", str(tmp_path / "good.json"), *TINY, "--no-score", "--dry-run",
                            "--out", str(tmp_path / "run"))
    assert code == 2 and len(err) == 1 and "rename to .jsonl (one object per line)" in err[0], err


def test_duplicate_values_run_once_with_a_warning(tmp_path, capsys):
    code, out, err = evaluate(capsys, "--benchmark", str(manifest(tmp_path, ("a dog on the moon",))), *TINY,
                              "--method", "conceptrol", "--method", "conceptrol", "--scale", "1", "--scale", "1.0",
                              "--seeds", "0", "0", "--no-score", "--out", str(tmp_path / "run"))
    assert code == 0 and "1 generated" in out and "1 jobs in all" in out
    assert any(line.startswith("conceptrol: warning: --method conceptrol given more than once") for line in err)


def test_a_run_in_which_every_job_fails_exits_non_zero(tmp_path, capsys):
    code, _, err = evaluate(capsys, "--benchmark", str(manifest(tmp_path, ("a cat on a sofa",))), *TINY,
                            "--no-score", "--out", str(tmp_path / "run"))
    assert code == 2 and "every one of the 2 jobs failed" in err[-1] and "'dog' not found" in err[-1]


def test_progress_is_plain_lines_in_a_log_and_no_per_image_bars(tmp_path, tiny_folder):
    model, adapters = tiny_folder  # loaded through diffusers as real weights are: no loading bars in the log either
    result = run_cli("evaluate", "--benchmark", str(manifest(tmp_path, ("a dog on the moon", "a dog in a cafe"))),
                     "--model", str(model), "--adapter-repo", str(adapters), *TINY[2:], "--no-score",
                     "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "conceptrol: generate: 4 jobs to do"
    assert lines[-1].startswith("conceptrol: generate 4/4 jobs (100%), ") and "left" in lines[-1]
    assert all(line.startswith("conceptrol: generate") for line in lines)  # no per-image bars, no library noise


def test_report_of_a_missing_folder_or_a_file_creates_nothing(tmp_path, capsys):
    for target in (tmp_path / "nothing-here", tmp_path / "a-file"):
        if target.name == "a-file":
            target.write_text("x")
        code = main(["report", str(target)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "is not a run folder" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_report_of_a_moved_and_damaged_run_counts_what_it_skips(tmp_path, capsys):
    dreambench_plus(tmp_path / "bench", {("object", "00"): "red backpack\na backpack on the moon\na backpack in a cafe\n",
                                         ("object", "01"): "blue backpack\na backpack on a boat\n"})
    code, _, err = evaluate(capsys, "--benchmark", "bench", *TINY, "--method", "conceptrol", "--no-score",
                            "--out", "run-here")  # relative paths, as users type them
    assert code == 0, err
    moved = tmp_path / "elsewhere" / "run"
    shutil.move("run-here", moved)
    images = sorted(moved.glob("images/**/*.png"))
    images[0].unlink()
    images[1].write_bytes(images[1].read_bytes()[:40])
    with (moved / "generations.rank0.jsonl").open("a") as f:
        f.write('{"key": "cut off by a kil\n')
    os.chdir(tmp_path / "elsewhere")  # report from another folder than evaluate ran in
    code = main(["report", str(moved)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "1 record lines could not be read" in out and "2 image files are missing or damaged" in out
    assert "no scores yet" in out and "--no-score" in out
    table = out[out.index("method"):]
    assert table.splitlines()[2].split()[:5] == ["conceptrol", "1", "3", "0", "0"]  # images, failed, scored
    page = (moved / "report.html").read_text()
    assert page.count("<i>missing</i>") == 2 and page.count("<img") == 3 + 1  # 3 references, 1 readable output


def test_report_counts_records_that_lack_a_field_as_malformed_and_skips_them(tmp_path, capsys):
    code, _, err = evaluate(capsys, "--benchmark", str(manifest(tmp_path, ("a dog on the moon", "a dog in a cafe"))),
                            *TINY, "--method", "conceptrol", "--no-score", "--out", str(tmp_path / "run"))
    assert code == 0, err
    generations = [json.loads(line) for line in (tmp_path / "run" / "generations.rank0.jsonl").read_text().splitlines()]
    scores = [{"key": g["key"], "generation_id": g["generation_id"], "finished": g["finished"], "clip_t": 0.3}
              for g in generations]  # no clip_i, no dino
    (tmp_path / "run" / "scores.rank0.jsonl").write_text("".join(json.dumps(s) + "\n" for s in scores))
    damaged = [{"key": "conceptrol/1/0/d0", "method": "conceptrol"},  # no scale, no status, ...
               {k: v for k, v in generations[1].items() if k != "status"} | {"finished": 1e12}]
    with (tmp_path / "run" / "generations.rank0.jsonl").open("a") as f:
        f.write("".join(json.dumps(g) + "\n" for g in damaged))
    code = main(["report", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert code == 0 and err == "", err
    assert f"{len(scores) + len(damaged)} record lines could not be read" in out
    table = out[out.index("method"):]
    assert table.splitlines()[2].split()[:5] == ["conceptrol", "1", "2", "0", "0"]  # the damaged lines left no mark
    assert "no scores yet" in out


def test_report_html_grid_says_which_seed_it_shows_and_every_image_has_alt_text(tmp_path, capsys):
    import re

    code, _, err = evaluate(capsys, "--benchmark", str(manifest(tmp_path, ("a dog on the moon",))), *TINY,
                            "--method", "conceptrol", "--seeds", "3", "1", "--no-score", "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert main(["report", str(tmp_path / "run")]) == 0
    page = (tmp_path / "run" / "report.html").read_text()
    images = re.findall(r"<img [^>]*>", page)
    assert images and all(re.search(r' alt="[^"]+"', tag) for tag in images)
    grid = page[page.index("<h2>Reference"):]
    assert grid.startswith("<h2>Reference &rarr; outputs, seed 1</h2>")  # the lowest of the run's seeds
    assert "seeds 1, 3" in grid and 'alt="conceptrol 1, seed 1: a dog on the moon"' in grid
    assert "seed 3:" not in grid


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_evaluate_with_an_unknown_method_is_one_line(tmp_path):
    result = run_cli("evaluate", "--benchmark", str(manifest(tmp_path)), "--method", "dreambooth",
                     "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and "unknown method" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_two_processes_under_torchrun_give_the_same_records_as_one(tmp_path):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "dog.png")
    rows = [{"id": f"d{i}", "image": "dog.png", "prompt": "a dog on the moon", "concept": "dog"} for i in range(3)]
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    common = ["evaluate", "--benchmark", str(tmp_path / "set.jsonl"), *TINY, "--no-score"]
    assert run_cli(*common, "--out", str(tmp_path / "one")).returncode == 0
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    two = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "conceptrol.cli", *common, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "rank 0/2" in two.stdout and "rank 1/2" in two.stdout

    def keys(run):
        return sorted(json.loads(line)["key"] for f in (tmp_path / run).glob("generations.rank*.jsonl")
                      for line in f.read_text().splitlines())

    assert keys("two") == keys("one") and len(keys("two")) == 6 == len(set(keys("two")))
    assert len(list((tmp_path / "two").glob("generations.rank*.jsonl"))) == 2
