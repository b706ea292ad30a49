"""Generation and scoring passes: resume without repeats or losses, sharding equal to one process, bad input."""

import json
import queue
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image
from test_eval_metrics import models  # noqa: F401  (fixture)

from conceptrol import ConceptrolError
from conceptrol.app.generate import GenerateSettings, run_conceptrol
from conceptrol.eval.benchmark import Case
from conceptrol.eval.runner import generate_pass, jobs, read_all, score_pass
from conceptrol.tiny import load_tiny_ip_adapter, tiny_sd15_pipeline

BASE = GenerateSettings(prompt="(each case)", concept=("x",), image=(__file__,), steps=2, size=(32, 32), start=0.0)


def cases(tmp_path, n=3):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "ref.png")
    prompts = ["a dog on the moon", "a dog in a cafe", "a cat on a sofa"][:n]
    return [Case(f"c{i}", tmp_path / "ref.png", p, "dog") for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_sd15_pipeline()
    load_tiny_ip_adapter(pipe, "plus")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_generation_records_every_job_once_and_errors_are_recorded_not_fatal(tmp_path, pipe):
    all_jobs = jobs(cases(tmp_path), ["ip-adapter", "conceptrol"], [1.0], [0])
    records = list(generate_pass(pipe, all_jobs, tmp_path / "run", BASE))
    assert len(records) == 6
    errors = [r for r in records if r["status"] == "error"]
    assert len(errors) == 2 and all("'dog' not found" in r["error"] for r in errors)  # "a cat on a sofa"
    assert all((tmp_path / "run" / r["image"]).is_file() for r in records if r["status"] == "ok")
    again = list(generate_pass(pipe, all_jobs, tmp_path / "run", BASE))  # resuming retries the failed jobs only
    assert sorted(r["key"] for r in again) == sorted(r["key"] for r in errors)


def test_two_shards_give_the_same_records_as_one_process(tmp_path, pipe):
    all_jobs = jobs(cases(tmp_path, 2), ["conceptrol"], [1.0], [0, 1])
    single = {r["key"]: r for r in generate_pass(pipe, all_jobs, tmp_path / "one", BASE)}
    for rank in (0, 1):
        list(generate_pass(pipe, all_jobs, tmp_path / "two", BASE, rank=rank, world_size=2))
    sharded = {r["key"]: r for r in read_all(tmp_path / "two", "generations")}
    assert sharded.keys() == single.keys() and len(read_all(tmp_path / "two", "generations")) == 4
    for key, record in single.items():
        a = np.asarray(Image.open(tmp_path / "one" / record["image"]))
        b = np.asarray(Image.open(tmp_path / "two" / sharded[key]["image"]))
        assert np.array_equal(a, b)


def test_scoring_scores_each_image_against_its_own_prompt_and_reference_once(tmp_path, pipe, models):  # noqa: F811
    Image.new("RGB", (16, 16), "blue").save(tmp_path / "other.png")
    two = [Case("moon", tmp_path / "ref.png", "a dog on the moon", "dog"),
           Case("cafe", tmp_path / "other.png", "a dog in a cafe", "dog")]
    cases(tmp_path)  # writes ref.png
    list(generate_pass(pipe, jobs(two, ["conceptrol"], [1.0], [0]), tmp_path, BASE))
    scores = {s["key"]: s for s in score_pass(models, tmp_path)}
    generated = {r["key"]: r for r in read_all(tmp_path, "generations")}
    assert scores.keys() == generated.keys() and len(scores) == 2
    for key, score in scores.items():
        record = generated[key]
        image = Image.open(tmp_path / record["image"]).convert("RGB")
        reference = Image.open(record["reference"]).convert("RGB")
        assert score["clip_t"] == pytest.approx(models.clip_t([image], [record["prompt"]])[0], abs=1e-6)
        assert score["clip_i"] == pytest.approx(models.clip_i([image], [reference])[0], abs=1e-6)
        assert score["dino"] == pytest.approx(models.dino_score([image], [reference])[0], abs=1e-6)
        assert score["generation_id"] == record["generation_id"]
    moon, cafe = scores["conceptrol/1/0/moon"], scores["conceptrol/1/0/cafe"]
    assert moon["clip_i"] != pytest.approx(cafe["clip_i"], abs=1e-4)  # each against its own reference
    assert list(score_pass(models, tmp_path)) == []


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_baselines_run_without_warm_up_even_when_start_is_given(tmp_path, pipe):
    one = cases(tmp_path, 1)
    base = BASE.replace(start=0.5, steps=4)
    records = {r["method"]: r for r in generate_pass(pipe, jobs(one, ["ip-adapter", "conceptrol"], [1.0], [0]),
                                                     tmp_path / "run", base)}
    reference = [Image.open(tmp_path / "ref.png").convert("RGB")]
    settings = base.replace(prompt=one[0].prompt, concept=("dog",), image=(tmp_path / "ref.png",), scale=1.0)
    no_warm_up = run_conceptrol(pipe, settings.replace(masking="none", start=0.0), reference).images[0]
    warm_up = run_conceptrol(pipe, settings.replace(masking="none", start=0.5), reference).images[0]
    assert not np.array_equal(np.asarray(no_warm_up), np.asarray(warm_up))  # the warm-up shows in the picture
    assert np.array_equal(pixels(tmp_path / "run" / records["ip-adapter"]["image"]), np.asarray(no_warm_up))
    ours = run_conceptrol(pipe, settings.replace(masking="global", start=0.5), reference).images[0]
    assert np.array_equal(pixels(tmp_path / "run" / records["conceptrol"]["image"]), np.asarray(ours))
    assert (records["ip-adapter"]["start"], records["conceptrol"]["start"]) == (0.0, 0.5)


def test_case_ids_that_fold_to_the_same_name_keep_their_own_pictures(tmp_path, pipe):
    cases(tmp_path)
    Image.new("RGB", (16, 16), "green").save(tmp_path / "green.png")
    folding = [Case("Dog/1", tmp_path / "ref.png", "a dog on the moon", "dog"),
               Case("dog-1", tmp_path / "green.png", "a dog in a cafe", "dog")]
    records = list(generate_pass(pipe, jobs(folding, ["conceptrol"], [1.0], [0]), tmp_path, BASE))
    paths = [r["image"] for r in records]
    assert len(set(paths)) == 2 and all(p.startswith("images/") for p in paths)
    for record, case in zip(records, folding):
        alone = run_conceptrol(pipe, BASE.replace(prompt=case.prompt, concept=("dog",), image=(case.image,), scale=1.0,
                                                  masking="global"), [Image.open(case.image).convert("RGB")])
        assert np.array_equal(pixels(tmp_path / record["image"]), np.asarray(alone.images[0]))


def test_a_failed_job_runs_again_on_resume(tmp_path, pipe):
    (tmp_path / "ref.png").write_bytes(b"not a picture yet")
    one = [Case("c0", tmp_path / "ref.png", "a dog on the moon", "dog")]
    (first,) = generate_pass(pipe, jobs(one, ["conceptrol"], [1.0], [0]), tmp_path, BASE)
    assert first["status"] == "error" and "cannot read reference image" in first["error"]
    Image.new("RGB", (16, 16), "red").save(tmp_path / "ref.png")
    one = [Case("c0", tmp_path / "ref.png", "a dog on the moon", "dog")]
    (second,) = generate_pass(pipe, jobs(one, ["conceptrol"], [1.0], [0]), tmp_path, BASE)
    assert second["status"] == "ok" and list(generate_pass(pipe, jobs(one, ["conceptrol"], [1.0], [0]), tmp_path, BASE)) == []


def test_a_case_whose_prompt_or_reference_changed_is_generated_and_scored_again(tmp_path, pipe, models):  # noqa: F811
    cases(tmp_path)
    before = [Case("c0", tmp_path / "ref.png", "a dog on the moon", "dog")]
    list(generate_pass(pipe, jobs(before, ["conceptrol"], [1.0], [0]), tmp_path, BASE))
    list(score_pass(models, tmp_path))
    after = [Case("c0", tmp_path / "ref.png", "a dog in a cafe", "dog")]  # same id, edited prompt
    (redone,) = generate_pass(pipe, jobs(after, ["conceptrol"], [1.0], [0]), tmp_path, BASE)
    assert redone["prompt"] == "a dog in a cafe"
    (rescored,) = score_pass(models, tmp_path)
    assert rescored["generation_id"] == redone["generation_id"]
    Image.new("RGB", (16, 16), "yellow").save(tmp_path / "ref.png")  # same file name, new picture
    assert len(list(generate_pass(pipe, jobs(after, ["conceptrol"], [1.0], [0]), tmp_path, BASE))) == 1


def test_repeated_methods_scales_and_seeds_make_each_job_once(tmp_path):
    all_jobs = jobs(cases(tmp_path, 2), ["conceptrol", "conceptrol"], [1.0, 1, 0.5], [0, 0])
    assert len(all_jobs) == len({j.key for j in all_jobs}) == 2 * 2


def test_an_image_is_on_disk_whole_before_its_record_and_a_failed_write_leaves_nothing(tmp_path, pipe, monkeypatch):
    one = cases(tmp_path, 1)
    original = Image.Image.save

    def broken_save(self, fp, *args, **kwargs):
        original(self, fp, *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        list(generate_pass(pipe, jobs(one, ["conceptrol"], [1.0], [0]), tmp_path / "run", BASE))
    assert read_all(tmp_path / "run", "generations") == []
    assert [p for p in (tmp_path / "run").rglob("*") if p.is_file() and not p.name.endswith(".jsonl")] == []
    monkeypatch.setattr(Image.Image, "save", original)
    (record,) = generate_pass(pipe, jobs(one, ["conceptrol"], [1.0], [0]), tmp_path / "run", BASE)
    assert Image.open(tmp_path / "run" / record["image"]).size == (32, 32)


def test_unknown_method_is_a_clear_error(tmp_path):
    with pytest.raises(ConceptrolError, match="unknown method"):
        jobs(cases(tmp_path), ["dreambooth"], [1.0], [0])


KILLED_RUN = """
import os, sys, time
from pathlib import Path
import conceptrol.app.generate
from conceptrol.eval import records
from conceptrol.eval.benchmark import Case
from conceptrol.eval.runner import generate_pass, jobs
from conceptrol.app.generate import GenerateSettings
from conceptrol.tiny import load_tiny_ip_adapter, tiny_sd15_pipeline

def pause_on_third(real, counted=lambda *a: True):  # the third counted call prints "pause" and waits to be killed
    calls = []
    def paused(*args, **kwargs):
        calls.extend([1] if counted(*args) else [])
        if len(calls) == 3 and counted(*args):
            print("pause", flush=True)
            time.sleep(600)
        return real(*args, **kwargs)
    return paused

where = sys.argv[2] if len(sys.argv) > 2 else ""
if where == "denoising":  # inside the third job's generation
    conceptrol.app.generate.run_conceptrol = pause_on_third(conceptrol.app.generate.run_conceptrol)
if where == "rename":  # the third image written to its temporary file, not yet renamed
    os.replace = pause_on_third(os.replace, lambda source, target: str(target).endswith(".png"))
if where == "record":  # the third image in place, its record not yet appended
    records.RecordStore.append = pause_on_third(records.RecordStore.append)
pipe = tiny_sd15_pipeline(); load_tiny_ip_adapter(pipe, "plus"); pipe.set_progress_bar_config(disable=True)
cases = [Case(f"c{i}", sys.argv[1] + "/ref.png", "a dog on the moon", "dog") for i in range(12)]
base = GenerateSettings(prompt="(each case)", concept=("x",), image=(sys.argv[1],), steps=2, size=(32, 32), start=0.0)
for record in generate_pass(pipe, jobs(cases, ["conceptrol"], [1.0], [0]), Path(sys.argv[1]) / "run", base):
    print(record["key"], flush=True)
"""


def test_a_run_killed_at_any_moment_resumes_without_losses_or_repeats(tmp_path, pipe):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "ref.png")
    for where in ("denoising", "rename", "record"):  # killed inside a job, at three different moments of it
        process = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(tmp_path), where], stdout=subprocess.PIPE,
                                   text=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line.strip()) for line in process.stdout], daemon=True).start()
        try:
            while lines.get(timeout=300) != "pause":
                pass
        finally:
            process.kill()
            process.wait(timeout=60)
        kept = read_all(tmp_path / "run", "generations")
        assert len(kept) == len({r["key"] for r in kept}) < 12
        for record in kept:  # every record's image is whole
            Image.open(tmp_path / "run" / record["image"]).load()
    assert len(kept) == 6  # two jobs done per run before its third was killed
    rerun = subprocess.run([sys.executable, "-c", KILLED_RUN, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0 and not set(rerun.stdout.split()) & {r["key"] for r in kept}
    final = read_all(tmp_path / "run", "generations")
    assert len(final) == 12 == len({r["key"] for r in final})
    assert not list((tmp_path / "run").rglob("*.tmp"))  # the write cut off by the kill was redone over its own file
    for record in final:  # pictures made across kills equal an uninterrupted generation
        alone = run_conceptrol(pipe, BASE.replace(prompt=record["prompt"], concept=("dog",), image=(tmp_path / "ref.png",),
                                                  scale=1.0, masking="global"), [Image.open(tmp_path / "ref.png")])
        assert np.array_equal(pixels(tmp_path / "run" / record["image"]), np.asarray(alone.images[0]))
    assert all(json.loads(line) for line in (tmp_path / "run" / "generations.rank0.jsonl").read_text().splitlines())
