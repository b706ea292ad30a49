"""Evaluation protocols: the settings of the paper's Table 1 rows, applied to `conceptrol evaluate`.

`--protocol dreambench-plus` runs DreamBench++ (a clone of its repository, with its released data/) the way
the paper's Table 1 was made: ALGORITHM.md's settings for each row (the baseline at adapter scale 0.6 without
warm-up; Conceptrol at the paper's scale with warm-up 0.2), one image per prompt, and the judge with
DreamBench++'s own prompt templates read from the clone. A flag given explicitly overrides its preset value;
run.json records which values came from the preset.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..app.settings import NEGATIVE_PROMPT
from ..core.errors import ConceptrolError

PROTOCOLS = ("dreambench-plus",)


@dataclass(frozen=True)
class RowPreset:
    """One model's Table 1 rows: the settings both rows share, and each method's own scale and warm-up."""

    shared: dict[str, Any]
    scales: dict[str, float]  # method -> adapter scale (OminiControl: condition scale c)
    start: float = 0.0  # Conceptrol's warm-up; the baseline always starts at 0
    extra: dict[str, Any] = field(default_factory=dict)


# ALGORITHM.md section 1's demo settings of the paper's code (the paper states no others), and section 2's
# defaults for OminiControl; the baselines' scale 0.6 and start 0 as ALGORITHM.md says.
TABLE_1 = {
    "sd15": RowPreset(dict(adapter="plus", size=(512, 512), steps=50, guidance=7.5, negative_prompt=NEGATIVE_PROMPT),
                      {"ip-adapter": 0.6, "conceptrol": 1.5}, start=0.2),
    "sdxl": RowPreset(dict(adapter="plus", size=(1024, 1024), steps=50, guidance=6.0, negative_prompt=NEGATIVE_PROMPT),
                      {"ip-adapter": 0.6, "conceptrol": 1.0}, start=0.2),
    "flux": RowPreset(dict(adapter="subject", size=(512, 512), steps=8, condition_size=512),
                      {"ominicontrol": 1.0, "conceptrol": 1.0}, start=0.0),
}


@dataclass(frozen=True)
class Applied:
    """Settings with a protocol's presets filled in, and which fields the presets supplied."""

    settings: Any  # EvaluateSettings
    method_scales: dict[str, tuple[float, ...]]  # the scales each method runs at
    from_preset: tuple[str, ...]


def dreambench_plus_data(clone: Path) -> Path:
    """The data/ folder of a DreamBench++ clone (images/, captions/), checked."""
    clone = Path(clone).expanduser()
    data = clone / "data"
    if not (data / "captions").is_dir() or not (data / "images").is_dir():
        raise ConceptrolError(f"--protocol dreambench-plus needs --benchmark to be a clone of the DreamBench++ "
                              f"repository with its released data/ folder (images/, captions/) inside; {data} has "
                              "none: download the data as DreamBench++'s README says and unpack it there")
    return data


def apply_protocol(settings: Any, profile: str, baseline: str) -> Applied:
    """`settings` with the Table 1 presets of `profile` filled in where no flag was given."""
    if profile not in TABLE_1:
        raise ConceptrolError(f"--protocol dreambench-plus has Table 1's rows for IP-Adapter on SD 1.5 / SDXL and "
                              f"OminiControl on FLUX; this model and adapter is {profile}")
    preset = TABLE_1[profile]
    given = {f.name for f in fields(settings) if getattr(settings, f.name) not in (None, ())}
    filled = {name: value for name, value in preset.shared.items() if name not in given}
    if "start" not in given and "conceptrol" in (settings.method or ("conceptrol",)):
        filled["start"] = preset.start
    methods = settings.method or (baseline, "conceptrol")
    if "scale" in given:
        scales = {method: settings.scale for method in methods}
    else:
        scales = {method: (preset.scales[method],) for method in methods}
        filled["scale"] = tuple(dict.fromkeys(s for (s,) in scales.values()))
    return Applied(replace(settings, **filled), scales, tuple(sorted(filled)))
