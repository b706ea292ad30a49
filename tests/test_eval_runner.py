"""Generation and scoring passes: resume without repeats, sharding equal to one process, bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from test_eval_metrics import models  # noqa: F401  (fixture)

from conceptrol import ConceptrolError
from conceptrol.eval.benchmark import Case
from conceptrol.eval.runner import generate_pass, jobs, read_all, score_pass
from conceptrol.generate import GenerateSettings
from conceptrol.tiny import load_tiny_ip_adapter, tiny_sd15_pipeline

BASE = GenerateSettings(prompt="", concept=("x",), image=(__file__,), steps=2, size=(32, 32), start=0.0)


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
    assert list(generate_pass(pipe, all_jobs, tmp_path / "run", BASE)) == []  # resuming repeats nothing


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


def test_scoring_scores_each_generated_image_once(tmp_path, pipe, models):  # noqa: F811
    all_jobs = jobs(cases(tmp_path, 2), ["conceptrol"], [1.0], [0])
    list(generate_pass(pipe, all_jobs, tmp_path, BASE))
    scores = list(score_pass(models, tmp_path))
    assert len(scores) == 2 and all(-1 <= s["clip_t"] <= 1 and -1 <= s["dino"] <= 1 for s in scores)
    assert list(score_pass(models, tmp_path)) == []


def test_unknown_method_is_a_clear_error(tmp_path):
    with pytest.raises(ConceptrolError, match="unknown method"):
        jobs(cases(tmp_path), ["dreambooth"], [1.0], [0])


KILLED_RUN = """
import sys
from conceptrol.eval.benchmark import Case
from conceptrol.eval.runner import generate_pass, jobs
from conceptrol.generate import GenerateSettings
from conceptrol.tiny import load_tiny_ip_adapter, tiny_sd15_pipeline
pipe = tiny_sd15_pipeline(); load_tiny_ip_adapter(pipe, "plus"); pipe.set_progress_bar_config(disable=True)
cases = [Case(f"c{i}", sys.argv[1] + "/ref.png", "a dog on the moon", "dog") for i in range(40)]
base = GenerateSettings(prompt="", concept=("x",), image=(sys.argv[1],), steps=2, size=(32, 32), start=0.0)
for record in generate_pass(pipe, jobs(cases, ["conceptrol"], [1.0], [0]), __import__("pathlib").Path(sys.argv[1]) / "run", base):
    print(record["key"], flush=True)
"""


def test_a_killed_run_resumes_where_it_stopped(tmp_path):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "ref.png")
    process = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    finished = [process.stdout.readline().strip() for _ in range(3)]
    process.kill()
    process.wait()
    kept = [r["key"] for r in read_all(tmp_path / "run", "generations")]
    assert finished == kept[:3] and len(kept) == len(set(kept))
    rerun = subprocess.run([sys.executable, "-c", KILLED_RUN, str(tmp_path)], capture_output=True, text=True, timeout=600)
    resumed = rerun.stdout.split()
    assert rerun.returncode == 0 and not set(resumed) & set(kept)
    final = [r["key"] for r in read_all(tmp_path / "run", "generations")]
    assert len(final) == 40 == len(set(final))
    assert all(json.loads(line) for line in (tmp_path / "run" / "generations.rank0.jsonl").read_text().splitlines())
