"""`conceptrol report --paper`: a run's CP, PF and CP·PF beside Table 1 of arXiv 2503.06568, with 95% intervals.

CP and PF are the judge's 0-4 scores divided by 4, averaged (DreamBench++); CP·PF is the product of the two means,
as DreamBench++ and the paper compute it. Intervals are percentile bootstrap intervals over the judged images (each
seed of a prompt is a separate image), drawn from a fixed seed so that a report is reproducible. Images are taken in
(case id, seed) order; `resample_indices(n)` are the draws, so anyone can recompute an interval by hand.
"""

from __future__ import annotations

import html
import os
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from ..core.errors import ConceptrolError
from .rundata import RunData, embed_image

# Table 1 of arXiv 2503.06568 (DreamBench++, GPT-4o judge, scores 0-1): profile -> row -> (CP, PF, CP·PF)
PAPER_TABLE: dict[str, dict[str, tuple[float, float, float]]] = {
    "sd15": {"baseline": (0.881, 0.238, 0.210), "conceptrol": (0.500, 0.795, 0.397)},
    "sdxl": {"baseline": (0.835, 0.414, 0.346), "conceptrol": (0.658, 0.796, 0.524)},
    "flux": {"baseline": (0.438, 0.910, 0.398), "conceptrol": (0.556, 0.866, 0.481)},
}
PAPER_BASELINES = {"sd15": "ip-adapter", "sdxl": "ip-adapter", "flux": "ominicontrol"}  # profile -> baseline row
PAPER_MODELS = {"sd15": "IP-Adapter, SD 1.5", "sdxl": "IP-Adapter, SDXL", "flux": "OminiControl, FLUX"}
RESAMPLES = 2000  # bootstrap resamples per interval
MIN_IMAGES = 5  # fewer judged images (or pairs, for a gain) get no interval: "too few images"
SEED = 0  # the bootstrap's random seed
LEVEL = 0.95  # the intervals' coverage
ROW_ORDER = {"baseline": 0, "conceptrol": 1}  # Table 1's order; methods it has no row for come last
COLUMNS = ("method", "scale", "n", "CP [95%]", "PF [95%]", "CP·PF [95%]", "paper CP / PF / CP·PF",
           "CP·PF gain: ours [95%] vs paper")
OWN_COLUMNS = (*COLUMNS[:6], "CP·PF gain [95%]")  # a run that is not set beside the paper


def paper_gain(profile: str) -> float:
    """The paper's relative gain of Conceptrol in CP·PF over the baseline (SD 1.5: .397 / .210 - 1 = +89%)."""
    return PAPER_TABLE[profile]["conceptrol"][2] / PAPER_TABLE[profile]["baseline"][2] - 1


def resample_indices(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """The bootstrap's draws: [resamples, n] indices into n images, with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central `level` percentile interval of bootstrap statistics (linear interpolation)."""
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def bootstrap_means(scores: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """The mean of every resample: scores [n, 2] (CP, PF), indices [R, n] -> [R, 2]."""
    return scores[indices].mean(axis=1)  # [R, n, 2] -> [R, 2]


def paper_profile(data: RunData) -> str:
    """The run's model profile if Table 1 has rows for it; otherwise an error that says why not."""
    if data.settings is None:
        raise ConceptrolError(f"{data.out} has no run.json (made by conceptrol < 0.2), so its model is unknown; "
                              "Table 1 rows differ per model: make a new run to compare with the paper")
    profile = data.settings["settings"].get("architecture")
    if profile not in PAPER_TABLE:
        what = f"is a {profile} run" if profile else "has a run.json that names no architecture"
        raise ConceptrolError(f"{data.out} {what}; Table 1 of the paper covers IP-Adapter on SD 1.5 "
                              "(sd15) and SDXL (sdxl) and OminiControl on FLUX (flux) only, so there is nothing to "
                              f"compare it with; `conceptrol report {data.out}` shows its figures")
    return profile


def paper_differences(data: RunData) -> list[str]:
    """Why a run is not set beside Table 1: made without --protocol dreambench-plus, or with settings of the
    protocol overridden (from run.json: its settings, and which came from the presets); [] when it is comparable."""
    stored = data.settings or {}
    if stored.get("protocol") != "dreambench-plus":
        return ["it was made without --protocol dreambench-plus (its own judge questions and settings)"]
    settings = stored.get("settings", {})
    differences = [f"{name} {settings.get(name)} (the paper's: {value})" if name != "negative_prompt" else
                   "another negative prompt" for name, value in paper_settings(paper_profile(data)).items()
                   if settings.get(name) != value]
    if "scale" not in stored.get("from_preset", ["scale"]):
        differences.append("--scale given (the paper's: its per-method scales)")
    if str(settings.get("model", "")).startswith("tiny"):
        differences.append(f"model {settings['model']} (random weights)")
    return differences


def paper_settings(profile: str) -> dict[str, object]:
    """The Table 1 settings of `profile` as run.json records them (protocol.TABLE_1, the full window, the preset's
    concept layer)."""
    from ..core.config import CONCEPT_LAYERS
    from .protocol import TABLE_1

    preset = TABLE_1[profile]
    shared = {name: "x".join(map(str, value)) if name == "size" else value for name, value in preset.shared.items()}
    return shared | {"start": preset.start, "end": 1.0, "concept_layer": CONCEPT_LAYERS[profile]}


def judged_images(data: RunData) -> dict[tuple[str, float], dict[tuple[str, int], tuple[float, float]]]:
    """(method, scale) -> (case id, seed) -> (CP, PF) of every validly judged image, in (case id, seed) order."""
    groups: dict[tuple[str, float], dict[tuple[str, int], tuple[float, float]]] = defaultdict(dict)
    for key, verdict in sorted(data.judgements.items()):
        record = data.generations[key]
        image = (record["case_id"], record["seed"])
        groups[(record["method"], record["scale"])][image] = (verdict["cp"], verdict["pf"])
    return {group: dict(sorted(images.items())) for group, images in sorted(groups.items())}


def paper_rows(data: RunData, baseline_scale: float | None = None) -> list[dict]:
    """Per judged (method, scale): our CP, PF, CP·PF with 95% intervals, the paper's row, and Conceptrol's gain.

    Keys: method, scale, n (judged images), prompts, seeds, cp, pf, cp_pf, cp_ci, pf_ci, cp_pf_ci ((low, high)),
    paper_row ("baseline", "conceptrol" or None), paper ((CP, PF, CP·PF), or None also when `paper_differences`
    finds the run not comparable); Conceptrol rows add unpaired (images without a baseline pair), paper_gain (when
    comparable) and, when the baseline was judged on the same prompts and seeds, gain, gain_ci, gain_n,
    gain_baseline ((method, scale)); otherwise gain_missing says why. The baseline is judged at `baseline_scale`, or at the
    Conceptrol row's scale, or at its only judged scale.
    """
    profile = paper_profile(data)
    groups = judged_images(data)
    if not groups:
        raise ConceptrolError(f"{data.out} has no judged images: CP and PF come from the judge; run the same "
                              "`conceptrol evaluate` command with --judge-url (e.g. https://api.openai.com/v1, "
                              "--judge-model gpt-4o as the paper) to judge it first")
    baseline = PAPER_BASELINES[profile]
    comparable = not paper_differences(data)
    rows = [_figures(method, scale, images) | _paper_values(profile, method, comparable)
            for (method, scale), images in groups.items()]
    for row in rows:
        if row["method"] == "conceptrol":
            row |= _gain_over_baseline(groups, baseline, row["scale"], baseline_scale)
            row["unpaired"] = row["n"] - row.get("gain_n", row["n"])
    return sorted(rows, key=lambda r: (ROW_ORDER.get(r["paper_row"], len(ROW_ORDER)), r["method"], r["scale"]))


def _figures(method: str, scale: float, images: dict[tuple[str, int], tuple[float, float]]) -> dict:
    scores = np.array(list(images.values()), dtype=np.float64)  # [n, 2]: CP, PF
    means = bootstrap_means(scores, resample_indices(len(scores)))  # [R, 2]
    cp, pf = scores.mean(axis=0)
    return {"method": method, "scale": scale, "n": len(scores), "prompts": len({case for case, _ in images}),
            "seeds": sorted({seed for _, seed in images}), "cp": float(cp), "pf": float(pf), "cp_pf": float(cp * pf),
            "cp_ci": percentile_interval(means[:, 0]), "pf_ci": percentile_interval(means[:, 1]),
            "cp_pf_ci": percentile_interval(means[:, 0] * means[:, 1])}


def _paper_values(profile: str, method: str, comparable: bool) -> dict:
    """The Table 1 row a method stands for, and the paper's figures when the run is comparable with them."""
    row = {PAPER_BASELINES[profile]: "baseline", "conceptrol": "conceptrol"}.get(method)
    values = {"paper_row": row, "paper": PAPER_TABLE[profile][row] if row and comparable else None}
    return values | ({"paper_gain": paper_gain(profile)} if row == "conceptrol" and comparable else {})


def _gain_over_baseline(groups: dict, baseline: str, scale: float, chosen: float | None) -> dict:
    """Conceptrol's CP·PF over the baseline's, minus 1, on the images judged for both, with a paired interval."""
    scales = [s for method, s in groups if method == baseline]
    if chosen is not None:
        base_scale = chosen if chosen in scales else None
    else:
        base_scale = scale if scale in scales else (scales[0] if len(scales) == 1 else None)
    if base_scale is None:
        return {"gain_missing": _no_baseline(baseline, scales, chosen)}
    base, ours = groups[(baseline, base_scale)], groups[("conceptrol", scale)]
    pairs = [pair for pair in ours if pair in base]  # (case id, seed) judged for both, in order
    if not pairs:
        return {"gain_missing": f"no prompt and seed was judged for both conceptrol {scale:g} and {baseline} "
                                f"{base_scale:g}"}
    gain, interval = paired_gain(np.array([ours[p] for p in pairs]), np.array([base[p] for p in pairs]))
    return {"gain": gain, "gain_ci": interval, "gain_n": len(pairs), "gain_baseline": (baseline, base_scale)}


def _no_baseline(baseline: str, scales: list[float], chosen: float | None) -> str:
    if not scales:
        return (f"no {baseline} images were judged; run the same `conceptrol evaluate` command with --method "
                f"{baseline} conceptrol")
    judged = f"{baseline} was judged at scale {', '.join(f'{s:g}' for s in scales)}"
    if chosen is not None:
        return f"{baseline} has no judged images at scale {chosen:g} ({judged}); pick one of those"
    return f"{judged}; choose which to compare with using --baseline-scale"


def paired_gain(method: np.ndarray, baseline: np.ndarray) -> tuple[float, tuple[float, float]]:
    """CP·PF of `method` over `baseline`'s, minus 1, with a paired bootstrap interval; both [n, 2], same images."""
    indices = resample_indices(len(method))
    ours, theirs = bootstrap_means(method, indices), bootstrap_means(baseline, indices)  # [R, 2] each
    with np.errstate(divide="ignore", invalid="ignore"):  # a baseline CP·PF of 0 gives inf or nan: shown as such
        gain = method[:, 0].mean() * method[:, 1].mean() / (baseline[:, 0].mean() * baseline[:, 1].mean()) - 1
        resampled = ours[:, 0] * ours[:, 1] / (theirs[:, 0] * theirs[:, 1]) - 1
        return float(gain), percentile_interval(resampled)


def paper_columns(rows: list[dict]) -> tuple[str, ...]:
    """COLUMNS beside the paper's figures; OWN_COLUMNS (no paper column, no paper gain) for a run not comparable."""
    return COLUMNS if any(row["paper"] for row in rows) else OWN_COLUMNS


def paper_cells(row: dict) -> dict[str, str]:
    """The text of each of COLUMNS (and OWN_COLUMNS) for one row (the same in the terminal and in report.html)."""
    paper = " / ".join(f"{v:.3f}" for v in row["paper"]) if row["paper"] else "-"
    ours = gain = ""
    if row["method"] == "conceptrol":
        ours = f"{_percent(row['gain'])} {_interval(row['gain_ci'], '+.0%', row['gain_n'])}" if "gain" in row else "-"
        gain = f"{ours} vs {row['paper_gain']:+.0%}" if "paper_gain" in row else ours
    figures = [f"{row[m]:.3f} {_interval(row[m + '_ci'], '.3f', row['n'])}" for m in ("cp", "pf", "cp_pf")]
    cells = dict(zip(COLUMNS, [row["method"], f"{row['scale']:g}", str(row["n"]), *figures, paper, gain]))
    return cells | {OWN_COLUMNS[-1]: ours}


def _interval(bounds: tuple[float, float], spec: str, n: int) -> str:
    """'[low, high]'; too few images for a bootstrap interval, or bounds that are not numbers, say so instead."""
    if n < MIN_IMAGES:
        return "[too few images]"
    if not all(np.isfinite(bounds)):
        return "[undefined: the baseline's CP·PF is 0 in some resamples]"
    return f"[{bounds[0]:{spec}}, {bounds[1]:{spec}}]"


def _percent(gain: float) -> str:
    return f"{gain:+.0%}" if np.isfinite(gain) else "undefined (the baseline's CP·PF is 0)"


def format_paper_table(rows: list[dict]) -> str:
    columns = paper_columns(rows)
    cells = [paper_cells(row) for row in rows]
    widths = {c: max(len(c), *(len(cell[c]) for cell in cells)) for c in columns}
    right = ("scale", "n")

    def line(texts: dict[str, str]) -> str:
        return "  ".join(texts[c].rjust(widths[c]) if c in right else texts[c].ljust(widths[c]) for c in columns)

    header = line({c: c for c in columns}).rstrip()
    return "\n".join([header, "-" * len(header), *(line(cell).rstrip() for cell in cells)])


def paper_title(data: RunData) -> str:
    """The heading; for a run not comparable with Table 1, one line saying which settings differ."""
    model = PAPER_MODELS[paper_profile(data)]
    differences = paper_differences(data)
    if differences:
        return (f"not set beside Table 1 of arXiv 2503.06568 ({model}): {'; '.join(differences)}; this run's "
                "figures with 95% bootstrap intervals only (make the run with --protocol dreambench-plus and no "
                "overrides to compare)")
    return (f"Table 1 of arXiv 2503.06568, {model} (DreamBench++, GPT-4o judge): this run's figures with 95% "
            "bootstrap intervals, then the paper's")


def paper_notes(data: RunData, rows: list[dict]) -> list[str]:
    """What the reader must know: what n and the intervals are, how gains pair, what is missing or failed."""
    seeds = sorted({seed for row in rows for seed in row["seeds"]})
    prompts = len({record["case_id"] for key, record in data.generations.items() if key in data.judgements})
    lines = [f"n counts judged images: each seed ({', '.join(map(str, seeds))}) of a prompt is a separate image, and "
             f"the intervals resample images ({RESAMPLES} resamples, seed {SEED}, percentile); CP·PF is mean CP x "
             "mean PF on each resample" + ("; images of one prompt are not independent, so with several seeds the "
                                          "intervals are somewhat too narrow" if len(seeds) > 1 else "")]
    lines += [_gain_note(row, paper_profile(data)) for row in rows if row["method"] == "conceptrol"]
    lines += _failed_notes(data, rows) + _missing_notes(data)
    benchmark = (data.settings or {}).get("benchmark", "the benchmark")
    paper = "the paper judged DreamBench++'s 1,350 prompts with GPT-4o; " if any(row["paper"] for row in rows) else ""
    lines.append(f"{paper}this run judged {prompts} prompts of {benchmark}")
    return lines


def _gain_note(row: dict, profile: str) -> str:
    if "gain" not in row:
        return f"conceptrol {row['scale']:g} has no gain of its own: {row['gain_missing']}"
    method, scale = row["gain_baseline"]
    unpaired = (f"; {row['unpaired']} of its {row['n']} judged images have no {method} image to pair with and are "
                "left out of the gain" if row["unpaired"] else "")
    paper = (f"; the paper's: {PAPER_TABLE[profile]['conceptrol'][2]:.3f} / {PAPER_TABLE[profile]['baseline'][2]:.3f}"
             f" - 1 = {row['paper_gain']:+.0%}" if "paper_gain" in row else "")
    return (f"gain of conceptrol {row['scale']:g}: its CP·PF over {method} {scale:g}'s, minus 1, on the "
            f"{row['gain_n']} images judged for both (paired by case and seed; paired bootstrap; intervals need "
            f"{MIN_IMAGES} images){unpaired}{paper}")


def _failed_notes(data: RunData, rows: list[dict]) -> list[str]:
    """Failed generations of the rows' methods and scales: in no row, though Table 1's rows cover every prompt."""
    shown = {(row["method"], row["scale"]) for row in rows}
    failed = [r for r in data.generations.values() if r["status"] != "ok" and (r["method"], r["scale"]) in shown]
    if not failed:
        return []
    counts = sorted(Counter((r["method"], r["scale"]) for r in failed).items())
    listed = ", ".join(f"{method} {scale:g}: {n}" for (method, scale), n in counts)
    first = str(failed[0].get("error", "no error recorded"))[:120]
    return [f"{len(failed)} jobs failed and are left out of the rows ({listed}; first error: {first}), while "
            "Table 1's rows cover every prompt (a prompt without its concept fails the baseline too); errors in "
            f"{data.out}/generations.rank*.jsonl"]


def _missing_notes(data: RunData) -> list[str]:
    """Failed judgements of current pictures, pictures not judged yet, and unreadable record lines."""
    from .runner import latest, read_all

    verdicts = latest(read_all(data.out, "judgements"))
    ok = {key: r for key, r in data.generations.items() if r.get("status") == "ok" and key not in data.judgements}
    # a verdict on the current picture that is not among the valid ones failed
    failed = [key for key, r in ok.items()
              if key in verdicts and verdicts[key].get("generation_id") == r.get("generation_id")]
    lines = []
    if failed:
        lines.append(f"{len(failed)} judgements failed and are left out (their errors are in {data.out}/judgements."
                     "rank*.jsonl); run the same `conceptrol evaluate` command with --judge-url to retry them")
    if len(ok) > len(failed):
        lines.append(f"{len(ok) - len(failed)} images are not judged yet; run the same `conceptrol evaluate` command "
                     "with --judge-url to judge them")
    if data.malformed:
        lines.append(f"{data.malformed} record lines could not be read (damaged, or lacking a field) and were "
                     "skipped")
    return lines


def write_paper_plot(data: RunData, rows: list[dict]) -> Path:
    """paper.png: CP, PF and CP·PF of each row beside the paper's, our 95% intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(3 + 2.4 * len(rows), 3.8), sharey=True)
    for column, (axis, metric) in enumerate(zip(axes, ("cp", "pf", "cp_pf"))):
        x = np.arange(len(rows))
        ours = np.array([row[metric] for row in rows])
        errors = np.abs(np.array([row[metric + "_ci"] for row in rows]).T - ours)  # [2, rows]: below, above
        errors[:, np.array([row["n"] for row in rows]) < MIN_IMAGES] = 0  # too few images for an interval
        axis.bar(x - 0.2, ours, 0.4, yerr=errors, capsize=3, label="this run (95% interval)")
        paper = [row["paper"][column] if row["paper"] else np.nan for row in rows]
        axis.bar(x + 0.2, paper, 0.4, color="0.7", hatch="//", label="paper, Table 1")
        axis.set_xticks(x, [f"{row['method']} {row['scale']:g}" for row in rows], rotation=20, ha="right")
        axis.set(title={"cp": "CP", "pf": "PF", "cp_pf": "CP·PF"}[metric], ylim=(0, 1.1))
    axes[-1].legend(fontsize=8, loc="upper right")
    against = "vs Table 1 of arXiv 2503.06568" if any(row["paper"] for row in rows) else "(not comparable with Table 1)"
    figure.suptitle(f"{PAPER_MODELS[paper_profile(data)]}: this run {against}", fontsize=10)
    figure.tight_layout()
    path = data.out / "paper.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def paper_html(data: RunData, rows: list[dict] | None = None) -> str:
    """The paper section of report.html (table, notes, paper.png if it is newer than the records), or ''."""
    try:
        rows = rows if rows is not None else paper_rows(data)
    except ConceptrolError:
        return ""
    columns = paper_columns(rows)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(paper_cells(r)[c])}</td>" for c in columns) + "</tr>"
                   for r in rows)
    described = "".join(f"<li>{html.escape(line)}</li>" for line in paper_notes(data, rows))
    plot = data.out / "paper.png"
    alt = "CP, PF and CP·PF of each row with 95% intervals, beside Table 1's where comparable"
    image = embed_image(data, plot, 1200, alt=alt) if _newer_than_records(plot, data.out) else (
        "<p><i>run <code>conceptrol report --paper</code> to draw paper.png</i></p>")
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    return f"<h2>{html.escape(paper_title(data))}</h2><table><tr>{head}</tr>{body}</table><ul>{described}</ul>{image}"


def _newer_than_records(path: Path, out: Path) -> bool:
    records = [os.stat(p).st_mtime_ns for p in out.glob("*.rank*.jsonl")]
    return path.exists() and os.stat(path).st_mtime_ns >= max(records, default=0)
