"""The judge's "dreambench-plus" protocol against a fake OpenAI-compatible server on 127.0.0.1.

The DreamBench++ clone is written here with placeholder templates of our own: the exact conversation DreamBench++'s
"full" setting sends, its score pattern and retries, back-off on rate limits and server errors, the template digest,
and the cost estimate.
"""

import base64
import hashlib
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from helpers import send_chat_answer
from PIL import Image

from conceptrol import ConceptrolError
from conceptrol.eval import judge as judge_module
from conceptrol.eval.dreambench_judge import changed_templates, parse_score, template_kind
from conceptrol.eval.judge import JudgeAnswerError, JudgeConfig, judge_case, judge_cost

TEMPLATES = {  # file name -> text as written (with the blank edges DreamBench++ strips)
    "user_prompt_subject_full.txt": "USER SUBJECT TEMPLATE 7f3a\n",
    "gpt_prompt_subject_full.txt": "  GPT SUBJECT TEMPLATE 7f3a, a longer one\n\n",
    "user_prompt_style_full.txt": "USER STYLE TEMPLATE 7f3a\n",
    "gpt_prompt_style_full.txt": "GPT STYLE TEMPLATE 7f3a\n",
    "user_prompt_text_full.txt": "\nUSER TEXT TEMPLATE 7f3a\n",
    "gpt_prompt_text_full.txt": "GPT TEXT TEMPLATE 7f3a, the longest of the six\n",
}
REFERENCE = Image.new("RGB", (16, 16), (220, 30, 30))  # red, square
GENERATED = Image.new("RGB", (40, 20), (30, 30, 220))  # blue, not square: the judge still sees 512x512


def text(name):
    return TEMPLATES[name].strip()


@pytest.fixture
def clone(tmp_path):
    """A folder shaped like a DreamBench++ clone: dreambench_plus/prompts/ with the six "full" templates."""
    prompts = tmp_path / "dreambench_plus_clone" / "dreambench_plus" / "prompts"
    prompts.mkdir(parents=True)
    for name, body in TEMPLATES.items():
        (prompts / name).write_text(body, encoding="utf-8")
    (prompts.parent.parent / "data").mkdir()
    return prompts.parent.parent


class FakeJudge:
    """Serves `reply(body)` -> (status, headers, answer) for each POST and records every body it was sent."""

    def __init__(self):
        self.bodies = []
        self.reply = lambda body: (200, {}, "Score: 3")
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def script(self, *replies):
        """Answer with these (status, headers, answer) in order, then keep repeating the last."""
        queue = list(replies)
        self.reply = lambda body: queue.pop(0) if len(queue) > 1 else queue[0]

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.bodies.append(body)
                status, headers, answer = fake.reply(body)
                if status is None:  # drop the connection without an answer
                    self.close_connection = True
                    return
                send_chat_answer(self, answer, status, headers)

            def log_message(self, *args):
                pass

        return Handler


@pytest.fixture
def fake():
    fake = FakeJudge()
    thread = threading.Thread(target=fake.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def config(fake, clone, **options):
    options = {"runs": 1, "backoff": 0.0, **options}
    return JudgeConfig(fake.url, "judge-model", protocol="dreambench-plus", clone=clone, **options)


def decoded(part):
    """The image of an image_url part, after checking it is a JPEG data URL sent at detail high."""
    assert part["type"] == "image_url" and part["image_url"]["detail"] == "high"
    header, data = part["image_url"]["url"].split(",", 1)
    assert header == "data:image/jpeg;base64"
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    assert image.format == "JPEG" and image.size == (512, 512)
    return image.convert("RGB")


def is_red(image):
    r, g, b = image.getpixel((256, 256))
    return r > 180 and g < 80 and b < 80


def is_blue(image):
    r, g, b = image.getpixel((256, 256))
    return b > 180 and r < 80 and g < 80


def test_cp_question_is_the_templates_then_reference_and_generated_image_at_512_jpeg(fake, clone):
    judge_case(config(fake, clone), REFERENCE, GENERATED, "a dog on the moon", "dog", category="live_subject/animal")
    messages = fake.bodies[0]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"] == text("user_prompt_subject_full.txt")
    assert messages[1]["content"] == text("gpt_prompt_subject_full.txt")
    reference, generated = messages[2]["content"]  # exactly two parts: no text in the last turn
    assert is_red(decoded(reference)) and is_blue(decoded(generated))


def test_pf_question_is_the_text_templates_then_the_prompt_and_the_generated_image(fake, clone):
    judge_case(config(fake, clone), REFERENCE, GENERATED, "a dog on the moon", "dog", category="object")
    messages = fake.bodies[1]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"] == text("user_prompt_text_full.txt")
    assert messages[1]["content"] == text("gpt_prompt_text_full.txt")
    prompt, generated = messages[2]["content"]
    assert prompt == {"type": "text", "text": "a dog on the moon"} and is_blue(decoded(generated))


@pytest.mark.parametrize("category, kind", [("live_subject/animal", "subject"), ("live_subject/human", "subject"),
                                            ("object", "subject"), ("style", "style"), ("", "subject")])
def test_category_picks_the_style_or_subject_templates(fake, clone, category, kind):
    assert template_kind(category) == kind
    judge_case(config(fake, clone, runs=2), REFERENCE, GENERATED, "a dog", "dog", category=category)
    cp = [b for b in fake.bodies if b["messages"][0]["content"] != text("user_prompt_text_full.txt")]
    assert len(cp) == 2 and len(fake.bodies) == 4
    for body in cp:
        assert body["messages"][0]["content"] == text(f"user_prompt_{kind}_full.txt")
        assert body["messages"][1]["content"] == text(f"gpt_prompt_{kind}_full.txt")


def test_requests_use_temperature_1_and_a_fresh_random_seed_and_max_tokens_only_when_set(fake, clone):
    judge_case(config(fake, clone, runs=3), REFERENCE, GENERATED, "a dog", "dog")
    assert all(b["model"] == "judge-model" and b["temperature"] == 1 and "max_tokens" not in b for b in fake.bodies)
    seeds = [b["seed"] for b in fake.bodies]
    assert all(isinstance(s, int) and 0 <= s < 2**31 for s in seeds) and len(set(seeds)) == len(seeds) == 6
    fake.bodies.clear()
    judge_case(config(fake, clone, max_tokens=300), REFERENCE, GENERATED, "a dog", "dog")
    assert [b["max_tokens"] for b in fake.bodies] == [300, 300]


@pytest.mark.parametrize("answer, score", [("Score: 3", 3), ("score: 4", 4), ("Score: excellent 2", 2),
                                           ("The subject matches.\nScore:  1", 1), ("Score:0", 0)])
def test_their_score_pattern_reads_one_score(answer, score):
    assert parse_score(answer) == score


@pytest.mark.parametrize("answer", ["Score: 3, or rather score: 4", "no number here", "SCORE: 3", "Score - 3", ""])
def test_answers_without_exactly_one_score_are_not_read(answer):
    assert parse_score(answer) is None


def test_scores_are_scaled_and_averaged_over_runs(fake, clone):
    answers = {"cp": iter(["Score: 3", "score: 4"]), "pf": iter(["Score: excellent 2", "Score: 2"])}

    def reply(body):
        question = "pf" if body["messages"][0]["content"] == text("user_prompt_text_full.txt") else "cp"
        return 200, {}, next(answers[question])

    fake.reply = reply
    verdict = judge_case(config(fake, clone, runs=2), REFERENCE, GENERATED, "a dog", "dog")
    assert verdict == {"cp": pytest.approx(3.5 / 4), "pf": pytest.approx(0.5), "cp_runs": [3, 4], "pf_runs": [2, 2]}


@pytest.mark.parametrize("answer", ["Score: 3 at first; on reflection, Score: 4. " + "x" * 300, "I cannot tell. " * 30])
def test_answers_without_one_score_are_asked_again_then_fail_as_a_judgement(fake, clone, answer):
    fake.script((200, {}, answer))
    with pytest.raises(JudgeAnswerError) as caught:
        judge_case(config(fake, clone), REFERENCE, GENERATED, "a dog", "dog")
    assert len(fake.bodies) == 3  # DreamBench++'s max_retry, then the CP question failed (PF never asked)
    assert repr(answer[:200]) in str(caught.value) and answer[:201] not in str(caught.value)
    assert isinstance(caught.value, ConceptrolError)


def test_a_bad_answer_then_a_good_one_is_judged(fake, clone):
    fake.script((200, {}, "Score: 1 and Score: 2"), (200, {}, "no score"), (200, {}, "Score: 2"))
    verdict = judge_case(config(fake, clone), REFERENCE, GENERATED, "a dog", "dog")
    assert verdict["cp_runs"] == [2] and verdict["pf_runs"] == [2] and len(fake.bodies) == 4


def test_rate_limits_are_waited_out_honouring_retry_after(fake, clone):
    fake.script((429, {"Retry-After": "0"}, ""), (429, {"Retry-After": "0"}, ""), (200, {}, "Score: 4"))
    # the exponential back-off alone (5 s) would not fit the 1 s budget: only Retry-After: 0 lets this pass
    verdict = judge_case(config(fake, clone, backoff=5.0, retry_wait=1.0), REFERENCE, GENERATED, "a dog", "dog")
    assert verdict["cp_runs"] == [4] and verdict["pf_runs"] == [4]
    assert len(fake.bodies) == 4  # CP: 429, 429, 200; PF: 200


def test_back_off_doubles_without_retry_after(fake, clone, monkeypatch):
    waits = []
    monkeypatch.setattr(judge_module.time, "sleep", waits.append)
    fake.script((503, {}, ""), (502, {}, ""), (500, {}, ""), (200, {}, "Score: 1"))
    judge_case(config(fake, clone, backoff=0.5), REFERENCE, GENERATED, "a dog", "dog")
    assert waits == [0.5, 1.0, 2.0] and len(fake.bodies) == 5


def test_server_errors_end_in_a_resumable_error_after_the_bounded_tries(fake, clone):
    fake.script((500, {}, ""))
    with pytest.raises(ConceptrolError, match="kept failing.*HTTP 500.*finished cases are kept.*run again") as caught:
        judge_case(config(fake, clone, retries=3), REFERENCE, GENERATED, "a dog", "dog")
    assert not isinstance(caught.value, JudgeAnswerError)  # the run stops: it is not one failed judgement
    assert len(fake.bodies) == 4  # the first try and 3 retries


def test_a_retry_after_beyond_the_wait_budget_stops_at_once(fake, clone, monkeypatch):
    waits = []
    monkeypatch.setattr(judge_module.time, "sleep", waits.append)
    fake.script((429, {"Retry-After": "30"}, ""))
    with pytest.raises(ConceptrolError, match="kept failing.*HTTP 429"):
        judge_case(config(fake, clone, retry_wait=10.0), REFERENCE, GENERATED, "a dog", "dog")
    assert waits == [] and len(fake.bodies) == 1


def test_a_dropped_connection_is_retried(fake, clone):
    fake.script((None, {}, ""), (200, {}, "Score: 3"))
    assert judge_case(config(fake, clone), REFERENCE, GENERATED, "a dog", "dog")["cp_runs"] == [3]
    assert len(fake.bodies) == 3


def test_a_refused_key_is_not_retried_and_says_which_variable(fake, clone, monkeypatch):
    monkeypatch.setenv("CONCEPTROL_JUDGE_API_KEY", "wrong-key")
    fake.script((401, {}, ""))
    with pytest.raises(ConceptrolError, match="refused the API key.*CONCEPTROL_JUDGE_API_KEY"):
        judge_case(config(fake, clone), REFERENCE, GENERATED, "a dog", "dog")
    assert len(fake.bodies) == 1


def test_a_missing_template_is_named_and_says_the_benchmark_must_be_a_clone(fake, clone):
    (clone / "dreambench_plus" / "prompts" / "gpt_prompt_style_full.txt").unlink()
    with pytest.raises(ConceptrolError, match="gpt_prompt_style_full.txt.*--benchmark must be a clone of the "
                                              "DreamBench\\+\\+ repository.*prompts folder"):
        config(fake, clone)


def test_the_clones_data_folder_finds_the_templates_beside_it(fake, clone):
    assert config(fake, clone / "data").template_digest == config(fake, clone).template_digest


@pytest.mark.parametrize("options, message", [
    ({"protocol": "dreambench"}, "the judge's protocol must be one of conceptrol, dreambench-plus"),
    ({"protocol": "dreambench-plus"}, "pass the clone as --benchmark"),
    ({"max_tokens": 0}, "--judge-max-tokens must be at least 1"),
    ({"answer_tries": 0}, "answer_tries must be at least 1"),
])
def test_bad_judge_settings_are_refused(options, message):
    with pytest.raises(ConceptrolError, match=message):
        JudgeConfig("http://127.0.0.1:9/v1", **options)


def test_the_template_digest_names_a_changed_template(fake, clone):
    stored = config(fake, clone).template_digest
    prompts = clone / "dreambench_plus" / "prompts"
    assert stored == {name: hashlib.sha256(body.encode()).hexdigest() for name, body in TEMPLATES.items()}
    assert changed_templates(stored, config(fake, clone).template_digest) == []
    (prompts / "user_prompt_text_full.txt").write_text("USER TEXT TEMPLATE 7f3a, edited\n", encoding="utf-8")
    current = config(fake, clone).template_digest
    assert changed_templates(stored, current) == ["user_prompt_text_full.txt"]
    del stored["gpt_prompt_style_full.txt"]
    assert changed_templates(stored, current) == ["gpt_prompt_style_full.txt", "user_prompt_text_full.txt"]


def test_the_cost_estimate_counts_calls_template_tokens_and_images(fake, clone):
    subject = len("USER SUBJECT TEMPLATE 7f3a") + len("GPT SUBJECT TEMPLATE 7f3a, a longer one")  # 26 + 39 = 65
    style = len("USER STYLE TEMPLATE 7f3a") + len("GPT STYLE TEMPLATE 7f3a")  # 24 + 23 = 47
    pf = len("USER TEXT TEMPLATE 7f3a") + len("GPT TEXT TEMPLATE 7f3a, the longest of the six")  # 23 + 46 = 69
    assert (subject, style, pf) == (65, 47, 69)
    per_run = (17 + 2 * 765) * 2 + (12 + 2 * 765) + 3 * (18 + 765)  # ceil(65/4), ceil(47/4), ceil(69/4)
    cost = judge_cost(config(fake, clone, runs=3, max_tokens=100), 3, ["live_subject/animal", "style", "object"])
    assert (cost.calls, cost.input_tokens, cost.output_tokens) == (18, 3 * per_run, 1800)
    assert cost.describe() == f"3 images x 2 questions x 3 runs = 18 judge calls; about {3 * per_run:,} input and " \
                              "1,800 output tokens"
    big = judge_cost(config(fake, clone, runs=3), 1350)
    assert big.calls == 8100 and big.output_tokens is None
    assert big.input_tokens == 3 * 1350 * (17 + 2 * 765 + 18 + 765)
    assert big.describe().startswith("1350 images x 2 questions x 3 runs = 8100 judge calls; about 9,436,500 input")
    assert "not capped" in big.describe() and fake.bodies == []
