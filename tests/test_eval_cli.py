"""`conceptrol evaluate` and `conceptrol report` as a user runs them (offline, tiny model, no scoring)."""

import json

from PIL import Image
from test_cli import run_cli


def test_evaluate_then_report_writes_records_table_and_html(tmp_path):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "dog.png")
    rows = [{"id": "d1", "image": "dog.png", "prompt": "a dog on the moon", "concept": "dog"},
            {"id": "d2", "image": "dog.png", "prompt": "a cat on a sofa", "concept": "dog"}]
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    args = ["evaluate", "--benchmark", str(tmp_path / "set.jsonl"), "--model", "tiny", "--steps", "2",
            "--size", "32x32", "--out", str(tmp_path / "run"), "--no-score"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert "4 generated (2 failed)" in first.stdout
    again = run_cli(*args)
    assert "0 generated" in again.stdout  # resumed: nothing repeated
    report = run_cli("report", str(tmp_path / "run"))
    assert report.returncode == 0 and "2 jobs failed" in report.stdout
    page = (tmp_path / "run" / "report.html").read_text()
    assert page.count("<img") == 1 + 2  # the reference and one output per method for the case that ran


def test_evaluate_with_an_unknown_method_is_one_line(tmp_path):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "dog.png")
    (tmp_path / "set.jsonl").write_text(json.dumps({"image": "dog.png", "prompt": "a dog", "concept": "dog"}))
    result = run_cli("evaluate", "--benchmark", str(tmp_path / "set.jsonl"), "--method", "dreambooth",
                     "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and "unknown method" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_two_processes_under_torchrun_give_the_same_records_as_one(tmp_path):
    import shutil
    import subprocess
    import sys

    Image.new("RGB", (16, 16), "red").save(tmp_path / "dog.png")
    rows = [{"id": f"d{i}", "image": "dog.png", "prompt": "a dog on the moon", "concept": "dog"} for i in range(3)]
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    common = ["evaluate", "--benchmark", str(tmp_path / "set.jsonl"), "--model", "tiny", "--steps", "2",
              "--size", "32x32", "--no-score"]
    assert run_cli(*common, "--out", str(tmp_path / "one")).returncode == 0
    torchrun = shutil.which("torchrun", path=str(__import__("pathlib").Path(sys.executable).parent))
    two = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "conceptrol.cli", *common, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "rank 0/2" in two.stdout and "rank 1/2" in two.stdout

    def keys(run):
        return sorted(json.loads(line)["key"] for f in (tmp_path / run).glob("generations.rank*.jsonl")
                      for line in f.read_text().splitlines())

    assert keys("two") == keys("one") and len(keys("two")) == 6 == len(set(keys("two")))
    assert len(list((tmp_path / "two").glob("generations.rank*.jsonl"))) == 2
