"""Running the cases of an attention block analysis on a stock pipeline and scoring every block (section 5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..core.callbacks import chain_step_callback
from ..core.config import CONCEPT_LAYERS
from ..core.errors import ConceptrolError
from ..core.recording import MapRecorder
from .auc import cell_counts, map_auc
from .masks import check_subject, read_mask, subject_pixels
from .result import AnalysisCase, BlockAnalysis, CaseResult

Progress = Callable[[int, int], None]  # (steps done, steps in all)


def analyze_blocks(pipe: Any, prompt: str | None = None, concept: Any = None, mask: Any = None, seed: int = 0, *,
                   cases: list[AnalysisCase] | None = None, steps: slice | None = None, segmenter: Any = None,
                   progress: Progress | None = None, model: str | None = None, **pipeline_kwargs: Any) -> BlockAnalysis:
    """Score every block's textual concept map against the subject mask, per denoising step (arXiv 2503.06568, Figs.
    5-6; ALGORITHM.md section 5), on the stock pipeline `pipe` with no adapter acting.

    One case from `prompt`, `concept`, `mask` and `seed`, or several as `cases`. Each image is the stock pipeline's
    own, made with `generator=torch.Generator(device).manual_seed(seed)` and `pipeline_kwargs` (steps, guidance,
    size, ...): recording changes nothing. A case without a mask is segmented from its image by `segmenter` (see
    analysis.segment). `steps` (a slice) restricts the ranking to those steps.
    """
    cases = cases if cases is not None else [AnalysisCase(prompt, concept, mask, seed)]
    if not cases or any(not isinstance(c.prompt, str) or not c.prompt.strip() for c in cases):
        raise ConceptrolError("every case needs a prompt (a non-empty text that names the subject)")
    if any(c.mask is None for c in cases) and segmenter is None:
        raise ConceptrolError("a case without a mask needs a segmenter: pass mask=... (a file of the subject, white "
                              "on black) or segmenter=load_segmenter('owlv2-sam')")
    recorder, architecture = map_recorder(pipe)
    try:
        spans = [_spans(recorder, case, pipeline_kwargs) for case in cases]  # every concept found before any step
        results, maps = _run(pipe, recorder, cases, spans, segmenter, progress, pipeline_kwargs)
    finally:
        recorder.remove()
    layers = list(maps)
    auc = {block: [_aucs(maps[block][i], results[i].subject) for i in range(len(cases))] for block in layers}
    settings = {key: value for key, value in pipeline_kwargs.items() if isinstance(value, (bool, int, float, str))}
    analysis = BlockAnalysis(model or type(pipe).__name__, architecture, layers, results, auc, maps, steps,
                             CONCEPT_LAYERS.get(architecture), settings)
    analysis.ranked_steps()  # a range past the steps run is found here
    if steps is not None and not analysis.ranked_steps():
        raise ConceptrolError(f"the steps range {steps.start}:{steps.stop} holds none of the {analysis.num_steps} steps "
                              f"run; pass a range within 0:{analysis.num_steps}")
    return analysis


def map_recorder(pipe: Any) -> tuple[MapRecorder, str]:
    """The recorder of the family `pipe` belongs to, installed, and the family's architecture (sd15, sdxl, flux,
    flux2 or qwenimage)."""
    from ..apply import family_of

    found = family_of(pipe)
    if found is None:
        raise ConceptrolError(f"{type(pipe).__name__} is not supported by the block analysis; it reads Stable "
                              "Diffusion 1.5 / SDXL U-Nets and the transformers of FLUX.1, FLUX.2 and Qwen-Image-Edit")
    family = found[1]
    return family.map_recorder(pipe), family.architecture_of(pipe)


def _spans(recorder: MapRecorder, case: AnalysisCase, kwargs: dict) -> list[slice]:
    if "max_sequence_length" in kwargs:
        return recorder.spans_for(case.prompt, case.concept, max_sequence_length=kwargs["max_sequence_length"])
    return recorder.spans_for(case.prompt, case.concept)


def _run(pipe: Any, recorder: MapRecorder, cases: list[AnalysisCase], spans: list[list[slice]], segmenter: Any,
         progress: Progress | None, kwargs: dict) -> tuple[list[CaseResult], dict[str, list[Tensor]]]:
    """Each case through the stock pipeline with the recorder listening; the pipeline's own progress bar is off."""
    steps = int(kwargs.get("num_inference_steps") or 50)
    done = [0]

    def on_step_end(step: int) -> None:
        recorder.on_step_end(step)
        done[0] += 1
        if progress is not None:
            progress(done[0], steps * len(cases))

    previous = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    results, maps = [], {}
    try:
        for case, case_spans in zip(cases, spans):
            recorder.begin(case_spans)
            try:
                image = _generate(pipe, case, chain_step_callback(kwargs, on_step_end))
            finally:
                recorded = recorder.end()
            for block, block_maps in recorded.items():
                maps.setdefault(block, []).append(block_maps[:, 0])  # [steps, h, w]: the case's one sample
            results.append(_case_result(case, image, segmenter))
    finally:
        pipe._progress_bar_config = previous
    return results, maps


def _generate(pipe: Any, case: AnalysisCase, kwargs: dict) -> Image.Image:
    device = pipe._execution_device
    generator = torch.Generator(device).manual_seed(case.seed)
    return pipe(prompt=case.prompt, generator=generator, **kwargs).images[0]


def _case_result(case: AnalysisCase, image: Image.Image, segmenter: Any) -> CaseResult:
    """The case's subject mask at its image's size: the user's (a file, an image, an array), else the segmenter's."""
    mask = case.mask
    if mask is None:
        subject = segmenter(image, case.concept_text)
        check_subject(subject, f"the {segmenter.name} mask of {case.concept_text!r}")
        return CaseResult(case, image, subject, segmenter.name)
    if isinstance(mask, (str, Path)):
        return CaseResult(case, image, read_mask(mask, image.size), str(Path(mask).expanduser().resolve()))
    values = np.asarray(mask.convert("L"), dtype=np.float64) / 255.0 if isinstance(mask, Image.Image) else \
        np.asarray(torch.as_tensor(mask).float().cpu().numpy(), dtype=np.float64)
    return CaseResult(case, image, subject_pixels(values, image.size), "given")


def _aucs(block_maps: Tensor, subject: Tensor) -> list[float]:
    """The AUC of one block's map at every step: [steps, h, w] against a subject mask [H, W]."""
    counts = cell_counts(tuple(block_maps.shape[-2:]), subject)
    return [map_auc(step_map, subject, counts) for step_map in block_maps]
