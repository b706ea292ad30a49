"""`conceptrol report`: a table per method and setting, and a self-contained HTML page with the images."""

from __future__ import annotations

import base64
import html
import io
import statistics
from collections import defaultdict
from pathlib import Path

from PIL import Image

from ..errors import ConceptrolError
from .runner import read_all

METRICS = ("clip_t", "clip_i", "dino")


def summarize(out: Path) -> list[dict]:
    """Mean of every metric per (method, scale), over all scored cases and seeds."""
    generations = {r["key"]: r for r in read_all(out, "generations")}
    if not generations:
        raise ConceptrolError(f"{out} holds no generation records; run `conceptrol evaluate --out {out}` first")
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for score in read_all(out, "scores"):
        record = generations.get(score["key"])
        if record is not None:
            groups[(record["method"], record["scale"])].append(score)
    rows = []
    for (method, scale), scores in sorted(groups.items()):
        rows.append({"method": method, "scale": scale, "n": len(scores)}
                    | {m: statistics.fmean(s[m] for s in scores) for m in METRICS})
    errors = sum(r["status"] == "error" for r in generations.values())
    if errors:
        rows.append({"method": f"({errors} jobs failed; see generations.rank*.jsonl)", "scale": float("nan"), "n": 0})
    return rows


def format_table(rows: list[dict]) -> str:
    header = f"{'method':<14} {'scale':>6} {'n':>5} " + " ".join(f"{m:>7}" for m in METRICS)
    lines = [header, "-" * len(header)]
    for row in rows:
        values = " ".join(f"{row[m]:7.4f}" if m in row else f"{'':>7}" for m in METRICS)
        lines.append(f"{row['method']:<14} {row['scale']:>6g} {row['n']:>5} {values}")
    return "\n".join(lines)


def write_html(out: Path, rows: list[dict], max_cases: int = 12) -> Path:
    """report.html: the table and a grid of reference -> output per method and scale, images embedded."""
    generations = [r for r in read_all(out, "generations") if r["status"] == "ok"]
    columns = sorted({(r["method"], r["scale"]) for r in generations})
    by_case: dict[str, dict] = defaultdict(dict)
    for record in generations:
        by_case[record["case_id"]].setdefault((record["method"], record["scale"]), record)
    table = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(round(v, 4) if isinstance(v, float) else v))}</td>"
                         for v in (row.get(k, "") for k in ("method", "scale", "n", *METRICS))) + "</tr>"
        for row in rows)
    grid = []
    for case_id, cells in list(sorted(by_case.items()))[:max_cases]:
        first = next(iter(cells.values()))
        images = [_img(Path(first["reference"]))] + [_img(out / cells[c]["image"]) if c in cells else "" for c in columns]
        grid.append(f"<tr><td>{html.escape(first['prompt'])}<br><i>{html.escape(first['concept'])}</i></td>"
                    + "".join(f"<td>{i}</td>" for i in images) + "</tr>")
    head = "".join(f"<th>{html.escape(m)} {s:g}</th>" for m, s in columns)
    page = (f"<!doctype html><meta charset=utf-8><title>conceptrol report</title>"
            f"<style>body{{font-family:sans-serif}}td,th{{padding:4px;border:1px solid #ccc}}img{{width:160px}}</style>"
            f"<h1>{html.escape(out.name)}</h1><table><tr><th>method</th><th>scale</th><th>n</th>"
            + "".join(f"<th>{m}</th>" for m in METRICS) + f"</tr>{table}</table>"
            f"<h2>Reference &rarr; outputs</h2><table><tr><th>prompt</th><th>reference</th>{head}</tr>{''.join(grid)}</table>")
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def _img(path: Path) -> str:
    image = Image.open(path).convert("RGB")
    image.thumbnail((256, 256))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'
