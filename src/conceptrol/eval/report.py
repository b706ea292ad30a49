"""`conceptrol report` (and `--paper`): a table per method and setting, plots, and a self-contained HTML page.

A run may have been moved, interrupted, or damaged: missing or unreadable images and malformed record
lines are counted and skipped, never a traceback, and nothing is created unless the run folder exists.
"""

from __future__ import annotations

import html
from pathlib import Path

from PIL import Image

from .paper import format_paper_table, paper_html, paper_notes, paper_rows, paper_title, write_paper_plot
from .rundata import (
    COUNTS,
    JUDGE,
    METRICS,
    RunData,
    embed_image,
    load_run,
    open_image,
    outputs_by_case,
    seeds_made,
    summarize,
)


def notes(data: RunData, rows: list[dict]) -> list[str]:
    """What the reader of the table must know: failures, missing scores, damaged files."""
    lines = []
    failed = sum(row["failed"] for row in rows)
    if failed:
        lines.append(f"{failed} jobs failed; their errors are in {data.out}/generations.rank*.jsonl")
    if not any(row["scored"] for row in rows):
        lines.append("no scores yet: the run was made with --no-score (or scoring has not run); run the same "
                     "`conceptrol evaluate` command without --no-score to score it")
    elif any(row["scored"] < row["images"] for row in rows):
        lines.append("some images are not scored yet; run the same `conceptrol evaluate` command to finish")
    if data.malformed:
        lines.append(f"{data.malformed} record lines could not be read (damaged, or lacking a field) and were "
                     "skipped")
    if data.unreadable:
        lines.append(f"{len(data.unreadable)} image files are missing or damaged and were left out of the pictures")
    if data.settings is None:
        lines.append("this run has no run.json (made by conceptrol < 0.2): its settings are unknown")
    return lines


def report(run: Path) -> list[str]:
    """The lines `conceptrol report` prints; writes report.html, the plots and grid.png into the run folder."""
    data = load_run(run)
    rows = summarize(data)
    lines = [*settings_lines(data.settings), format_table(rows)]
    try:
        plots = write_plots(data, rows)
    except ImportError:
        plots = []
        lines.append("plots skipped: they need matplotlib (pip install 'conceptrol[eval]')")
    page = write_html(data, rows, plots)
    lines += notes(data, rows)
    return [*lines, f"wrote {', '.join(str(p) for p in [page, *plots])}"]


def paper_report(run: Path, baseline_scale: float | None = None) -> list[str]:
    """The lines `conceptrol report --paper` prints; writes paper.png, the other plots and report.html (with both)."""
    data = load_run(run)
    rows = paper_rows(data, baseline_scale)
    lines = [paper_title(data), format_paper_table(rows), *paper_notes(data, rows)]
    summary = summarize(data)
    try:
        plots = [write_paper_plot(data, rows), *write_plots(data, summary)]
    except ImportError:
        plots = []
        lines.append("plots skipped: they need matplotlib (pip install 'conceptrol[eval]')")
    page = write_html(data, summary, [p for p in plots if p.name != "paper.png"], paper=rows)
    return [*lines, f"wrote {', '.join(str(p) for p in [*plots, page])}"]


def settings_lines(settings: dict | None) -> list[str]:
    if not settings:
        return []
    values = ", ".join(f"{key} {value}" for key, value in settings["settings"].items() if value is not None)
    return [f"settings: {values}", f"made with conceptrol {settings.get('conceptrol')}, diffusers "
            f"{settings.get('diffusers')}, from {settings.get('benchmark')}, started {settings.get('created')}"]


def columns(rows: list[dict]) -> tuple[str, ...]:
    """The counts, the metric columns when anything was scored, and the judge columns when a judge ran."""
    metrics = METRICS if any(row["scored"] for row in rows) else ()
    return COUNTS + metrics + (("judged",) + JUDGE if any("cp" in row for row in rows) else ())


def format_table(rows: list[dict]) -> str:
    names = columns(rows)
    width = max([14, *(len(row["method"]) for row in rows)])  # a layer sweep's methods name their layer
    header = f"{'method':<{width}} {'scale':>6} " + " ".join(f"{m:>7}" for m in names)
    lines = [header, "-" * len(header)]
    for row in rows:
        values = " ".join(_text(row.get(m), m) for m in names)
        lines.append(f"{row['method']:<{width}} {row['scale']:>6g} {values}")
    return "\n".join(lines)


def _text(value: object, name: str) -> str:
    if value is None:
        return f"{'':>7}"
    return f"{value:7d}" if isinstance(value, int) else f"{value:7.4f}"


def write_plots(run: Path | RunData, rows: list[dict]) -> list[Path]:
    """metrics.png (CLIP-T, CLIP-I, DINO per method and scale), with a judge cp_pf.png, and grid.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = run if isinstance(run, RunData) else load_run(run)
    paths = []
    scored = [row for row in rows if "clip_t" in row]
    if scored:
        figure, axis = plt.subplots(figsize=(1.5 + 1.2 * len(scored), 3.5))
        for offset, metric in enumerate(METRICS):
            axis.bar([i + 0.25 * offset for i in range(len(scored))], [row[metric] for row in scored], 0.25, label=metric)
        axis.set_xticks([i + 0.25 for i in range(len(scored))], [_label(r) for r in scored], rotation=20, ha="right")
        axis.set(ylabel="cosine similarity", ylim=(0, 1.15))
        axis.legend(ncol=3, loc="upper center", frameon=False)
        paths.append(_save_figure(plt, figure, data.out / "metrics.png"))
    judged = [row for row in rows if "cp" in row]
    if judged:
        figure, axis = plt.subplots(figsize=(4.5, 4.5))
        markers = {method: marker for method, marker in zip(sorted({r["method"] for r in judged}), "os^Dv")}
        for row in judged:
            axis.scatter(row["cp"], row["pf"], s=60, marker=markers[row["method"]], label=_label(row))
        axis.set(xlim=(0, 1), ylim=(0, 1), xlabel="concept preservation (CP)", ylabel="prompt following (PF)")
        axis.legend(fontsize=8, loc="lower left")
        paths.append(_save_figure(plt, figure, data.out / "cp_pf.png"))
    grid = write_grid(data)
    return paths + ([grid] if grid else [])


def _label(row: dict) -> str:
    return f"{row['method']} {row['scale']:g}"


def _save_figure(plt: object, figure: object, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


PLOT_TEXT = {"metrics.png": "CLIP-T, CLIP-I and DINO of each method and scale",
             "cp_pf.png": "concept preservation against prompt following of each method and scale"}


def write_html(run: Path | RunData, rows: list[dict], plots: list[Path] = (), max_cases: int = 12,
               paper: list[dict] | None = None) -> Path:
    """report.html: settings, the table, notes, the plots, the comparison with the paper's Table 1 when the run
    has one (`paper`: paper.paper_rows, computed here when None) and a grid of reference -> outputs, all embedded."""
    data = run if isinstance(run, RunData) else load_run(run)
    names = ("method", "scale", *columns(rows))
    table = "".join("<tr>" + "".join(f"<td>{_cell(row.get(k, ''), k)}</td>" for k in names) + "</tr>" for row in rows)
    described = "".join(f"<li>{html.escape(line)}</li>" for line in settings_lines(data.settings) + notes(data, rows))
    page = (
        "<!doctype html><meta charset=utf-8><title>conceptrol report</title>"
        "<style>body{font-family:sans-serif}td,th{padding:4px;border:1px solid #ccc}td img{width:160px}</style>"
        f"<h1>{html.escape(data.out.name)}</h1><ul>{described}</ul><table><tr>"
        + "".join(f"<th>{n}</th>" for n in names) + f"</tr>{table}</table>"
        + "".join(embed_image(data, plot, 900, alt=PLOT_TEXT.get(plot.name, plot.name)) for plot in plots
                  if plot.name not in ("grid.png", "paper.png"))
        + paper_html(data, paper) + grid_html(data, max_cases)
    )
    path = data.out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def grid_html(data: RunData, max_cases: int = 12) -> str:
    """The page's grid: one row per case, its reference then each method and scale's picture at the lowest seed."""
    seeds = seeds_made(data)
    settings, by_case = outputs_by_case(data)
    rows = []
    for _, cells in by_case[:max_cases]:
        first = next(iter(cells.values()))
        images = [embed_image(data, Path(first["reference"]), alt=f"reference of {first['concept']}")] + [
            embed_image(data, data.out / cells[c]["image"], alt=f"{c[0]} {c[1]:g}, seed {first['seed']}: "
                        f"{first['prompt']}") if c in cells else "" for c in settings]
        rows.append(f"<tr><td>{html.escape(first['prompt'])}<br><i>{html.escape(first['concept'])}</i></td>"
                    + "".join(f"<td>{i}</td>" for i in images) + "</tr>")
    head = "".join(f"<th>{html.escape(m)} {s:g}</th>" for m, s in settings)
    seed = f", seed {seeds[0]}" if seeds else ""
    shown = (f"<p>Seed {seeds[0]} only, of the run's seeds {', '.join(map(str, seeds))}; the table counts every "
             "seed.</p>" if len(seeds) > 1 else "")
    return (f"<h2>Reference &rarr; outputs{seed}</h2>{shown}<table><tr><th>prompt</th><th>reference</th>{head}</tr>"
            f"{''.join(rows)}</table>")


def _cell(value: object, column: str) -> str:
    if isinstance(value, float):
        return html.escape(f"{value:g}" if column == "scale" else f"{value:.4f}")
    return html.escape(str(value))


def write_grid(run: Path | RunData, max_cases: int = 8, cell: int = 128) -> Path | None:
    """grid.png: one row per case, the reference then the output of each method and scale at the lowest seed (named
    over the reference column; gaps where unreadable)."""
    from PIL import ImageDraw

    data = run if isinstance(run, RunData) else load_run(run)
    settings, by_case = outputs_by_case(data)
    cases = by_case[:max_cases]
    if not cases:
        return None
    header = 20
    grid = Image.new("RGB", (cell * (1 + len(settings)), header + cell * len(cases)), "white")
    draw = ImageDraw.Draw(grid)
    for column, title in enumerate([f"reference, seed {seeds_made(data)[0]}"] + [f"{m} {s:g}" for m, s in settings]):
        draw.text((column * cell + 4, 4), title, fill="black")
    for row, (_, cells) in enumerate(cases):
        first = next(iter(cells.values()))
        paths = [Path(first["reference"])] + [data.out / cells[c]["image"] if c in cells else None for c in settings]
        for column, path in enumerate(paths):
            image = open_image(data, path) if path is not None else None
            if image is not None:
                grid.paste(image.resize((cell, cell)), (column * cell, header + row * cell))
    path = data.out / "grid.png"
    grid.save(path)
    return path
