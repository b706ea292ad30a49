"""A vision-language judge for concept preservation (CP) and prompt following (PF), via any OpenAI-compatible
chat-completions endpoint the user configures. Scores are 0-4, divided by 4, averaged over several runs.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import statistics
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from PIL import Image

from ..errors import ConceptrolError

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


@dataclass(frozen=True)
class JudgeConfig:
    """Where the judge lives; the API key is read from CONCEPTROL_JUDGE_API_KEY or OPENAI_API_KEY."""

    base_url: str  # e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1
    model: str = "gpt-4o"
    runs: int = 3  # independent judgements averaged per case
    timeout: float = 120.0

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConceptrolError(f"--judge-url must be an http(s) address such as https://api.openai.com/v1, "
                                  f"got {self.base_url!r}")
        if not self.model.strip():
            raise ConceptrolError("--judge-model must name the judge's model, e.g. gpt-4o")
        if isinstance(self.runs, bool) or not isinstance(self.runs, int) or not 1 <= self.runs <= 20:
            raise ConceptrolError(f"--judge-runs must be from 1 to 20 judgements per image, got {self.runs!r}")
        if not self.timeout > 0:
            raise ConceptrolError(f"the judge timeout must be positive, got {self.timeout!r}")

    @property
    def api_key(self) -> str | None:
        return os.environ.get("CONCEPTROL_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")


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
            raise ConceptrolError(f"the judge at {config.base_url} refused the API key (HTTP {error.code}); set "
                                  "CONCEPTROL_JUDGE_API_KEY or OPENAI_API_KEY to a key it accepts") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ConceptrolError(f"the judge at {config.base_url} is unreachable ({reason}); check --judge-url, "
                              "or leave it out to skip judging") from None


def judge_case(config: JudgeConfig, reference: Image.Image, image: Image.Image, prompt: str, concept: str) -> dict:
    """CP and PF of one generated image, each the mean of `runs` 0-4 scores divided by 4."""
    cp = [_score(config, CP_PROMPT.format(concept=concept), [reference, image]) for _ in range(config.runs)]
    pf = [_score(config, PF_PROMPT.format(prompt=prompt), [image]) for _ in range(config.runs)]
    return {"cp": statistics.fmean(cp) / 4, "pf": statistics.fmean(pf) / 4, "cp_runs": cp, "pf_runs": pf}


def _score(config: JudgeConfig, text: str, images: list[Image.Image]) -> int:
    content = [{"type": "text", "text": text}] + [
        {"type": "image_url", "image_url": {"url": _data_url(image)}} for image in images]
    body = json.dumps({"model": config.model, "messages": [{"role": "user", "content": content}]}).encode()
    headers = {"Content-Type": "application/json"}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    url = config.base_url.rstrip("/") + "/chat/completions"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=config.timeout) as response:
            answer = json.load(response)["choices"][0]["message"]["content"]
    except (urllib.error.URLError, OSError, KeyError, ValueError) as error:
        raise ConceptrolError(f"the judge at {url} could not be used ({error}); finished cases are kept, "
                              "fix --judge-url / the API key and run again to resume") from None
    matches = SCORE.findall(answer or "")
    if not matches:
        raise ConceptrolError(f"the judge's answer has no 'Score: N' line: {answer[:200]!r}")
    return int(matches[-1])


def _data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
