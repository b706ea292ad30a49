"""What a run folder holds (run.json, the latest record of every job) and its per-method summary, read only."""

from __future__ import annotations

import base64
import html
import io
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..core.errors import ConceptrolError
from .records import RecordStore
from .runs import read_run_file

METRICS = ("clip_t", "clip_i", "dino")
JUDGE = ("cp", "pf", "cp_pf")
COUNTS = ("images", "failed", "scored")
NUMBER = (int, float)
# the fields the report reads from each kind of record, and their types; a record without one is malformed
FIELDS = {"generations": {"key": str, "method": str, "scale": NUMBER, "seed": int, "status": str, "case_id": str},
          "scores": {"key": str}, "judgements": {"key": str}}
OK_FIELDS = {"generations": {"image": str, "reference": str, "prompt": str, "concept": str},  # status "ok" only
             "scores": dict.fromkeys(METRICS, NUMBER), "judgements": {"cp": NUMBER, "pf": NUMBER}}


@dataclass
class RunData:
    """What a run folder holds: its settings and the current record of every job."""

    out: Path
    settings: dict | None  # run.json, or None for runs made before it existed
    generations: dict[str, dict]  # key -> the job's current generation record
    scores: dict[str, dict]  # key -> a valid score of the current picture
    judgements: dict[str, dict]  # key -> a valid verdict on the current picture
    malformed: int = 0  # record lines that could not be read or lack a field the report reads
    unreadable: set[str] = field(default_factory=set)  # image files missing or damaged


def load_run(out: Path) -> RunData:
    """Read a run folder without writing anything; a folder that is not a run is an error that says so."""
    from .runner import latest

    out = Path(out).expanduser()
    if not out.is_dir():
        raise ConceptrolError(f"{out} is not a run folder (it {'is a file' if out.exists() else 'does not exist'}); "
                              "pass the --out of a `conceptrol evaluate` run")
    malformed, read = 0, {}
    for name in ("generations", "scores", "judgements"):
        records = []
        for path in sorted(out.glob(f"{name}.rank*.jsonl")):
            lines, bad = RecordStore(path).read_counting()
            good = [record for record in lines if well_formed(name, record)]
            records += good
            malformed += bad + len(lines) - len(good)
        read[name] = latest(records)
    for record in read["generations"].values():  # a layer sweep's rows: one per layer, named conceptrol@LAYER
        if isinstance(record.get("concept_layer"), str):
            record["method"] = f"{record['method']}@{record['concept_layer']}"
    if not read["generations"]:
        raise ConceptrolError(f"{out} holds no generation records; run `conceptrol evaluate --out {out}` first")
    current = read["generations"]

    def valid(entries: dict[str, dict]) -> dict[str, dict]:
        return {key: entry for key, entry in entries.items() if entry.get("status", "ok") == "ok" and key in current
                and current[key].get("status") == "ok" and entry.get("generation_id") == current[key].get("generation_id")}

    return RunData(out, read_run_file(out) if (out / "run.json").exists() else None, current,
                   valid(read["scores"]), valid(read["judgements"]), malformed)


def well_formed(name: str, record: dict) -> bool:
    """Whether a generations/scores/judgements record has every field the report reads, each of its type."""
    fields = FIELDS[name] | (OK_FIELDS[name] if record.get("status", "ok") == "ok" else {})
    return all(isinstance(record.get(f), kind) and not isinstance(record.get(f), bool) for f, kind in fields.items())


def summarize(run: Path | RunData) -> list[dict]:
    """Per (method, scale): images made, jobs failed, images scored, and the mean of every metric."""
    data = run if isinstance(run, RunData) else load_run(run)
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for record in data.generations.values():
        groups[(record["method"], record["scale"])].append(record)
    rows = []
    for (method, scale), records in sorted(groups.items()):
        ok = [r["key"] for r in records if r.get("status") == "ok"]
        scores = [data.scores[k] for k in ok if k in data.scores]
        judged = [data.judgements[k] for k in ok if k in data.judgements]
        row = {"method": method, "scale": scale, "images": len(ok), "failed": len(records) - len(ok),
               "scored": len(scores)}
        row |= {m: statistics.fmean(s[m] for s in scores) for m in METRICS if scores}
        if judged:  # CP·PF is the product of the two means, as DreamBench++ reports it
            row |= {"judged": len(judged), "cp": statistics.fmean(j["cp"] for j in judged),
                    "pf": statistics.fmean(j["pf"] for j in judged)}
            row["cp_pf"] = row["cp"] * row["pf"]
        rows.append(row)
    return rows


def seeds_made(data: RunData) -> list[int]:
    """The seeds of the run's generated pictures, lowest first (the report's grid shows the first)."""
    return sorted({r["seed"] for r in data.generations.values() if r.get("status") == "ok"})


def outputs_by_case(data: RunData, seed: int | None = None) -> tuple[list[tuple[str, float]], list[tuple[str, dict]]]:
    """The (method, scale) settings generated, and each case's record per setting at `seed` (None: the lowest
    seed made), sorted by case id."""
    seeds = seeds_made(data)
    seed = seeds[0] if seed is None and seeds else seed
    generations = [r for r in data.generations.values() if r.get("status") == "ok"]
    by_case: dict[str, dict] = defaultdict(dict)
    for record in generations:
        if record["seed"] == seed:
            by_case[record["case_id"]][(record["method"], record["scale"])] = record
    return sorted({(r["method"], r["scale"]) for r in generations}), sorted(by_case.items())


def open_image(data: RunData, path: Path) -> Image.Image | None:
    """The image at `path` as RGB, or None (counted in data.unreadable) when it is missing or damaged."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        data.unreadable.add(str(path))
        return None


def embed_image(data: RunData, path: Path, size: int = 256, *, alt: str) -> str:
    """An <img> with the picture inlined (at most `size` pixels a side) and its `alt` text, or '<i>missing</i>'."""
    image = open_image(data, path)
    if image is None:
        return "<i>missing</i>"
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    source = base64.b64encode(buffer.getvalue()).decode()
    return f'<img src="data:image/png;base64,{source}" alt="{html.escape(alt, quote=True)}">'
