"""`conceptrol analyze`: the attention block analysis of a model, every input checked before any weights load.

The library's `analyze_blocks` does the work; this module reads the command's settings (one case from flags or many
from a JSONL file), checks what it can without weights (masks, concepts in the prompts with the model's tokenizer,
the steps range, the output folder, the segmenter's availability), then loads the stock pipeline, runs and saves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..core.errors import ConceptrolError
from .settings import check_number, check_seed, check_steps, parse_concept, tiny_profile

SEGMENTER = "owlv2-sam"
DEFAULT_STEPS = {"sd15": 50, "sdxl": 50, "flux": 28, "flux2": 50, "qwenimage": 40}  # the pipelines' own steps


@dataclass(frozen=True)
class AnalyzeSettings:
    """What `conceptrol analyze` runs; field names are the command's flags."""

    out: Path  # the folder analysis.json, the images and the pictures go to (never over earlier files)
    model: str = "sd15"  # preset, hub id, local folder, or tiny-sd15 / tiny-flux
    reference: tuple[Path, ...] = ()  # what an editing model edits in every case (Qwen-Image-Edit; FLUX.2 may take it)
    prompt: str | None = None  # one case from the flags ...
    concept: str | None = None
    mask: Path | None = None  # None: segment the image (--segmenter)
    seed: int = 0
    cases: Path | None = None  # ... or many from a JSONL file: prompt, concept, mask, seed per line
    steps: int | None = None  # None: the pipeline's own default
    size: tuple[int, int] | None = None  # (width, height); None: the model's own
    guidance: float | None = None  # None: the pipeline's own
    negative_prompt: str | None = None  # SD and Qwen-Image-Edit
    steps_range: str | None = None  # "a:b": rank on steps a..b-1 (all when None)
    segmenter: str = SEGMENTER  # for cases without a mask
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.cases is not None and any(v is not None for v in (self.prompt, self.concept, self.mask)):
            raise ConceptrolError("--cases holds every case's prompt, concept and mask; leave out --prompt, --concept "
                                  "and --mask (or leave out --cases for one case)")
        if self.cases is None and (not self.prompt or not self.prompt.strip() or not self.concept):
            raise ConceptrolError("pass --prompt and --concept (the prompt's word for the subject), or --cases FILE.jsonl")
        check_seed(self.seed)
        check_steps(self.steps)
        check_number("guidance", self.guidance)
        from .settings import ModelSource, check_size

        check_size(self.size)
        object.__setattr__(self, "reference", tuple(self.reference or ()))
        ModelSource(self.model, None, None, self.device, self.dtype)
        steps_range(self.steps_range)  # the syntax; the bounds once the steps are known

    @property
    def pipeline_kwargs(self) -> dict[str, Any]:
        """The stock pipeline's keywords these settings give (only those set: the rest are the pipeline's own)."""
        width, height = self.size or (None, None)
        given = dict(num_inference_steps=self.steps, width=width, height=height, guidance_scale=self.guidance,
                     negative_prompt=self.negative_prompt)
        return {key: value for key, value in given.items() if value is not None}


def steps_range(text: str | None, steps: int | None = None) -> slice | None:
    """'a:b' (steps a to b-1, either end may be left out, as Python slices) checked against `steps` when known."""
    if text is None:
        return None
    try:
        start, stop = (int(part) if part.strip() else None for part in text.split(":"))
    except ValueError:
        raise ConceptrolError(f"--steps-range must look like 0:10 (steps 0 to 9), got {text!r}") from None
    if (start is not None and start < 0) or (stop is not None and stop < 1) or (
            start is not None and stop is not None and start >= stop):
        raise ConceptrolError(f"--steps-range {text}: pass start:end with 0 <= start < end, e.g. 0:10")
    if steps is not None and ((start or 0) >= steps or (stop or steps) > steps):
        raise ConceptrolError(f"--steps-range {text} is past the {steps} steps run; pass a range within 0:{steps}")
    return slice(start, stop)


@dataclass
class CheckedAnalysis:
    """What the checks found: the cases, the tokenizer-checked model, and a tiny pipeline when it is cheap."""

    cases: list[Any]
    architecture: str
    steps: int
    ranked: slice | None
    pipe: Any = None
    needs_segmenter: bool = False
    references: list[Any] = field(default_factory=list)  # the --reference images, read
    notes: list[str] = field(default_factory=list)


def read_cases(settings: AnalyzeSettings) -> list[Any]:
    """The cases from the flags or the JSONL file (masks relative to it), every mask read and checked."""
    from ..analysis import AnalysisCase

    if settings.cases is None:
        return [_checked_case(AnalysisCase(settings.prompt, parse_concept(settings.concept), settings.mask,
                                           settings.seed), settings.size, "--mask")]
    path = Path(settings.cases).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ConceptrolError(f"cannot read --cases {path} ({error}); pass a JSONL file, one case per line") from None
    cases = [_case_from_line(line, number, path, settings) for number, line in enumerate(lines, 1) if line.strip()]
    if not cases:
        raise ConceptrolError(f"--cases {path} holds no case; write one JSON object per line: prompt, concept, mask, seed")
    return cases


def _case_from_line(line: str, number: int, path: Path, settings: AnalyzeSettings) -> Any:
    from ..analysis import AnalysisCase

    where = f"{path.name} line {number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise ConceptrolError(f"{where}: {error.msg} (column {error.colno})") from None
    if not isinstance(row, dict):
        raise ConceptrolError(f"{where}: a case is a JSON object with prompt, concept, mask and seed")
    for key in ("prompt", "concept"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise ConceptrolError(f"{where} has no {key}; each line needs prompt and concept (mask and seed optional)")
    seed = row.get("seed", settings.seed)
    try:
        check_seed(seed, f"{where}: seed")
    except ConceptrolError as error:
        raise ConceptrolError(str(error)) from None
    mask = row.get("mask")
    mask = None if mask is None else (path.parent / Path(mask).expanduser())
    return _checked_case(AnalysisCase(row["prompt"], parse_concept(row["concept"]), mask, seed), settings.size, where)


def _checked_case(case: Any, size: tuple[int, int] | None, where: str) -> Any:
    """A case whose mask file is an image with subject and background pixels (and the image's shape, when known)."""
    from ..analysis.masks import check_subject, mask_values, subject_pixels

    if case.mask is None:
        return case
    values = mask_values(case.mask)
    name = f"mask {case.mask} ({where})"
    if size is not None:
        subject_pixels(values, size, name)
    else:
        import torch

        check_subject(torch.from_numpy(values) >= 0.5, name)
    return case


def check_analysis(settings: AnalyzeSettings) -> CheckedAnalysis:
    """Every check that needs no weights: the output folder, the cases and masks, the model's configs and tokenizer
    (each concept located), sizes, the steps range, and the segmenter's availability when a case has no mask."""
    from .outputs import check_output_dir
    from .preflight import info_from_pipeline, info_from_source
    from .settings import check_size

    check_output_dir(settings.out)
    cases = read_cases(settings)
    profile = tiny_profile(settings.model)
    pipe = base_pipeline(settings) if profile else None
    info = info_from_pipeline(pipe, as_real=True) if pipe is not None else info_from_source(settings.model)
    if info.architecture in ("flux", "flux2") and settings.negative_prompt is not None:
        raise ConceptrolError("--negative-prompt applies to SD 1.5 / SDXL and Qwen-Image-Edit; leave it out for FLUX")
    check_size(settings.size, info.pixel_multiple)
    references = _read_references(settings, info)
    _locate_concepts(cases, info)
    steps = settings.steps or DEFAULT_STEPS[info.architecture]
    checked = CheckedAnalysis(cases, info.architecture, steps, steps_range(settings.steps_range, steps), pipe,
                              references=references)
    checked.needs_segmenter = any(case.mask is None for case in cases)
    if checked.needs_segmenter:
        _check_segmenter(settings.segmenter)
    from .loading import pick_device

    pick_device(settings.device)
    return checked


def _read_references(settings: AnalyzeSettings, info: Any) -> list[Any]:
    """The --reference images, read and checked as the model's pipeline would; Qwen-Image-Edit needs one (it edits),
    FLUX.2 may take some, and the other models none."""
    from ..core.images import load_reference_image
    from .preflight import check_references

    if settings.reference and info.architecture not in ("flux2", "qwenimage"):
        raise ConceptrolError("--reference applies to FLUX.2 and Qwen-Image-Edit (the images they edit); the block "
                              "analysis of SD and FLUX.1 reads the model alone: leave it out")
    if not settings.reference and info.architecture == "qwenimage":
        raise ConceptrolError("Qwen-Image-Edit edits an image: pass --reference IMAGE (repeat for several), the "
                              "images every case is generated from")
    references = [load_reference_image(path) for path in settings.reference]
    check_references(info, None, references)
    return references


def _locate_concepts(cases: list[Any], info: Any) -> None:
    """Each case's concept is found in its prompt with the model's own tokenizer (CLIP or T5), as the analysis will."""
    from ..core.concepts import resolve_concepts

    for case in cases:
        if info.locate is not None:  # a chat-templated prompt (FLUX.2, Qwen-Image)
            resolve_concepts(info.tokenizer, [case.prompt], [case.concept], 1, locate=info.locate)
        else:
            resolve_concepts(info.tokenizer, [case.prompt], [case.concept], 1, info.max_length)


def _check_segmenter(name: str) -> None:
    """The segmenter's models are in the cache, a local folder or on a reachable hub (one quick request each)."""
    from ..analysis.segment import SEGMENTERS
    from .preflight import ensure_available

    if name not in SEGMENTERS:
        raise ConceptrolError(f"unknown --segmenter {name!r}; choose one of {', '.join(SEGMENTERS)}")
    hint = ("pass --mask FILE (the subject white on black) for every case, or run once where the hub is reachable to "
            "cache the segmenter")
    for repo in SEGMENTERS[name]:
        ensure_available(repo, "config.json", "--segmenter", f"the {name} segmenter's model", hint)


def base_pipeline(settings: AnalyzeSettings) -> Any:
    """The stock pipeline with no adapter: a tiny one (tiny-sd15, tiny-flux), or loaded by preset, hub id or folder."""
    from .loading import load_base_pipeline, pick_device, pick_dtype

    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device, settings.model)
    profile = tiny_profile(settings.model)
    if profile is None:
        return load_base_pipeline(settings.model, device, dtype)
    if profile not in ("sd15", "flux", "flux2-klein", "qwen-edit"):
        raise ConceptrolError(f"--model {settings.model} is a tiny model with an adapter; the block analysis reads the "
                              "stock model: use tiny-sd15, tiny-flux, tiny-flux2 or tiny-qwen-edit")
    from ..tiny import tiny_flux, tiny_sd15_pipeline
    from ..tiny.flux2 import tiny_flux2_klein
    from ..tiny.qwen import tiny_qwen_edit_plus

    pipe = {"sd15": tiny_sd15_pipeline, "flux": tiny_flux, "flux2-klein": tiny_flux2_klein,
            "qwen-edit": tiny_qwen_edit_plus}[profile]()
    return pipe.to(device, dtype)


def run_analysis(settings: AnalyzeSettings, checked: CheckedAnalysis,
                 progress: Callable[[int, int], None] | None = None) -> Any:
    """Load what the checks did not, run every case, save into --out; returns the BlockAnalysis (its files set)."""
    from ..analysis import analyze_blocks, load_segmenter
    from .loading import pick_device

    pipe = checked.pipe if checked.pipe is not None else base_pipeline(settings)
    segmenter = load_segmenter(settings.segmenter, pick_device(settings.device)) if checked.needs_segmenter else None
    kwargs = settings.pipeline_kwargs | {"num_inference_steps": checked.steps}
    if checked.architecture == "qwenimage" and "guidance_scale" in kwargs:  # Qwen-Image-Edit's CFG is true CFG
        kwargs["true_cfg_scale"] = kwargs.pop("guidance_scale")
    if checked.references:
        kwargs["image"] = checked.references
    analysis = analyze_blocks(pipe, cases=checked.cases, steps=checked.ranked, segmenter=segmenter, progress=progress,
                              model=_model_name(settings.model), **kwargs)
    if settings.reference:
        analysis.settings["references"] = [str(Path(path).expanduser().resolve()) for path in settings.reference]
    analysis.save(settings.out)
    return analysis


def _model_name(model: str) -> str:
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def summary_lines(analysis: Any) -> list[str]:
    """What the command prints: the best block, the preset's rank, and how to use the result."""
    means, ranking = analysis.mean_auc, analysis.ranking
    ranked = analysis.ranked_steps()
    lines = [f"best block: {analysis.best} (mean AUC {means[analysis.best]:.4f} over steps {ranked.start}:{ranked.stop}"
             f" of {analysis.num_steps}, {len(analysis.cases)} case(s), {len(ranking)} blocks)"]
    if analysis.preset in means:
        lines.append(f"preset {analysis.preset}: mean AUC {means[analysis.preset]:.4f}, rank "
                     f"{ranking.index(analysis.preset) + 1} of {len(ranking)}")
    folder = analysis.files[0].parent if analysis.files else Path(".")
    json_file = next((p for p in analysis.files if p.name.startswith("analysis") and p.suffix == ".json"), None)
    lines.append(f"use it: --concept-layer {analysis.best}  (or --concept-layer auto:{json_file or folder})")
    return lines
