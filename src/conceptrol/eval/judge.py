"""A vision-language judge for concept preservation (CP) and prompt following (PF), via any OpenAI-compatible
chat-completions endpoint the user configures. Scores are 0-4, divided by 4, averaged over several runs.

Two protocols ask the questions: "conceptrol" (the default) asks our own (CP_PROMPT, PF_PROMPT); "dreambench-plus"
asks DreamBench++'s, exactly as its evaluation code does, with its templates read from the user's clone
(dreambench_judge.py). Both share one transport: rate limits, server errors and dropped connections are sent again
with exponential back-off within a bounded wait; an answer without a readable score is asked again a few times and
then is one failed judgement (JudgeAnswerError), not a failed run.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import io
import json
import math
import os
import re
import secrets
import statistics
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image

from ..core.errors import ConceptrolError
from . import dreambench_judge as dreambench

CP_PROMPT = (
    "You compare two images. The first is a reference photo of a subject (a {concept}); the second was generated "
    "by a model asked to show that same subject. Rate how faithfully the second image preserves the identity of "
    "the subject: shape, colours, texture and distinctive details, ignoring pose, background and style changes "
    "the prompt asked for. 0 = a different subject, 1 = same kind but clearly different, 2 = similar with notable "
    "differences, 3 = the same subject with small differences, 4 = the same subject. Think briefly, then end "
    "with a line 'Score: N' where N is 0, 1, 2, 3 or 4."
)
PF_PROMPT = (
    "You judge a generated image against the text prompt it was made from: \"{prompt}\". Ignore how the subject "
    "itself looks; rate how well the scene, action, setting and style follow the prompt. 0 = unrelated, "
    "1 = little of it, 2 = about half, 3 = most of it, 4 = all of it. Think briefly, then end with a line "
    "'Score: N' where N is 0, 1, 2, 3 or 4."
)
SCORE = re.compile(r"score\s*[:=]\s*\**\s*([0-4])\b", re.IGNORECASE)
PROTOCOLS = ("conceptrol", "dreambench-plus")
IMAGE_TOKENS = 765  # OpenAI's count for one 512x512 image at detail "high": 85 base + 4 tiles of 170
CHARS_PER_TOKEN = 4  # the usual rough rule for English text


class JudgeAnswerError(ConceptrolError):
    """The judge answered every try without a readable score: one failed judgement, to be recorded, not a failed run."""


@dataclass(frozen=True)
class JudgeConfig:
    """Where the judge lives and how it is asked; the API key comes from CONCEPTROL_JUDGE_API_KEY or OPENAI_API_KEY."""

    base_url: str  # e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1
    model: str = "gpt-4o"
    runs: int = 3  # independent judgements averaged per case
    timeout: float = 120.0  # seconds for one request
    protocol: str = "conceptrol"  # "conceptrol" (our questions) or "dreambench-plus" (DreamBench++'s, from `clone`)
    clone: Path | None = None  # dreambench-plus: the DreamBench++ clone (--benchmark) with dreambench_plus/prompts/
    max_tokens: int | None = None  # a cap on each answer's length; None = not sent
    answer_tries: int = 3  # questions asked while answers have no readable score (DreamBench++'s max_retry)
    retries: int = 8  # sends of one request again after HTTP 429 or 5xx, a dropped connection or a timeout
    retry_wait: float = 600.0  # seconds of back-off in all for one request; past it the run stops (resumable)
    backoff: float = 2.0  # the first back-off in seconds, doubled each time; a Retry-After header wins
    templates: dreambench.Templates | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConceptrolError(f"--judge-url must be an http(s) address such as https://api.openai.com/v1, "
                                  f"got {self.base_url!r}")
        if not self.model.strip():
            raise ConceptrolError("--judge-model must name the judge's model, e.g. gpt-4o")
        if not _count(self.runs, 1, 20):
            raise ConceptrolError(f"--judge-runs must be from 1 to 20 judgements per image, got {self.runs!r}")
        if not self.timeout > 0:
            raise ConceptrolError(f"the judge timeout must be positive, got {self.timeout!r}")
        if self.max_tokens is not None and not _count(self.max_tokens, 1):
            raise ConceptrolError(f"--judge-max-tokens must be at least 1 (or left out), got {self.max_tokens!r}")
        if not (_count(self.answer_tries, 1) and _count(self.retries, 0) and self.retry_wait >= 0
                and self.backoff >= 0):
            raise ConceptrolError("the judge's answer_tries must be at least 1, and retries, retry_wait and backoff "
                                  "at least 0")
        self._check_protocol()

    def _check_protocol(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConceptrolError(f"the judge's protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.protocol == "dreambench-plus":
            if self.clone is None:
                raise ConceptrolError("--protocol dreambench-plus reads DreamBench++'s prompt templates from a "
                                      "clone of its repository: pass the clone as --benchmark")
            object.__setattr__(self, "templates", dreambench.load_templates(Path(self.clone)))

    @property
    def api_key(self) -> str | None:
        return os.environ.get("CONCEPTROL_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")

    @property
    def template_digest(self) -> dict[str, str]:
        """File name -> SHA-256 of each DreamBench++ template in use ({} for the conceptrol protocol)."""
        return dict(self.templates.digest) if self.templates else {}


def _count(value: object, low: int, high: int | None = None) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool) and value >= low
            and (high is None or value <= high))


def check_judge(config: JudgeConfig) -> None:
    """One cheap request (GET <base>/models) before any image is made: an unreachable judge or a refused key fails now.

    Endpoints that do not list models (404, 405, 501) pass: only reachability and authentication are checked.
    """
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    url = config.base_url.rstrip("/") + "/models"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=min(config.timeout, 15)):
            return
    except urllib.error.HTTPError as error:
        if error.code in (401, 403):
            raise _key_refused(config, error.code) from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ConceptrolError(f"the judge at {config.base_url} is unreachable ({reason}); check --judge-url, "
                              "or leave it out to skip judging") from None


def judge_case(config: JudgeConfig, reference: Image.Image, image: Image.Image, prompt: str, concept: str, *,
               category: str = "") -> dict:
    """CP and PF of one generated image, each the mean of `runs` 0-4 scores divided by 4.

    `category` picks DreamBench++'s template (style or subject); the conceptrol protocol ignores it. Raises
    JudgeAnswerError when a question got no readable score in `answer_tries` answers (record a failed judgement),
    and ConceptrolError when the endpoint cannot be used (stop; finished cases are kept).
    """
    cp_question, pf_question = _questions(config, reference, image, prompt, concept, category)
    cp = [_ask(config, *cp_question) for _ in range(config.runs)]
    pf = [_ask(config, *pf_question) for _ in range(config.runs)]
    return {"cp": statistics.fmean(cp) / 4, "pf": statistics.fmean(pf) / 4, "cp_runs": cp, "pf_runs": pf}


Question = tuple[list[dict], Callable[[str], int | None]]  # the messages, and how a score is read from an answer


def _questions(config: JudgeConfig, reference: Image.Image, image: Image.Image, prompt: str, concept: str,
               category: str) -> tuple[Question, Question]:
    """The CP and PF conversations of one case, each image encoded once for all runs."""
    if config.templates is not None:
        generated = dreambench.image_part(image)
        cp = dreambench.cp_messages(config.templates, dreambench.template_kind(category),
                                    dreambench.image_part(reference), generated)
        return (cp, dreambench.parse_score), (dreambench.pf_messages(config.templates, prompt, generated),
                                              dreambench.parse_score)
    generated = _png_part(image)
    cp = [{"role": "user", "content": [{"type": "text", "text": CP_PROMPT.format(concept=concept)},
                                       _png_part(reference), generated]}]
    pf = [{"role": "user", "content": [{"type": "text", "text": PF_PROMPT.format(prompt=prompt)}, generated]}]
    return (cp, _last_score), (pf, _last_score)


def _last_score(answer: str) -> int | None:
    matches = SCORE.findall(answer)
    return int(matches[-1]) if matches else None


def _png_part(image: Image.Image) -> dict:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def _ask(config: JudgeConfig, messages: list[dict], parse: Callable[[str], int | None]) -> int:
    """One judgement: the question asked up to `answer_tries` times until an answer has a readable score."""
    answer = ""
    for _ in range(config.answer_tries):
        body = {"model": config.model, "messages": messages}
        if config.protocol == "dreambench-plus":
            body |= {"temperature": 1, "seed": secrets.randbelow(2**31)}  # as DreamBench++: a fresh seed per request
        if config.max_tokens is not None:
            body["max_tokens"] = config.max_tokens
        answer = _complete(config, body)
        score = parse(answer)
        if score is not None:
            return score
    raise JudgeAnswerError(f"the judge gave no readable 'Score: N' in {config.answer_tries} answers; the last one "
                           f"began {answer[:200]!r}")


class _Transient(Exception):
    """A failure worth sending the same request again for (rate limit, server error, dropped connection)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


def _complete(config: JudgeConfig, body: dict) -> str:
    """POST one chat completion and return the answer's text; transient failures are sent again with back-off."""
    url = config.base_url.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json"}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    waited = 0.0
    for attempt in range(config.retries + 1):
        try:
            return _content(_send(config, request), url)
        except _Transient as error:
            wait = error.retry_after if error.retry_after is not None else config.backoff * 2**attempt
            if attempt == config.retries or waited + wait > config.retry_wait:
                raise ConceptrolError(
                    f"the judge at {url} kept failing ({error}) after {attempt + 1} tries and {waited:g} s of waiting; "
                    "finished cases are kept: run again later to resume") from None
            time.sleep(wait)
            waited += wait
    raise AssertionError("unreachable")


def _send(config: JudgeConfig, request: urllib.request.Request) -> dict:
    """The endpoint's JSON reply; _Transient for what is worth retrying, ConceptrolError for what is not."""
    try:
        with urllib.request.urlopen(request, timeout=config.timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:
        if error.code == 429 or error.code >= 500:
            raise _Transient(f"HTTP {error.code}", _retry_after(error.headers.get("Retry-After"))) from None
        if error.code in (401, 403):
            raise _key_refused(config, error.code) from None
        raise _unusable(request.full_url, f"HTTP {error.code}: {_detail(error)}") from None
    except (ConnectionResetError, http.client.HTTPException, TimeoutError) as error:
        raise _Transient(f"{type(error).__name__}: {error}") from None
    except urllib.error.URLError as error:
        if isinstance(error.reason, (ConnectionResetError, TimeoutError)):
            raise _Transient(f"{type(error.reason).__name__}: {error.reason}") from None
        raise _unusable(request.full_url, error.reason) from None
    except (OSError, ValueError) as error:  # ValueError: the reply is not JSON
        raise _unusable(request.full_url, error) from None


def _content(reply: dict, url: str) -> str:
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as error:
        raise _unusable(url, f"no choices[0].message.content in its reply: {error!r}") from None
    return content if isinstance(content, str) else ""  # a refusal may come without content


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (a number or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _detail(error: urllib.error.HTTPError) -> str:
    try:
        return error.read()[:200].decode("utf-8", "replace").strip() or error.reason
    except OSError:
        return str(error.reason)


def _unusable(url: str, reason: object) -> ConceptrolError:
    return ConceptrolError(f"the judge at {url} could not be used ({reason}); finished cases are kept, "
                           "fix --judge-url / --judge-model / the API key and run again to resume")


def _key_refused(config: JudgeConfig, code: int) -> ConceptrolError:
    if not config.api_key:
        return ConceptrolError(f"the judge at {config.base_url} wants an API key (HTTP {code}) and none is set; set "
                               "CONCEPTROL_JUDGE_API_KEY or OPENAI_API_KEY")
    return ConceptrolError(f"the judge at {config.base_url} refused the API key (HTTP {code}); set "
                           "CONCEPTROL_JUDGE_API_KEY or OPENAI_API_KEY to a key it accepts")


@dataclass(frozen=True)
class JudgeCost:
    """What judging a run asks of the endpoint, for the cost line printed before a judged run."""

    images: int
    runs: int
    calls: int  # images x 2 questions x runs; answers asked again for lack of a score come on top
    input_tokens: int  # about: text at CHARS_PER_TOKEN characters a token, images at IMAGE_TOKENS each
    output_tokens: int | None  # calls x max_tokens; None when answers are not capped

    def describe(self) -> str:
        """'1350 images x 2 questions x 3 runs = 8100 judge calls; about N input and M output tokens'."""
        head = f"{self.images} images x 2 questions x {self.runs} runs = {self.calls} judge calls; "
        if self.output_tokens is None:
            return head + f"about {self.input_tokens:,} input tokens, and output not capped (no max_tokens)"
        return head + f"about {self.input_tokens:,} input and {self.output_tokens:,} output tokens"


def judge_cost(config: JudgeConfig, num_images: int, categories: Sequence[str] = ()) -> JudgeCost:
    """The calls and an estimate of the tokens judging `num_images` images takes.

    `categories` (one per image, when known) picks each CP question's template; without them every CP question is
    costed with the subject template. The case prompts' own few tokens (PF) are not counted.
    """
    if categories and len(categories) != num_images:
        raise ValueError(f"judge_cost: {len(categories)} categories for {num_images} images")
    kinds = [dreambench.template_kind(c) for c in categories] or ["subject"] * num_images
    if config.templates is not None:
        texts = config.templates
        cp_text = {kind: _tokens(texts.user[kind] + texts.gpt[kind]) for kind in ("subject", "style")}
        pf_text = _tokens(texts.user["text"] + texts.gpt["text"])
    else:
        cp_text, pf_text = dict.fromkeys(("subject", "style"), _tokens(CP_PROMPT)), _tokens(PF_PROMPT)
    per_run = sum(cp_text[kind] + 2 * IMAGE_TOKENS for kind in kinds) + num_images * (pf_text + IMAGE_TOKENS)
    calls = num_images * 2 * config.runs
    output = None if config.max_tokens is None else calls * config.max_tokens
    return JudgeCost(num_images, config.runs, calls, per_run * config.runs, output)


def _tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)
