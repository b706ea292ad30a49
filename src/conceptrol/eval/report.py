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
JUDGE = ("cp", "pf", "cp_pf")


def summarize(out: Path) -> list[dict]:
    """Mean of every metric per (method, scale), over all scored cases and seeds."""
    generations = {r["key"]: r for r in read_all(out, "generations")}
    if not generations:
        raise ConceptrolError(f"{out} holds no generation records; run `conceptrol evaluate --out {out}` first")
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    verdicts: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for name, target in (("scores", groups), ("judgements", verdicts)):
        for entry in read_all(out, name):
            record = generations.get(entry["key"])
            if record is not None:
                target[(record["method"], record["scale"])].append(entry)
    rows = []
    for group in sorted(set(groups) | set(verdicts)):
        scores, judged = groups.get(group, []), verdicts.get(group, [])
        row = {"method": group[0], "scale": group[1], "n": max(len(scores), len(judged))}
        row |= {m: statistics.fmean(s[m] for s in scores) for m in METRICS if scores}
        if judged:  # CP·PF is the product of the two means, as DreamBench++ reports it
            row |= {"cp": statistics.fmean(j["cp"] for j in judged), "pf": statistics.fmean(j["pf"] for j in judged)}
            row["cp_pf"] = row["cp"] * row["pf"]
        rows.append(row)
    errors = sum(r["status"] == "error" for r in generations.values())
    if errors:
        rows.append({"method": f"({errors} jobs failed; see generations.rank*.jsonl)", "scale": float("nan"), "n": 0})
    return rows


def columns(rows: list[dict]) -> tuple[str, ...]:
    """The metric columns present: judge columns only when a judge ran."""
    return METRICS + (JUDGE if any("cp" in row for row in rows) else ())


def format_table(rows: list[dict]) -> str:
    names = columns(rows)
    header = f"{'method':<14} {'scale':>6} {'n':>5} " + " ".join(f"{m:>7}" for m in names)
    lines = [header, "-" * len(header)]
    for row in rows:
        values = " ".join(f"{row[m]:7.4f}" if m in row else f"{'':>7}" for m in names)
        lines.append(f"{row['method']:<14} {row['scale']:>6g} {row['n']:>5} {values}")
    return "\n".join(lines)


def write_plots(out: Path, rows: list[dict]) -> list[Path]:
    """metrics.png (CLIP-T, CLIP-I, DINO per method and scale) and, with a judge, cp_pf.png (CP vs PF)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConceptrolError("plots need matplotlib: pip install 'conceptrol[eval]'") from None
    rows = [row for row in rows if "clip_t" in row or "cp" in row]
    if not rows:
        return []
    labels = [f"{row['method']} {row['scale']:g}" for row in rows]
    paths = []
    figure, axis = plt.subplots(figsize=(1.5 + 1.2 * len(rows), 3.5))
    for offset, metric in enumerate(METRICS):
        axis.bar([i + 0.25 * offset for i in range(len(rows))], [row.get(metric, 0) for row in rows], 0.25, label=metric)
    axis.set_xticks([i + 0.25 for i in range(len(rows))], labels, rotation=20, ha="right")
    axis.set_ylabel("cosine similarity")
    axis.set_ylim(0, 1.15)
    axis.legend(ncol=3, loc="upper center", frameon=False)
    figure.tight_layout()
    paths.append(out / "metrics.png")
    figure.savefig(paths[-1], dpi=120)
    plt.close(figure)
    judged = [row for row in rows if "cp" in row]
    if judged:
        figure, axis = plt.subplots(figsize=(4.5, 4.5))
        markers = {method: marker for method, marker in zip(sorted({r["method"] for r in judged}), "os^Dv")}
        for row in judged:
            axis.scatter(row["cp"], row["pf"], s=60, marker=markers[row["method"]], label=f"{row['method']} {row['scale']:g}")
        axis.set(xlim=(0, 1), ylim=(0, 1), xlabel="concept preservation (CP)", ylabel="prompt following (PF)")
        axis.legend(fontsize=8, loc="lower left")
        figure.tight_layout()
        paths.append(out / "cp_pf.png")
        figure.savefig(paths[-1], dpi=120)
        plt.close(figure)
    grid = write_grid(out)
    return paths + ([grid] if grid else [])


def write_html(out: Path, rows: list[dict], plots: list[Path] = (), max_cases: int = 12) -> Path:
    """report.html: the table, the plots and a grid of reference -> output per method and scale, all embedded."""
    settings, by_case = _outputs_by_case(out)
    names = ("method", "scale", "n", *columns(rows))
    table = "".join("<tr>" + "".join(f"<td>{_cell(row.get(k, ''), k)}</td>" for k in names) + "</tr>" for row in rows)
    grid = []
    for case_id, cells in by_case[:max_cases]:
        first = next(iter(cells.values()))
        images = [_img(Path(first["reference"]))] + [_img(out / cells[c]["image"]) if c in cells else "" for c in settings]
        grid.append(f"<tr><td>{html.escape(first['prompt'])}<br><i>{html.escape(first['concept'])}</i></td>"
                    + "".join(f"<td>{i}</td>" for i in images) + "</tr>")
    head = "".join(f"<th>{html.escape(m)} {s:g}</th>" for m, s in settings)
    page = (
        "<!doctype html><meta charset=utf-8><title>conceptrol report</title>"
        "<style>body{font-family:sans-serif}td,th{padding:4px;border:1px solid #ccc}td img{width:160px}</style>"
        f"<h1>{html.escape(out.name)}</h1><table><tr>" + "".join(f"<th>{n}</th>" for n in names) + f"</tr>{table}</table>"
        + "".join(_img(plot, 900) for plot in plots if plot.name != "grid.png")
        + f"<h2>Reference &rarr; outputs</h2><table><tr><th>prompt</th><th>reference</th>{head}</tr>{''.join(grid)}</table>"
    )
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def _cell(value: object, column: str) -> str:
    if isinstance(value, float):
        return html.escape(f"{value:g}" if column == "scale" else f"{value:.4f}")
    return html.escape(str(value))


def write_grid(out: Path, max_cases: int = 8, cell: int = 128) -> Path | None:
    """grid.png: one row per case, the reference then the output of each method and scale."""
    from PIL import ImageDraw

    settings, by_case = _outputs_by_case(out)
    cases = by_case[:max_cases]
    if not cases:
        return None
    header = 20
    grid = Image.new("RGB", (cell * (1 + len(settings)), header + cell * len(cases)), "white")
    draw = ImageDraw.Draw(grid)
    for column, title in enumerate(["reference"] + [f"{m} {s:g}" for m, s in settings]):
        draw.text((column * cell + 4, 4), title, fill="black")
    for row, (_, cells) in enumerate(cases):
        first = next(iter(cells.values()))
        paths = [Path(first["reference"])] + [out / cells[c]["image"] if c in cells else None for c in settings]
        for column, path in enumerate(paths):
            if path is not None:
                grid.paste(Image.open(path).convert("RGB").resize((cell, cell)), (column * cell, header + row * cell))
    path = out / "grid.png"
    grid.save(path)
    return path


def _outputs_by_case(out: Path) -> tuple[list[tuple[str, float]], list[tuple[str, dict]]]:
    """The (method, scale) settings generated, and each case's record per setting, sorted by case id."""
    generations = [r for r in read_all(out, "generations") if r["status"] == "ok"]
    by_case: dict[str, dict] = defaultdict(dict)
    for record in generations:
        by_case[record["case_id"]].setdefault((record["method"], record["scale"]), record)
    return sorted({(r["method"], r["scale"]) for r in generations}), sorted(by_case.items())


def _img(path: Path, size: int = 256) -> str:
    image = Image.open(path).convert("RGB")
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'
