"""`conceptrol evaluate --protocol dreambench-plus`: Table 1's settings per method, flags winning over presets,
what run.json records, the dry run, and a DreamBench++ clone laid out as the repository is."""

import json

import pytest
from helpers import run_main, send_chat_answer
from test_eval_data import dreambench_plus

from conceptrol import ConceptrolError
from conceptrol.app.settings import NEGATIVE_PROMPT
from conceptrol.eval.evaluate import EvaluateSettings
from conceptrol.eval.protocol import apply_protocol

FAST = ["--steps", "2", "--size", "32x32", "--no-score"]


@pytest.fixture
def clone(tmp_path):
    """A DreamBench++ clone: its data/ in the release layout (the judge's templates come in the judge tests)."""
    root = tmp_path / "dreambench_plus"
    dreambench_plus(root / "data", {("live_subject/animal", "00"): "corgi dog\na dog on the moon\n",
                                    ("object", "00"): "red backpack\na backpack on a rock\n"})
    return root


def test_table_1_presets_fill_what_no_flag_gave(tmp_path):
    settings = EvaluateSettings(benchmark=tmp_path, out=tmp_path / "run", steps=2)
    applied = apply_protocol(settings, "sd15", "ip-adapter")
    filled = applied.settings
    assert (filled.size, filled.guidance, filled.negative_prompt, filled.adapter) == ((512, 512), 7.5, NEGATIVE_PROMPT, "plus")
    assert filled.steps == 2 and filled.start == 0.2  # the flag given wins; the warm-up is Conceptrol's (0.2)
    assert applied.method_scales == {"ip-adapter": (0.6,), "conceptrol": (1.5,)}
    assert "steps" not in applied.from_preset and {"size", "guidance", "scale", "start"} <= set(applied.from_preset)
    sdxl = apply_protocol(EvaluateSettings(benchmark=tmp_path, out=tmp_path, scale=(0.8,)), "sdxl", "ip-adapter")
    assert sdxl.settings.size == (1024, 1024) and sdxl.settings.guidance == 6.0
    assert sdxl.method_scales == {"ip-adapter": (0.8,), "conceptrol": (0.8,)} and "scale" not in sdxl.from_preset
    with pytest.raises(ConceptrolError, match="Table 1's rows .* this model and adapter is flux-kontext"):
        apply_protocol(settings, "flux-kontext", "kontext")


def test_evaluate_with_the_protocol_runs_each_row_at_its_own_scale_and_warm_up(clone, tmp_path, capsys):
    code, printed, err = run_main(capsys, "evaluate", "--protocol", "dreambench-plus", "--benchmark", str(clone),
                             "--model", "tiny", *FAST, "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert any(line.startswith("protocol dreambench-plus: from its presets") for line in printed)
    records = [json.loads(line) for line in (tmp_path / "run" / "generations.rank0.jsonl").read_text().splitlines()]
    rows = {(r["method"], r["scale"], r["start"]) for r in records}
    assert rows == {("ip-adapter", 0.6, 0.0), ("conceptrol", 1.5, 0.2)} and len(records) == 4
    stored = json.loads((tmp_path / "run" / "run.json").read_text())
    assert stored["protocol"] == "dreambench-plus" and "guidance" in stored["from_preset"]
    assert "steps" not in stored["from_preset"] and stored["settings"]["guidance"] == 7.5
    assert stored["settings"]["negative_prompt"] == NEGATIVE_PROMPT


def test_resuming_with_the_protocol_dropped_or_added_is_refused(clone, tmp_path, capsys):
    with_protocol = ["--protocol", "dreambench-plus", "--benchmark", str(clone)]
    without = ["--benchmark", str(clone / "data")]  # the same cases, without Table 1's settings and judge
    for first, then, stored in ((with_protocol, without, "protocol dreambench-plus there, none now"),
                                (without, with_protocol, "protocol none there, dreambench-plus now")):
        out = tmp_path / f"run-{len(first)}"
        code, _, err = run_main(capsys, "evaluate", *first, "--model", "tiny", *FAST, "--out", str(out))
        assert code == 0, err
        made = (out / "generations.rank0.jsonl").read_text()
        code, _, err = run_main(capsys, "evaluate", *then, "--model", "tiny", *FAST, "--out", str(out))
        assert code == 2 and len(err) == 1 and stored in err[0] and "pass a new --out" in err[0], err
        assert (out / "generations.rank0.jsonl").read_text() == made


def test_a_clone_without_its_data_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "dreambench_plus" / "dreambench_plus" / "prompts").mkdir(parents=True)
    code, _, err = run_main(capsys, "evaluate", "--protocol", "dreambench-plus", "--benchmark",
                       str(tmp_path / "dreambench_plus"), "--model", "tiny", *FAST, "--out", str(tmp_path / "run"))
    assert code == 2 and len(err) == 1 and "clone of the DreamBench++ repository with its released data/" in err[0]


def test_a_dry_run_lists_the_jobs_and_creates_nothing(clone, tmp_path, capsys):
    code, printed, err = run_main(capsys, "evaluate", "--protocol", "dreambench-plus", "--benchmark", str(clone),
                             "--model", "tiny", *FAST, "--dry-run", "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert "dry run: 4 of 4 jobs to generate conceptrol at scale 1.5: 2; ip-adapter at scale 0.6: 2" in printed
    assert printed[-1] == "dry run: nothing was generated, scored or judged" and not (tmp_path / "run").exists()


@pytest.fixture
def judge_server():
    """An OpenAI-compatible judge on 127.0.0.1 that answers every question 'Score: 3' and keeps what it was sent."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            send_chat_answer(self, "Looks fine.\nScore: 3")

        def do_GET(self):  # noqa: N802
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    server.shutdown()


def with_templates(clone):
    from test_dreambench_judge import TEMPLATES

    prompts = clone / "dreambench_plus" / "prompts"
    prompts.mkdir(parents=True)
    for name, body in TEMPLATES.items():
        (prompts / name).write_text(body)
    return clone


def test_a_judged_protocol_run_prints_its_cost_asks_for_yes_and_judges_with_the_clones_templates(clone, tmp_path,
                                                                                                  capsys, judge_server):
    url, seen = judge_server
    args = ["evaluate", "--protocol", "dreambench-plus", "--benchmark", str(with_templates(clone)), "--model", "tiny",
            *FAST, "--judge-url", url, "--judge-runs", "1", "--out", str(tmp_path / "run")]
    code, printed, err = run_main(capsys, *args)  # stdin is not a terminal here: a script must say --yes
    assert code == 2 and "pass --yes to start it from a script" in err[-1] and seen == []
    assert "judge: 4 images x 2 questions x 1 runs = 8 judge calls" in " ".join(printed)
    assert not list((tmp_path / "run").glob("generations*"))
    code, printed, err = run_main(capsys, *args, "--yes")
    assert code == 0, err
    assert len(seen) == 8 and all(body["temperature"] == 1 and "seed" in body for body in seen)
    first_turns = {body["messages"][0]["content"] for body in seen}
    assert first_turns == {"USER SUBJECT TEMPLATE 7f3a", "USER TEXT TEMPLATE 7f3a"}  # read from the clone's files
    verdicts = [json.loads(line) for line in (tmp_path / "run" / "judgements.rank0.jsonl").read_text().splitlines()]
    assert len(verdicts) == 4 and all(v["cp"] == v["pf"] == 0.75 for v in verdicts)
    stored = json.loads((tmp_path / "run" / "judge.json").read_text())
    assert stored["protocol"] == "dreambench-plus" and "user_prompt_subject_full.txt" in stored["templates"]
    (clone / "dreambench_plus" / "prompts" / "gpt_prompt_text_full.txt").write_text("EDITED")
    code, _, err = run_main(capsys, *args, "--yes")
    assert code == 2 and "template(s) gpt_prompt_text_full.txt changed" in err[-1]


def test_report_paper_on_a_protocol_run_with_overridden_settings_names_them_instead_of_the_paper(clone, tmp_path,
                                                                                                  capsys, judge_server):
    url, _ = judge_server
    code, _, err = run_main(capsys, "evaluate", "--protocol", "dreambench-plus", "--benchmark", str(with_templates(clone)),
                       "--model", "tiny", *FAST, "--judge-url", url, "--judge-runs", "1", "--yes",
                       "--out", str(tmp_path / "run"))
    assert code == 0, err
    code, printed, err = run_main(capsys, "report", "--paper", str(tmp_path / "run"))
    assert code == 0, err
    assert printed[0].startswith("not set beside Table 1 of arXiv 2503.06568 (IP-Adapter, SD 1.5)")
    for named in ("steps 2 (the paper's: 50)", "size 32x32 (the paper's: 512x512)", "model tiny (random weights)"):
        assert named in printed[0]
    rows = [line.split() for line in printed if line.startswith(("ip-adapter", "conceptrol"))]
    assert [row[:3] for row in rows] == [["ip-adapter", "0.6", "2"], ["conceptrol", "1.5", "2"]]
    text = "\n".join(printed)
    assert "0.881" not in text and "+89%" not in text and "nan" not in text and "[too few images]" in text
    assert (tmp_path / "run" / "paper.png").is_file()
    code, _, err = run_main(capsys, "report", "--baseline-scale", "0.6", str(tmp_path / "run"))
    assert code == 2 and "--baseline-scale goes with --paper" in err[-1]


def test_report_paper_on_a_run_without_the_protocol_says_so_in_one_line(clone, tmp_path, capsys, judge_server):
    url, _ = judge_server
    code, _, err = run_main(capsys, "evaluate", "--benchmark", str(clone / "data"), "--model", "tiny", *FAST,
                            "--judge-url", url, "--judge-runs", "1", "--yes", "--out", str(tmp_path / "run"))
    assert code == 0, err
    code, printed, err = run_main(capsys, "report", "--paper", str(tmp_path / "run"))
    assert code == 0, err
    assert printed[0].startswith("not set beside Table 1") and "without --protocol dreambench-plus" in printed[0]
    assert "paper CP" not in printed[1] and "0.881" not in "\n".join(printed)


def test_a_judge_that_wants_a_key_when_none_is_set_says_which_variable(clone, tmp_path, capsys, monkeypatch):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Locked(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args):
            pass

    for variable in ("CONCEPTROL_JUDGE_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Locked)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code, _, err = run_main(capsys, "evaluate", "--protocol", "dreambench-plus", "--benchmark", str(with_templates(clone)),
                           "--model", "tiny", *FAST, "--judge-url", f"http://127.0.0.1:{server.server_address[1]}/v1",
                           "--dry-run", "--out", str(tmp_path / "run"))
    finally:
        server.shutdown()
    assert code == 2 and len(err) == 1 and "wants an API key (HTTP 401) and none is set" in err[0]
    assert "OPENAI_API_KEY" in err[0]


def test_a_missing_judge_template_names_the_protocol_flag(clone, tmp_path, capsys):
    (with_templates(clone) / "dreambench_plus" / "prompts" / "gpt_prompt_style_full.txt").unlink()
    code, _, err = run_main(capsys, "evaluate", "--protocol", "dreambench-plus", "--benchmark", str(clone),
                            "--model", "tiny", *FAST, "--judge-url", "http://127.0.0.1:9/v1", "--yes", "--dry-run",
                            "--out", str(tmp_path / "run"))
    assert code == 2 and len(err) == 1 and "gpt_prompt_style_full.txt is missing" in err[0]
    assert "for --protocol dreambench-plus the --benchmark must be a clone" in err[0]
    assert "--judge-protocol" not in err[0]


def test_the_judge_cost_counts_only_the_jobs_that_can_be_judged(tmp_path, capsys, judge_server):
    url, _ = judge_server
    root = tmp_path / "dreambench_plus"
    captions = {("live_subject/animal", "00"): "corgi dog\na dog on the moon\na corgi in the snow\n",
                ("object", "00"): "red backpack\na backpack on a rock\n"}
    dreambench_plus(root / "data", captions)
    judgeable = 2 * 2  # two methods x the two prompts that hold their concept ('a corgi in the snow' lacks 'dog')
    code, printed, err = run_main(capsys, "evaluate", "--protocol", "dreambench-plus", "--benchmark",
                                  str(with_templates(root)), "--model", "tiny", *FAST, "--judge-url", url,
                                  "--judge-runs", "1", "--dry-run", "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert "dry run: 6 of 6 jobs to generate" in " ".join(printed)  # all are tried; two will fail
    assert f"judge: {judgeable} images x 2 questions x 1 runs = {judgeable * 2} judge calls" in " ".join(printed)


def test_the_judge_cost_after_an_edited_caption_counts_the_pictures_made_again(clone, tmp_path, capsys, judge_server):
    url, seen = judge_server
    args = ["evaluate", "--protocol", "dreambench-plus", "--benchmark", str(with_templates(clone)), "--model", "tiny",
            *FAST, "--judge-url", url, "--judge-runs", "1", "--yes", "--out", str(tmp_path / "run")]
    code, _, err = run_main(capsys, *args)
    assert code == 0, err
    caption = clone / "data" / "captions" / "object" / "00.txt"
    caption.write_text(caption.read_text().replace("on a rock", "on a boat"))  # one case of two, for both methods
    code, printed, err = run_main(capsys, *args, "--dry-run")
    assert code == 0, err
    assert "judge: 2 images x 2 questions x 1 runs = 4 judge calls" in " ".join(printed)
    asked = len(seen)
    code, _, err = run_main(capsys, *args)
    assert code == 0 and len(seen) - asked == 4, err  # the run asks what the dry run counted
