"""The analysis as pictures people look at: Fig. 6's AUC over steps, Fig. 5's panel of maps, and a sortable page."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from PIL import Image

if TYPE_CHECKING:
    from .result import BlockAnalysis

TOP = 5  # blocks drawn one by one in the plot; the others as a band


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def step_means(analysis: BlockAnalysis) -> dict[str, torch.Tensor]:
    """Each block's AUC per step, averaged over the cases: block -> [steps]."""
    return {block: torch.tensor(per_case, dtype=torch.float64).mean(0) for block, per_case in analysis.auc.items()}


def auc_over_steps(analysis: BlockAnalysis, path: Path) -> Path:
    """Fig. 6: AUC over the steps for the top-5 blocks, the other blocks' mean ± 1 std as a band, the preset marked."""
    plt = _pyplot()
    means = step_means(analysis)
    ranking = analysis.ranking
    steps = list(range(analysis.num_steps))
    figure, axis = plt.subplots(figsize=(7, 4.2))
    others = [means[block] for block in ranking[TOP:]]
    if others:
        stacked = torch.stack(others)
        mean, std = stacked.mean(0), stacked.std(0, unbiased=False)
        axis.fill_between(steps, mean - std, mean + std, color="0.85", label=f"other {len(others)} blocks, mean ± 1 std")
        axis.plot(steps, mean, color="0.55", linewidth=1)
    for block in ranking[:TOP]:
        axis.plot(steps, means[block], marker="o", markersize=3, label=f"{block} ({analysis.mean_auc[block]:.3f})")
    if analysis.preset in means and analysis.preset not in ranking[:TOP]:
        axis.plot(steps, means[analysis.preset], linestyle="--", color="black",
                  label=f"{analysis.preset} (preset, {analysis.mean_auc[analysis.preset]:.3f})")
    ranked = analysis.ranked_steps()
    if analysis.steps is not None:
        axis.axvspan(ranked.start - 0.5, ranked.stop - 0.5, color="#e8f0ff", zorder=0, label="steps ranked")
    axis.set(xlabel="denoising step", ylabel="ROC AUC of the concept map", ylim=(0, 1.02),
             title=f"{Path(analysis.model).name}: {len(analysis.layers)} blocks, {len(analysis.cases)} case(s)")
    axis.xaxis.get_major_locator().set_params(integer=True)
    axis.axhline(0.5, color="0.7", linewidth=0.8, linestyle=":")
    if analysis.preset in ranking[:TOP]:
        axis.plot([], [], " ", label=f"preset: {analysis.preset}")
    axis.legend(fontsize=7, loc="lower right")
    return _save(plt, figure, path)


def shown_map(analysis: BlockAnalysis, block: str, case: int = 0) -> torch.Tensor:
    """The map the panel shows: the block's map averaged over the ranked steps, at the image's size (nearest)."""
    maps = analysis.maps[block][case][list(analysis.ranked_steps())].mean(0)  # [h, w]
    height, width = analysis.cases[case].subject.shape
    return F.interpolate(maps[None, None], size=(height, width), mode="nearest")[0, 0]


def block_panel(analysis: BlockAnalysis, path: Path, case: int = 0) -> Path:
    """Fig. 5: the image, the subject mask, and the maps of the best and the worst blocks (averaged over the steps)."""
    plt = _pyplot()
    ranking, means = analysis.ranking, analysis.mean_auc
    chosen = [*ranking[:2], ranking[-1]] if len(ranking) > 2 else ranking
    result = analysis.cases[case]
    figure, axes = plt.subplots(1, 2 + len(chosen), figsize=(3 * (2 + len(chosen)), 3.4))
    axes[0].imshow(result.image)
    axes[0].set_title(f"{result.case.prompt[:40]}", fontsize=8)
    axes[1].imshow(result.subject.numpy(), cmap="gray")
    axes[1].set_title(f"mask of '{result.case.concept_text}'", fontsize=8)
    for axis, block in zip(axes[2:], chosen):
        axis.imshow(shown_map(analysis, block, case).numpy(), cmap="inferno")
        label = "worst" if block == ranking[-1] and len(ranking) > 2 else f"#{ranking.index(block) + 1}"
        axis.set_title(f"{label}: {block}\nAUC {means[block]:.3f}", fontsize=7)
    for axis in axes:
        axis.set_axis_off()
    return _save(plt, figure, path)


def _save(plt: Any, figure: Any, path: Path) -> Path:
    figure.tight_layout()
    with path.open("xb") as file:  # never over an earlier picture
        figure.savefig(file, dpi=120, format="png")
    plt.close(figure)
    return path


SORTER = """<script>
document.querySelectorAll("th").forEach((th, column) => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0], rows = Array.from(body.rows);
  const down = th.dataset.order !== "desc"; th.dataset.order = down ? "desc" : "asc";
  const value = row => { const text = row.cells[column].dataset.value ?? row.cells[column].textContent;
                         return isNaN(parseFloat(text)) ? text : parseFloat(text); };
  rows.sort((a, b) => (value(a) > value(b) ? 1 : value(a) < value(b) ? -1 : 0) * (down ? -1 : 1));
  rows.forEach(row => body.appendChild(row));
}));
</script>"""


def html_page(analysis: BlockAnalysis, record: dict, pictures: list[Path]) -> str:
    """analysis.html: the settings, the pictures and a table of every block (click a heading to sort by it)."""
    means, order = analysis.mean_auc, {block: i for i, block in enumerate(analysis.layers)}
    per_step = step_means(analysis)
    heads = ["rank", "block", "order", "mean AUC", *(f"step {k}" for k in range(analysis.num_steps))]
    rows = []
    for rank, block in enumerate(analysis.ranking, 1):
        marker = " (preset)" if block == analysis.preset else ""
        cells = [str(rank), html.escape(block) + marker, str(order[block]), f"{means[block]:.4f}",
                 *(f"{value:.3f}" for value in per_step[block].tolist())]
        rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    cases = "".join(f"<li>{html.escape(c['prompt'])} &mdash; concept <b>{html.escape(c['concept'])}</b>, seed "
                    f"{c['seed']}, mask {html.escape(str(c['mask']))}</li>" for c in record["cases"])
    images = "".join(_embedded(path) for path in pictures)
    steps = record["steps_range"]
    return ("<!doctype html><meta charset=utf-8><title>conceptrol block analysis</title>"
            "<style>body{font-family:sans-serif}td,th{padding:3px 6px;border:1px solid #ccc;font-size:13px}"
            "th{cursor:pointer;background:#f4f4f4}img{max-width:100%}</style>"
            f"<h1>Concept-specific block of {html.escape(analysis.model)}</h1>"
            f"<p>Best: <b>{html.escape(analysis.best)}</b> (mean AUC {means[analysis.best]:.4f}); preset: "
            f"{html.escape(str(analysis.preset))}. Steps ranked: {'all' if steps is None else f'{steps[0]}:{steps[1]}'}"
            f" of {analysis.num_steps}. Use it: <code>--concept-layer {html.escape(analysis.best)}</code>.</p>"
            f"<ul>{cases}</ul>{images}<table><thead><tr>"
            + "".join(f"<th>{h}</th>" for h in heads) + f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
            + SORTER)


def _embedded(path: Path) -> str:
    with Image.open(path) as image:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    alt = html.escape(path.stem.replace("_", " "))
    return f'<p><img alt="{alt}" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"></p>'
