"""`conceptrol report --paper`: a run's CP, PF and CP·PF beside Table 1, on run folders written record by record."""

import json
import math
import os
import re

import pytest
from PIL import Image

from conceptrol import CONCEPT_LAYERS, ConceptrolError
from conceptrol.app.settings import NEGATIVE_PROMPT
from conceptrol.eval.paper import PAPER_TABLE, RESAMPLES, paper_gain, paper_rows, resample_indices
from conceptrol.eval.report import paper_report, report
from conceptrol.eval.rundata import load_run


def image(method, scale, seed, case, cp, pf, status="ok"):
    return {"method": method, "scale": scale, "seed": seed, "case": case, "cp": cp, "pf": pf, "status": status}


PAPER_SETTINGS = {  # ALGORITHM.md's settings of each Table 1 entry, as run.json records them
    "sd15": dict(adapter="plus", size="512x512", steps=50, guidance=7.5, negative_prompt=NEGATIVE_PROMPT, start=0.2,
                 end=1.0, concept_layer=CONCEPT_LAYERS["sd15"]),
    "sdxl": dict(adapter="plus", size="1024x1024", steps=50, guidance=6.0, negative_prompt=NEGATIVE_PROMPT, start=0.2,
                 end=1.0, concept_layer=CONCEPT_LAYERS["sdxl"]),
    "flux": dict(adapter="subject", size="512x512", steps=8, condition_size=512, start=0.0, end=1.0,
                 concept_layer=CONCEPT_LAYERS["flux"]),
}


def run_json(profile, protocol="dreambench-plus", **overrides):
    """run.json of a protocol run at the paper's settings (other profiles: no protocol), with `overrides` applied."""
    settings = {"architecture": profile, "model": "/models/sd", **PAPER_SETTINGS.get(profile, {}), **overrides}
    preset = [name for name in ("adapter", "size", "steps", "guidance", "negative_prompt", "condition_size", "start",
                                "scale") if name not in overrides]
    return {"format": 1, "settings": settings, "benchmark": "/data/dreambench", "conceptrol": "0.2",
            "protocol": protocol if profile in PAPER_SETTINGS else None, "from_preset": preset}


def make_run(out, profile, images, judge_errors=(), stored=None):
    """A run folder as `conceptrol evaluate` leaves it: run.json, one generation and one verdict per image.

    An image with cp None is generated but not judged; one with status "error" failed to generate; `judge_errors`
    are keys whose verdict failed; `stored` is run.json (default: `run_json(profile)`).
    """
    (out / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(out / "reference.png")
    (out / "run.json").write_text(json.dumps(stored or run_json(profile)))
    generations, verdicts = [], []
    for i, item in enumerate(images):
        key = f"{item['method']}/{item['scale']:g}/{item['seed']}/{item['case']}"
        picture = f"images/{i}.png"
        Image.new("RGB", (8, 8), "blue").save(out / picture)
        generations.append({"key": key, "case_id": item["case"], "method": item["method"], "scale": item["scale"],
                            "seed": item["seed"], "prompt": f"a {item['case']} on the moon", "concept": item["case"],
                            "category": "object", "reference": str(out / "reference.png"), "status": item["status"],
                            "image": picture, "generation_id": f"g{i}", "finished": 1.0})
        if item["status"] != "ok":
            generations[-1] |= {"error": f"concept {item['case']!r} not found"}
        elif key in judge_errors:
            verdicts.append({"key": key, "generation_id": f"g{i}", "status": "error", "error": "timeout",
                             "finished": 2.0})
        elif item["cp"] is not None:
            verdicts.append({"key": key, "generation_id": f"g{i}", "status": "ok", "cp": item["cp"], "pf": item["pf"],
                             "cp_runs": [item["cp"] * 4], "pf_runs": [item["pf"] * 4], "finished": 2.0})
    for name, records in (("generations", generations), ("judgements", verdicts)):
        (out / f"{name}.rank0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def row_of(rows, method, scale):
    return next(r for r in rows if (r["method"], r["scale"]) == (method, scale))


def slow_interval(values, indices, statistic):
    """The percentile bootstrap interval in pure Python over the given draws (linear interpolation)."""
    draws = sorted(statistic([values[i] for i in draw]) for draw in indices.tolist())

    def percentile(q):
        position = q / 100 * (len(draws) - 1)
        low = math.floor(position)
        high = min(low + 1, len(draws) - 1)
        return draws[low] + (draws[high] - draws[low]) * (position - low)

    return percentile(2.5), percentile(97.5)


def mean(values):
    return sum(values) / len(values)


def product_of_means(pairs):
    return mean([cp for cp, _ in pairs]) * mean([pf for _, pf in pairs])


CP = [1.0, 0.75, 0.5, 0.25, 1.0, 0.0]
PF = [0.25, 0.5, 0.5, 0.75, 0.0, 1.0]
CASES = ["bear", "cat", "dog", "car", "hat", "vase"]


def sd15_images(seeds=(0,), conceptrol_scale=1.5):
    """ip-adapter 0.6 with CP/PF above; conceptrol with CP halved and PF raised, on the same cases and seeds."""
    images = []
    for seed in seeds:
        for case, cp, pf in zip(CASES, CP, PF):
            images.append(image("ip-adapter", 0.6, seed, case, cp, pf))
            images.append(image("conceptrol", conceptrol_scale, seed, case, cp / 2, min(1.0, pf + 0.25)))
    return images


def sd15_run(out, seeds=(0,), conceptrol_scale=1.5):
    return make_run(out, "sd15", sd15_images(seeds, conceptrol_scale))


def test_table_1_is_the_papers_and_its_cp_pf_is_the_product_of_its_cp_and_pf():
    assert PAPER_TABLE["sd15"] == {"baseline": (0.881, 0.238, 0.210), "conceptrol": (0.500, 0.795, 0.397)}
    assert PAPER_TABLE["sdxl"] == {"baseline": (0.835, 0.414, 0.346), "conceptrol": (0.658, 0.796, 0.524)}
    assert PAPER_TABLE["flux"] == {"baseline": (0.438, 0.910, 0.398), "conceptrol": (0.556, 0.866, 0.481)}
    for rows in PAPER_TABLE.values():
        for cp, pf, cp_pf in rows.values():
            assert cp * pf == pytest.approx(cp_pf, abs=0.0015)  # the table's own rounding


def test_the_papers_gain_on_sd15_is_the_89_percent_of_the_abstract():
    assert paper_gain("sd15") == pytest.approx(0.397 / 0.210 - 1) and round(paper_gain("sd15"), 2) == 0.89
    assert round(paper_gain("sdxl"), 2) == 0.51 and round(paper_gain("flux"), 2) == 0.21


def test_rows_hold_the_means_their_product_and_how_many_images(tmp_path):
    rows = paper_rows(load_run(sd15_run(tmp_path, seeds=(0, 1))))
    assert [(r["method"], r["scale"]) for r in rows] == [("ip-adapter", 0.6), ("conceptrol", 1.5)]  # Table 1's order
    base = row_of(rows, "ip-adapter", 0.6)
    assert base["cp"] == pytest.approx(mean(CP)) and base["pf"] == pytest.approx(mean(PF))
    assert base["cp_pf"] == pytest.approx(mean(CP) * mean(PF))  # the product of the means ...
    assert base["cp_pf"] != pytest.approx(mean([c * p for c, p in zip(CP, PF)]))  # ... not the mean of products
    assert (base["n"], base["prompts"], base["seeds"]) == (12, 6, [0, 1])  # seeds count as separate images
    assert base["paper_row"] == "baseline" and base["paper"] == PAPER_TABLE["sd15"]["baseline"]
    ours = row_of(rows, "conceptrol", 1.5)
    assert ours["paper_row"] == "conceptrol" and ours["paper"] == PAPER_TABLE["sd15"]["conceptrol"]
    assert ours["paper_gain"] == pytest.approx(0.397 / 0.210 - 1) and "paper_gain" not in base


@pytest.mark.parametrize("metric", ["cp", "pf", "cp_pf"])
def test_interval_is_the_percentile_bootstrap_over_the_exposed_draws(tmp_path, metric):
    scores = {f"case{i}": ((0.37 * i * i + 0.11) % 1, (0.53 * i + 0.29) % 1) for i in range(11)}  # many distinct means
    run = make_run(tmp_path, "sd15", [image("ip-adapter", 0.6, 0, case, *s) for case, s in scores.items()])
    (row,) = paper_rows(load_run(run))
    pairs = [scores[case] for case in sorted(scores)]  # images in case id order
    statistic = {"cp": lambda ps: mean([c for c, _ in ps]), "pf": lambda ps: mean([p for _, p in ps]),
                 "cp_pf": product_of_means}[metric]
    indices = resample_indices(len(pairs))
    assert indices.shape == (RESAMPLES, len(pairs))
    assert row[metric + "_ci"] == pytest.approx(slow_interval(pairs, indices, statistic), rel=1e-12)


def test_interval_contains_the_mean_and_narrows_with_more_images(tmp_path):
    small = paper_rows(load_run(sd15_run(tmp_path / "small")))
    large = paper_rows(load_run(sd15_run(tmp_path / "large", seeds=range(8))))
    for few, many in zip(small, large):
        for metric in ("cp", "pf", "cp_pf"):
            low, high = few[metric + "_ci"]
            assert low < few[metric] < high
            assert many[metric + "_ci"][1] - many[metric + "_ci"][0] < 0.7 * (high - low)


def test_interval_is_one_point_when_every_image_scores_the_same(tmp_path):
    run = make_run(tmp_path, "sdxl", [image("ip-adapter", 1.0, 0, case, 0.75, 0.5) for case in CASES])
    (row,) = paper_rows(load_run(run))
    assert row["cp_ci"] == pytest.approx((0.75, 0.75)) and row["pf_ci"] == pytest.approx((0.5, 0.5))
    assert row["cp_pf_ci"] == pytest.approx((0.375, 0.375)) and row["paper"] == PAPER_TABLE["sdxl"]["baseline"]


def test_gain_pairs_images_by_case_and_seed_and_leaves_unpaired_ones_out(tmp_path):
    images = [image("ominicontrol", 1.0, 0, case, cp, pf) for case, cp, pf in zip(CASES, CP, PF)]
    images += [image("conceptrol", 1.0, 0, case, cp, pf) for case, cp, pf in zip(CASES[:4], PF, CP)]
    images += [image("conceptrol", 1.0, 1, "bear", 0.0, 0.0)]  # no ominicontrol image with seed 1: unpaired
    row = row_of(paper_rows(load_run(make_run(tmp_path, "flux", images))), "conceptrol", 1.0)
    base = sorted(zip(CASES[:4], CP, PF))
    ours = sorted(zip(CASES[:4], PF, CP))
    expected = product_of_means([(c, p) for _, c, p in ours]) / product_of_means([(c, p) for _, c, p in base]) - 1
    assert row["gain"] == pytest.approx(expected) and row["gain_n"] == 4 and row["n"] == 5
    assert row["gain_baseline"] == ("ominicontrol", 1.0) and row["paper_gain"] == pytest.approx(0.481 / 0.398 - 1)
    pairs = [((c1, p1), (c2, p2)) for (_, c1, p1), (_, c2, p2) in zip(ours, base)]
    slow = slow_interval(pairs, resample_indices(4), lambda ps: product_of_means([a for a, _ in ps])
                         / product_of_means([b for _, b in ps]) - 1)
    assert row["gain_ci"] == pytest.approx(slow, rel=1e-12)


def test_paired_gain_is_exact_when_every_image_gains_the_same(tmp_path):
    """Conceptrol doubles PF on every prompt: each paired resample gives +100%, an unpaired one would not."""
    images = [image("ip-adapter", 1.0, 0, case, cp, pf / 2) for case, cp, pf in zip(CASES, CP, PF)]
    images += [image("conceptrol", 1.0, 0, case, cp, pf) for case, cp, pf in zip(CASES, CP, PF)]
    row = row_of(paper_rows(load_run(make_run(tmp_path, "sd15", images))), "conceptrol", 1.0)
    assert row["gain"] == pytest.approx(1.0) and row["gain_ci"] == pytest.approx((1.0, 1.0))


def test_gain_compares_with_the_baseline_at_the_same_scale_else_its_only_one(tmp_path):
    rows = paper_rows(load_run(sd15_run(tmp_path / "protocol")))  # ip-adapter 0.6, conceptrol 1.5
    assert row_of(rows, "conceptrol", 1.5)["gain_baseline"] == ("ip-adapter", 0.6)
    images = [image(m, s, 0, case, cp, pf) for m in ("ip-adapter", "conceptrol") for s in (0.6, 1.5)
              for case, cp, pf in zip(CASES, CP, PF)]
    data = load_run(make_run(tmp_path / "grid", "sd15", images))
    assert [row_of(paper_rows(data), "conceptrol", s)["gain_baseline"][1] for s in (0.6, 1.5)] == [0.6, 1.5]
    assert row_of(paper_rows(data, baseline_scale=0.6), "conceptrol", 1.5)["gain_baseline"] == ("ip-adapter", 0.6)


def test_gain_says_why_it_is_missing(tmp_path):
    images = [image("ip-adapter", s, 0, "dog", 0.5, 0.5) for s in (0.6, 1.0)]
    images.append(image("conceptrol", 1.5, 0, "dog", 1.0, 1.0))
    row = row_of(paper_rows(load_run(make_run(tmp_path / "two", "sd15", images))), "conceptrol", 1.5)
    assert "gain" not in row and "0.6, 1" in row["gain_missing"] and "--baseline-scale" in row["gain_missing"]
    row = row_of(paper_rows(load_run(tmp_path / "two"), baseline_scale=0.8), "conceptrol", 1.5)
    assert "no judged images at scale 0.8 (ip-adapter was judged at scale 0.6, 1)" in row["gain_missing"]
    alone = make_run(tmp_path / "alone", "sd15", [image("conceptrol", 1.5, 0, "dog", 1, 1)])
    (row,) = paper_rows(load_run(alone))
    assert "no ip-adapter images were judged" in row["gain_missing"] and "--method ip-adapter" in row["gain_missing"]


@pytest.mark.parametrize("profile", ["flux-kontext", "flux-ip", "flux-redux"])
def test_a_model_without_a_table_1_row_is_refused_saying_which_it_has(tmp_path, profile):
    run = make_run(tmp_path, profile, [image("conceptrol", 1.0, 0, "dog", 0.5, 0.5)])
    with pytest.raises(ConceptrolError, match=f"{profile} run; Table 1 .* SD 1.5 .* SDXL .* OminiControl on FLUX"):
        paper_report(run)
    assert not (run / "paper.png").exists()


def test_an_unjudged_run_is_refused_saying_to_judge_it_first(tmp_path):
    run = make_run(tmp_path, "sd15", [image("conceptrol", 1.0, 0, "dog", None, None)])
    with pytest.raises(ConceptrolError, match="no judged images.*--judge-url"):
        paper_report(run)


def test_a_run_without_run_json_is_refused(tmp_path):
    run = make_run(tmp_path, "sd15", [image("conceptrol", 1.0, 0, "dog", 0.5, 0.5)])
    (run / "run.json").unlink()
    with pytest.raises(ConceptrolError, match="no run.json.*model is unknown"):
        paper_rows(load_run(run))


def test_report_prints_the_table_beside_the_paper_and_the_notes(tmp_path):
    lines = paper_report(sd15_run(tmp_path, seeds=(0, 1)))
    assert lines[0].startswith("Table 1 of arXiv 2503.06568, IP-Adapter, SD 1.5 (DreamBench++, GPT-4o judge)")
    header, rule, baseline, conceptrol = lines[1].splitlines()
    assert re.fullmatch(r"method +scale +n +CP \[95%\] +PF \[95%\] +CP·PF \[95%\] +paper CP / PF / CP·PF +"
                        r"CP·PF gain: ours \[95%\] vs paper", header) and set(rule) == {"-"}
    number, interval = r"\d\.\d{3}", r"\[\d\.\d{3}, \d\.\d{3}\]"
    figures = rf" +{number} {interval}" * 3
    assert re.fullmatch(rf"conceptrol +1\.5 +12{figures} +0\.500 / 0\.795 / 0\.397 +[+-]\d+% \[[+-]\d+%, "
                        r"[+-]\d+%\] vs \+89%", conceptrol), conceptrol
    assert re.fullmatch(rf"ip-adapter +0\.6 +12{figures} +0\.881 / 0\.238 / 0\.210", baseline), baseline
    notes = "\n".join(lines[2:])
    assert "each seed (0, 1) of a prompt is a separate image" in notes and "2000 resamples, seed 0" in notes
    assert "on the 12 images judged for both (paired by case and seed" in notes and "0.397 / 0.210 - 1 = +89%" in notes
    assert "this run judged 6 prompts of /data/dreambench" in notes
    assert lines[-1].startswith("wrote ") and str(tmp_path / "paper.png") in lines[-1]


def test_report_table_is_aligned_columns_of_three_decimals_and_whole_percent_gains(tmp_path):
    images = [image("ip-adapter", 1.0, 0, case, 0.75, 0.5) for case in CASES]
    images += [image("conceptrol", 1.0, 0, case, 0.75, 1.0) for case in CASES]
    assert paper_report(make_run(tmp_path, "sdxl", images))[1] == "\n".join([
        "method      scale  n  CP [95%]              PF [95%]              CP·PF [95%]           "
        "paper CP / PF / CP·PF  CP·PF gain: ours [95%] vs paper", "-" * 142,
        "ip-adapter      1  6  0.750 [0.750, 0.750]  0.500 [0.500, 0.500]  0.375 [0.375, 0.375]  0.835 / 0.414 / 0.346",
        "conceptrol      1  6  0.750 [0.750, 0.750]  1.000 [1.000, 1.000]  0.750 [0.750, 0.750]  0.658 / 0.796 / 0.524"
        "  +100% [+100%, +100%] vs +51%"])


def test_failed_and_missing_judgements_are_counted_and_left_out(tmp_path):
    images = [image("ip-adapter", 1.0, 0, case, cp, pf) for case, cp, pf in zip(CASES, CP, PF)]
    images += [image("ip-adapter", 1.0, 1, "dog", None, None)]
    run = make_run(tmp_path, "sd15", images, judge_errors={"ip-adapter/1/0/bear", "ip-adapter/1/0/cat"})
    (row,) = paper_rows(load_run(run))
    assert row["n"] == 4 and row["cp"] == pytest.approx(mean(CP[2:]))
    notes = "\n".join(paper_report(run))
    assert "2 judgements failed and are left out" in notes and "1 images are not judged yet" in notes


def embedded_images(page):
    return re.findall(r'<img src="data:image/png;base64,', page)


def test_report_writes_paper_png_and_embeds_it_with_the_table_in_report_html(tmp_path):
    run = sd15_run(tmp_path)
    paper_report(run)
    with Image.open(run / "paper.png") as plot:
        assert plot.size[0] > 400
    page = (run / "report.html").read_text()
    section = page.split("<h2>Table 1 of arXiv 2503.06568, IP-Adapter, SD 1.5")[1].split("<h2>Reference")[0]
    assert "<th>CP·PF gain: ours [95%] vs paper</th>" in section and "vs +89%" in section
    assert len(embedded_images(section)) == 1  # paper.png
    report(run)  # the plain report keeps the paper section, and paper.png while the records are older
    assert len(embedded_images((run / "report.html").read_text().split("<h2>Reference")[0])) == 2  # cp_pf, paper


def test_report_html_leaves_out_a_paper_png_older_than_the_records(tmp_path):
    run = sd15_run(tmp_path)
    paper_report(run)
    os.utime(run / "paper.png", ns=(0, 0))
    report(run)
    page = (run / "report.html").read_text()
    assert "Table 1 of arXiv" in page and "run <code>conceptrol report --paper</code> to draw paper.png" in page


@pytest.mark.parametrize("profile,score", [("sd15", None), ("flux-kontext", 0.5)])
def test_report_html_of_a_run_without_a_paper_comparison_still_works(tmp_path, profile, score):
    run = make_run(tmp_path, profile, [image("conceptrol", 1.0, 0, "dog", score, score)])
    report(run)
    page = (run / "report.html").read_text()
    assert "<h2>Reference &rarr; outputs, seed 0</h2>" in page and "Table 1 of arXiv" not in page


def test_a_run_made_without_the_protocol_is_not_set_beside_table_1(tmp_path):
    run = sd15_run(tmp_path)
    (run / "run.json").write_text(json.dumps(run_json("sd15", protocol=None)))
    lines = paper_report(run)
    text = "\n".join(lines)
    assert lines[0].startswith("not set beside Table 1 of arXiv 2503.06568 (IP-Adapter, SD 1.5): it was made without "
                               "--protocol dreambench-plus")
    header = lines[1].splitlines()[0]
    assert "paper" not in header and header.endswith("CP·PF gain [95%]")
    assert "0.881" not in text and "0.500 / 0.795" not in text and "+89%" not in text and "1,350" not in text
    conceptrol = next(line for line in lines[1].splitlines() if line.startswith("conceptrol"))
    assert re.search(r"[+-]\d+% \[[+-]\d+%, [+-]\d+%\]$", conceptrol)  # our own gain stays
    page = (run / "report.html").read_text()
    assert "not set beside Table 1" in page and "0.881" not in page


def test_overridden_protocol_settings_are_named_in_one_line_and_equal_values_are_not(tmp_path):
    stored = run_json("sd15", steps=2, size="32x32", model="tiny", guidance=7.5)  # guidance given, the paper's value
    lines = paper_report(make_run(tmp_path / "quick", "sd15", sd15_images(), stored=stored))
    assert lines[0].startswith("not set beside Table 1") and "\n" not in lines[0]
    for named in ("steps 2 (the paper's: 50)", "size 32x32 (the paper's: 512x512)", "model tiny (random weights)"):
        assert named in lines[0]
    assert "guidance" not in lines[0] and "0.881" not in "\n".join(lines)
    exact = run_json("sd15", steps=50)  # given with --steps 50: the paper's own value
    lines = paper_report(make_run(tmp_path / "exact", "sd15", sd15_images(), stored=exact))
    assert lines[0].startswith("Table 1 of arXiv") and "0.881 / 0.238 / 0.210" in lines[1]


def test_too_few_images_get_no_interval_and_never_nan(tmp_path):
    images = [image("ip-adapter", 0.6, 0, "dog", 0.0, 0.5), image("ip-adapter", 0.6, 0, "cat", 1.0, 1.0),
              image("conceptrol", 1.5, 0, "dog", 0.5, 0.5), image("conceptrol", 1.5, 0, "cat", 0.5, 0.5)]
    rows = paper_rows(load_run(make_run(tmp_path, "sd15", images)))
    assert any(math.isnan(bound) for bound in row_of(rows, "conceptrol", 1.5)["gain_ci"])  # a resample of 'dog' only
    lines = paper_report(tmp_path)
    table = lines[1]
    assert "nan" not in "\n".join(lines) and table.count("[too few images]") == 2 * 3 + 1


def test_failed_and_unpaired_images_are_counted_next_to_the_comparison(tmp_path):
    images = sd15_images()
    images += [image("ip-adapter", 0.6, 0, "frog", None, None, "error"),
               image("conceptrol", 1.5, 0, "frog", None, None, "error"),  # a concept missing fails both rows
               image("conceptrol", 1.5, 1, "bear", 0.5, 0.5)]  # judged, but no baseline image with seed 1
    notes = "\n".join(paper_report(make_run(tmp_path, "sd15", images)))
    assert "2 jobs failed and are left out of the rows (conceptrol 1.5: 1, ip-adapter 0.6: 1;" in notes
    judged = sum(1 for i in images if i["method"] == "conceptrol" and i["status"] == "ok")
    assert f"1 of its {judged} judged images have no ip-adapter image to pair with" in notes
