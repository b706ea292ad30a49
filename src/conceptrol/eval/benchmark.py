"""Benchmark cases: the DreamBench++ release layout, the original DreamBench, or a simple JSONL/CSV manifest."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..core.errors import ConceptrolError
from ..core.files import safe_name

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MANIFEST_SUFFIXES = (".jsonl", ".csv")  # compared in lower case: SET.JSONL is a manifest too


@dataclass(frozen=True)
class Case:
    """One (reference image, prompt, concept) to generate and score."""

    case_id: str  # stable across runs: what resuming and sharding key on
    image: Path
    prompt: str
    concept: str
    category: str = ""
    subject: str = ""

    @property
    def fingerprint(self) -> str:
        """A digest of what the picture depends on (prompt, concept, the reference's bytes): a changed case is redone."""
        text = "\0".join((self.prompt, self.concept, file_digest(self.image)))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes ('' if it cannot be read: the case then fails when its image is loaded)."""
    try:
        status = Path(path).stat()
    except OSError:
        return ""
    return _digest(str(path), status.st_mtime_ns, status.st_size)


@lru_cache(maxsize=4096)
def _digest(path: str, mtime_ns: int, size: int) -> str:
    """Cached per path, modification time and size: a rewritten file is read again."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return ""


def load_benchmark(path: str | Path) -> list[Case]:
    """Cases from a DreamBench++ checkout (images/, captions/), a DreamBench folder, or a .jsonl/.csv manifest."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConceptrolError(f"benchmark {path} does not exist")
    if path.is_dir() and (path / "captions").is_dir():
        cases = load_dreambench_plus(path)
    elif path.is_dir() and (path / "prompts_and_classes.txt").is_file():
        cases = load_dreambench(path)
    elif path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
        cases = load_manifest(path)
    elif path.is_file() and path.suffix.lower() == ".json":
        raise ConceptrolError(f"{path} is a .json file; a manifest is read from .jsonl or .csv only: rename to .jsonl "
                              "(one object per line)")
    else:
        raise ConceptrolError(
            f"{path} is neither a DreamBench++ folder (images/, captions/), a DreamBench folder "
            "(prompts_and_classes.txt and one folder per subject) nor a .jsonl/.csv manifest"
        )
    if not cases:
        raise ConceptrolError(f"benchmark {path} has no cases")
    return cases


def describe(cases: list[Case]) -> str:
    """'1350 cases: live_subject/animal 405, live_subject/human 180, object 585, style 180' (categories when known)."""
    counts = Counter(case.category for case in cases)
    if set(counts) == {""}:
        return f"{len(cases)} cases"
    return f"{len(cases)} cases: " + ", ".join(f"{category or '(none)'} {n}" for category, n in counts.items())


def load_dreambench_plus(root: Path) -> list[Case]:
    """DreamBench++: captions/<category>/<n>.txt (subject name, then prompts) beside images/<category>/<n>.jpg.

    Categories nest (live_subject/animal, live_subject/human, object, style), so files are found at any depth
    and the category is the caption file's folder relative to captions/.
    """
    captions = root / "captions"
    cases = []
    for caption_file in sorted(captions.rglob("*.txt")):
        category = caption_file.parent.relative_to(captions).as_posix()
        index = caption_file.stem
        lines = [line.strip() for line in caption_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(lines) < 2:
            raise ConceptrolError(f"{caption_file} needs the subject name on its first line and at least one prompt")
        image = _find_image(root / "images" / category, index)
        subject = lines[0]
        prefix = f"{category}/{index}" if category != "." else index
        for number, prompt in enumerate(lines[1:]):
            cases.append(Case(f"{prefix}/{number}", image, prompt, _concept_word(subject), category, subject))
    if not cases:
        raise ConceptrolError(f"no caption files found under {captions}")
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
            cases.append(Case(f"{subject}/{number}", images[0].resolve(), prompt, noun, kind, subject))
    return cases


def load_manifest(path: Path) -> list[Case]:
    """Rows with image, prompt, concept (and optional id, category); image paths relative to the manifest.

    A row without an id is keyed by its content (image file, prompt, concept), so editing a manifest never
    makes one row's results stand for another's. Errors name the file's line the row is on.
    """
    cases = [_manifest_case(path, line, row) for line, row in _manifest_rows(path)]
    repeated = [case_id for case_id, count in Counter(c.case_id for c in cases).items() if count > 1]
    if repeated:
        raise ConceptrolError(f"{path} has repeated rows or ids ({', '.join(repeated[:3])}); every row needs its own "
                              "id, or its own image, prompt and concept")
    return cases


def _manifest_case(path: Path, line: int, row: object) -> Case:
    """The case of one manifest row (on `line` of the file), checked."""
    where = f"{path} line {line}"
    if not isinstance(row, dict):
        raise ConceptrolError(f"{where}: the row is not an object with image, prompt and concept")
    missing = [key for key in ("image", "prompt", "concept") if not str(row.get(key) or "").strip()]
    if missing:
        raise ConceptrolError(f"{where}: the row lacks {', '.join(missing)}; each row needs image, prompt and concept")
    image = (path.parent / str(row["image"])).resolve()
    if not image.is_file():
        raise ConceptrolError(f"{where}: image {image} does not exist")
    case = Case("", image, str(row["prompt"]), str(row["concept"]), str(row.get("category") or ""), str(row["concept"]))
    case_id = str(row.get("id") or "").strip() or f"{safe_name(image.stem)}-{case.fingerprint[:10]}"
    return Case(case_id, case.image, case.prompt, case.concept, case.category, case.subject)


def _manifest_rows(path: Path) -> list[tuple[int, object]]:
    """(line number in the file, row) of every row; a line that cannot be parsed is an error naming it."""
    try:
        if path.suffix.lower() == ".jsonl":
            lines = enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
            return [(number, _json_line(path, number, line)) for number, line in lines if line.strip()]
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            return [(reader.line_num, row) for row in reader]
    except (UnicodeDecodeError, csv.Error) as error:
        raise ConceptrolError(f"cannot read manifest {path}: {error}") from None


def _json_line(path: Path, number: int, line: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:  # each line is parsed alone: json's own line number is always 1
        raise ConceptrolError(f"cannot read manifest {path} line {number}: {error.msg} "
                              f"(column {error.colno})") from None


def _find_image(folder: Path, index: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        if (folder / f"{index}{suffix}").is_file():
            return (folder / f"{index}{suffix}").resolve()
    raise ConceptrolError(f"no reference image {folder / index}.* for its caption file")


def _concept_word(subject: str) -> str:
    """The word of the subject name that prompts use: its last word ('corgi dog' -> 'dog')."""
    return subject.split()[-1] if subject.split() else subject
