"""DreamBench++'s judge questions, as its public evaluation code asks them (the "full" setting).

Follows yuangpeng/dreambench_plus: dreambench_plus/eval_concept_preservation.py and eval_prompt_following.py.
Their prompt templates are not part of this package: they are read at run time from the user's clone of the
DreamBench++ repository (dreambench_plus/prompts/{user,gpt}_prompt_{subject,style,text}_full.txt), and a digest of
the six files lets a resumed run refuse templates that changed. No network code here (see judge.py).
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from ..core.errors import ConceptrolError

PROMPTS = Path("dreambench_plus") / "prompts"  # inside the clone
KINDS = ("subject", "style", "text")  # CP of animal/human/object cases, CP of style cases, PF
SIDE = 512  # both images are resized to 512x512 before encoding
SCORE = re.compile(r"(score|Score):\s*[a-zA-Z]*\s*(\d+)")  # their pattern; exactly one match counts


@dataclass(frozen=True)
class Templates:
    """The six "full" templates of one clone, stripped as DreamBench++ strips them, and a digest of each file."""

    user: dict[str, str]  # kind -> the first user turn
    gpt: dict[str, str]  # kind -> the assistant turn that follows it
    digest: dict[str, str]  # file name -> SHA-256 of its bytes (what run.json stores)
    folder: Path


def template_files(kind: str) -> tuple[str, str]:
    """The (user, assistant) template file names of one kind."""
    return f"user_prompt_{kind}_full.txt", f"gpt_prompt_{kind}_full.txt"


def prompts_folder(clone: Path) -> Path:
    """<clone>/dreambench_plus/prompts; the clone's data/ folder is taken for the clone itself."""
    clone = Path(clone).expanduser()
    if not (clone / PROMPTS).is_dir() and (clone.parent / PROMPTS).is_dir():
        return clone.parent / PROMPTS
    return clone / PROMPTS


def load_templates(clone: Path) -> Templates:
    """Read the six templates; a missing one names the file and says what --benchmark must be."""
    folder = prompts_folder(clone)
    user, gpt, digest = {}, {}, {}
    for kind in KINDS:
        for name, texts in zip(template_files(kind), (user, gpt)):
            path = folder / name
            try:
                data = path.read_bytes()
            except OSError:
                raise ConceptrolError(
                    f"DreamBench++'s judge template {path} is missing; for --protocol dreambench-plus the "
                    "--benchmark must be a clone of the DreamBench++ repository (github.com/yuangpeng/dreambench_plus) "
                    "with its dreambench_plus/prompts folder") from None
            texts[kind] = data.decode("utf-8").strip()
            digest[name] = hashlib.sha256(data).hexdigest()
    return Templates(user, gpt, digest, folder)


def changed_templates(stored: dict[str, str], current: dict[str, str]) -> list[str]:
    """The template files whose digest differs between a run's stored settings and the clone now (or in one only)."""
    return sorted(name for name in set(stored) | set(current) if stored.get(name) != current.get(name))


def template_kind(category: str) -> str:
    """'style' for DreamBench++'s style cases (the category's last part), 'subject' for every other case."""
    return "style" if category.rstrip("/").rsplit("/", 1)[-1] == "style" else "subject"


def image_part(image: Image.Image) -> dict:
    """One image as DreamBench++ sends it: RGB on white, resized to 512x512, JPEG, a base64 data URL, detail high."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGBA":
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image)
    image = image.convert("RGB").resize((SIDE, SIDE), Image.Resampling.BICUBIC)  # PIL's default filter for RGB
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")  # PIL's default quality (75), as theirs
    url = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    return {"type": "image_url", "image_url": {"url": url, "detail": "high"}}


def cp_messages(templates: Templates, kind: str, reference: dict, image: dict) -> list[dict]:
    """Concept preservation: the template, the template's assistant turn, then the reference and the generated image."""
    return [{"role": "user", "content": templates.user[kind]}, {"role": "assistant", "content": templates.gpt[kind]},
            {"role": "user", "content": [reference, image]}]


def pf_messages(templates: Templates, prompt: str, image: dict) -> list[dict]:
    """Prompt following: the text template, its assistant turn, then the prompt and the generated image."""
    return [{"role": "user", "content": templates.user["text"]},
            {"role": "assistant", "content": templates.gpt["text"]},
            {"role": "user", "content": [{"type": "text", "text": prompt}, image]}]


def parse_score(answer: str) -> int | None:
    """The answer's score if the pattern matches exactly once (DreamBench++ asserts that), else None."""
    matches = SCORE.findall(answer)
    return int(matches[0][1]) if len(matches) == 1 else None
