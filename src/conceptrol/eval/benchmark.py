"""Benchmark cases: the DreamBench++ release layout, or a simple JSONL/CSV manifest."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConceptrolError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass(frozen=True)
class Case:
    """One (reference image, prompt, concept) to generate and score."""

    case_id: str  # stable across runs: what resuming and sharding key on
    image: Path
    prompt: str
    concept: str
    category: str = ""
    subject: str = ""


def load_benchmark(path: str | Path) -> list[Case]:
    """Cases from a DreamBench++ checkout (folder with images/ and captions/) or a .jsonl/.csv manifest."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / "captions").is_dir():
        return load_dreambench_plus(path)
    if path.is_dir() and (path / "prompts_and_classes.txt").is_file():
        return load_dreambench(path)
    if path.is_file() and path.suffix in (".jsonl", ".csv"):
        return load_manifest(path)
    raise ConceptrolError(
        f"{path} is neither a DreamBench++ folder (images/, captions/), a DreamBench folder "
        "(prompts_and_classes.txt and one folder per subject) nor a .jsonl/.csv manifest"
    )


def load_dreambench_plus(root: Path) -> list[Case]:
    """DreamBench++: images/<category>/<n>.jpg and captions/<category>/<n>.txt (subject name, then prompts)."""
    cases = []
    for caption_file in sorted((root / "captions").glob("*/*.txt")):
        category, index = caption_file.parent.name, caption_file.stem
        lines = [line.strip() for line in caption_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(lines) < 2:
            raise ConceptrolError(f"{caption_file} needs the subject name on its first line and at least one prompt")
        image = _find_image(root / "images" / category, index)
        subject = lines[0]
        for number, prompt in enumerate(lines[1:]):
            cases.append(Case(f"{category}/{index}/{number}", image, prompt, _concept_word(subject), category, subject))
    if not cases:
        raise ConceptrolError(f"no caption files found under {root / 'captions'}")
    return cases


LIVE_CLASSES = {"dog", "cat"}  # DreamBench's live subjects get the live-subject prompt list


def load_dreambench(root: Path) -> list[Case]:
    """The original DreamBench (DreamBooth dataset): <subject>/00.jpg ... and prompts_and_classes.txt.

    The prompt templates' `{0} {1}` (unique token, class) become the class noun, which is also the concept.
    """
    text = (root / "prompts_and_classes.txt").read_text(encoding="utf-8")
    classes = dict(re.findall(r"^([\w-]+),([\w ]+)$", text, flags=re.MULTILINE))
    classes.pop("subject_name", None)
    object_part, _, live_part = text.partition("Live Subject Prompts")
    templates = {"object": re.findall(r"'([^']*\{0\}[^']*)'\.format", object_part),
                 "live": re.findall(r"'([^']*\{0\}[^']*)'\.format", live_part)}
    if not classes or not templates["object"] or not templates["live"]:
        raise ConceptrolError(f"{root / 'prompts_and_classes.txt'} does not have DreamBench's classes and prompt lists")
    cases = []
    for subject, noun in sorted(classes.items()):
        images = sorted(p for p in (root / subject).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise ConceptrolError(f"no images in {root / subject} for subject {subject!r}")
        kind = "live" if noun in LIVE_CLASSES else "object"
        for number, template in enumerate(templates[kind]):
            prompt = re.sub(r"\s+", " ", template.replace("{0} {1}", noun).replace("{0}", "").replace("{1}", noun)).strip()
            cases.append(Case(f"{subject}/{number}", images[0], prompt, noun, kind, subject))
    return cases


def load_manifest(path: Path) -> list[Case]:
    """Rows with image, prompt, concept (and optional id, category); image paths relative to the manifest."""
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    cases = []
    for number, row in enumerate(rows):
        missing = [key for key in ("image", "prompt", "concept") if not str(row.get(key) or "").strip()]
        if missing:
            raise ConceptrolError(f"{path} row {number + 1} lacks {', '.join(missing)}; each row needs image, prompt and concept")
        image = (path.parent / row["image"]).resolve()
        if not image.is_file():
            raise ConceptrolError(f"{path} row {number + 1}: image {image} does not exist")
        case_id = str(row.get("id") or f"row{number}")
        cases.append(Case(case_id, image, row["prompt"], row["concept"], row.get("category", ""), row.get("concept", "")))
    if len({c.case_id for c in cases}) != len(cases):
        raise ConceptrolError(f"{path} has repeated ids; every row needs its own id")
    return cases


def _find_image(folder: Path, index: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        if (folder / f"{index}{suffix}").is_file():
            return folder / f"{index}{suffix}"
    raise ConceptrolError(f"no reference image {folder / index}.* for its caption file")


def _concept_word(subject: str) -> str:
    """The word of the subject name that prompts use: its last word ('corgi dog' -> 'dog')."""
    return subject.split()[-1] if subject.split() else subject
