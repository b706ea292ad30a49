"""The VLM judge against a fake OpenAI-compatible server on 127.0.0.1, and the report with judge columns."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from helpers import send_chat_answer
from PIL import Image
from test_eval_metrics import models  # noqa: F401  (fixture)
from test_eval_runner import BASE, cases, pipe  # noqa: F401  (fixtures)

from conceptrol import ConceptrolError
from conceptrol.eval.judge import CP_PROMPT, PF_PROMPT, JudgeAnswerError, JudgeConfig, judge_case, judge_cost
from conceptrol.eval.report import format_table, write_html, write_plots
from conceptrol.eval.rundata import summarize
from conceptrol.eval.runner import generate_pass, jobs, judge_pass, read_all, score_pass


@pytest.fixture
def fake_judge():
    """Answers CP questions with scores 3, 4, 3, ... and PF questions with 2; records what it was sent."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body, self.headers.get("Authorization")))
            text = body["messages"][0]["content"][0]["text"]
            score = (3 if len(seen) % 2 else 4) if "reference photo" in text else 2
            answer = "I cannot say." if "unsure" in text else f"Reasoning...\nScore: {score}"
            send_chat_answer(self, answer)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    server.shutdown()


def test_judge_scores_are_scaled_and_averaged_over_runs(fake_judge, monkeypatch):
    url, seen = fake_judge
    monkeypatch.setenv("CONCEPTROL_JUDGE_API_KEY", "secret")
    image = Image.new("RGB", (16, 16), "blue")
    verdict = judge_case(JudgeConfig(url, "judge-model", runs=2), image, image, "a dog on the moon", "dog")
    assert verdict["cp_runs"] == [3, 4] and verdict["cp"] == pytest.approx(3.5 / 4)
    assert verdict["pf_runs"] == [2, 2] and verdict["pf"] == pytest.approx(0.5)
    path, body, auth = seen[0]
    assert path == "/v1/chat/completions" and body["model"] == "judge-model" and auth == "Bearer secret"
    assert len(body["messages"][0]["content"]) == 3  # the instructions, the reference, the generated image


def test_conceptrol_protocol_asks_our_own_question_and_ignores_the_category(fake_judge):
    url, seen = fake_judge
    image = Image.new("RGB", (16, 16), "blue")
    judge_case(JudgeConfig(url, runs=1), image, image, "a dog on the moon", "dog", category="style")
    judge_case(JudgeConfig(url, runs=1, max_tokens=50), image, image, "a dog on the moon", "dog")
    cp, pf = seen[0][1]["messages"], seen[1][1]["messages"]
    assert len(cp) == 1 and cp[0]["content"][0]["text"] == CP_PROMPT.format(concept="dog")
    assert len(pf) == 1 and pf[0]["content"][0]["text"] == PF_PROMPT.format(prompt="a dog on the moon")
    assert all("temperature" not in body and "seed" not in body for _, body, _ in seen)
    assert ["max_tokens" in body for _, body, _ in seen] == [False, False, True, True]


def test_an_answer_without_a_score_is_asked_again_then_is_a_failed_judgement(fake_judge):
    url, seen = fake_judge
    image = Image.new("RGB", (16, 16), "blue")
    with pytest.raises(JudgeAnswerError, match="no readable 'Score: N' in 2 answers.*I cannot say"):
        judge_case(JudgeConfig(url, runs=1, answer_tries=2), image, image, "an unsure dog", "dog")
    assert len(seen) == 3  # CP scored at once, PF asked twice


def test_conceptrol_protocol_cost_counts_our_questions():
    cost = judge_cost(JudgeConfig("http://127.0.0.1:9/v1", runs=2, max_tokens=10), 5)
    cp, pf = -(-len(CP_PROMPT) // 4), -(-len(PF_PROMPT) // 4)
    assert (cost.calls, cost.input_tokens, cost.output_tokens) == (20, 2 * 5 * (cp + 2 * 765 + pf + 765), 200)


def test_unreachable_judge_is_a_clear_error_and_keeps_finished_cases(tmp_path, pipe):  # noqa: F811
    list(generate_pass(pipe, jobs(cases(tmp_path, 2), ["conceptrol"], [1.0], [0]), tmp_path, BASE))
    with pytest.raises(ConceptrolError, match="could not be used.*finished cases are kept"):
        list(judge_pass(JudgeConfig("http://127.0.0.1:9/v1", runs=1, timeout=5), tmp_path))
    assert len(read_all(tmp_path, "generations")) == 2


def test_report_has_cp_pf_columns_and_plots_when_a_judge_ran(tmp_path, pipe, models, fake_judge):  # noqa: F811
    url, _ = fake_judge
    all_jobs = jobs(cases(tmp_path, 2), ["ip-adapter", "conceptrol"], [1.0], [0])
    list(generate_pass(pipe, all_jobs, tmp_path, BASE))
    list(score_pass(models, tmp_path))
    assert len(list(judge_pass(JudgeConfig(url, runs=1), tmp_path))) == 4
    rows = summarize(tmp_path)
    assert [r["method"] for r in rows] == ["conceptrol", "ip-adapter"]
    for row in rows:
        assert row["cp_pf"] == pytest.approx(row["cp"] * row["pf"]) and row["pf"] == pytest.approx(0.5)
    assert "cp_pf" in format_table(rows)
    plots = write_plots(tmp_path, rows)
    assert [p.name for p in plots] == ["metrics.png", "cp_pf.png", "grid.png"]
    page = write_html(tmp_path, rows, plots).read_text()
    assert "<th>cp_pf</th>" in page and page.count("<img") == 2 + 2 * 3
