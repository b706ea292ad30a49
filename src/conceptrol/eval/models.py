"""The models an evaluation runs on, checked without their weights: the generator (tiny or real, its adapter and
concept layer) and the CLIP and DINO scoring models. `settings` is evaluate.EvaluateSettings (not imported: it
imports this module)."""

from __future__ import annotations

from typing import Any

from ..app.settings import GenerateSettings, tiny_profile
from ..core.errors import ConceptrolError

CLIP_ID = "openai/clip-vit-base-patch32"
DINO_ID = "facebook/dino-vits16"


def model_for(settings: Any, base: GenerateSettings) -> tuple[Any, Any]:
    """(a pipeline if it is cheap to build now, else None; the model's ModelInfo), read without loading weights."""
    from ..app.loading import pick_device
    from ..app.preflight import check_adapter_source, info_from_source
    from .runner import BASELINES

    pick_device(base.device)
    if tiny_profile(settings.model):
        pipe, info = tiny_model(settings)
    else:
        pipe, info = None, info_from_source(settings.model, need_layers=settings.concept_layer is not None)
        check_adapter_source(info.adapter_family, settings.adapter, settings.adapter_repo)
    profile = info.profile(settings.adapter)
    wrong = [m for m in settings.method if m != "conceptrol" and m != BASELINES[profile]]
    if wrong:
        raise ConceptrolError(f"--method {wrong[0]} does not apply to this model and adapter ({profile}); its baseline "
                              f"is {BASELINES[profile]}")
    return pipe, info


def tiny_model(settings: Any) -> tuple[Any, Any]:
    """A tiny model's pipeline and ModelInfo, checked as the real model it stands for (app.loading.check_tiny_flags)."""
    from ..app.generate import tiny_model as build
    from ..app.preflight import info_from_pipeline

    pipe = build(settings)
    return pipe, info_from_pipeline(pipe, as_real=True)


def concept_layer(settings: Any, info: Any) -> str | tuple[str, ...] | None:
    """The concept layer to pass: the flag's (every layer of a sweep checked against the model); else None (the preset)
    where the model has the preset's block; a FLUX model without it is refused, naming its last double block."""
    from ..app.preflight import check_layer
    from ..core.config import CONCEPT_LAYERS

    analysed = settings.concept_layer_architecture
    if analysed is not None and analysed != info.architecture:
        raise ConceptrolError(f"--concept-layer auto: that analysis is of an {analysed} model, this is an "
                              f"{info.architecture} model; analyse this model (`conceptrol analyze --model ...`)")
    for layer in settings.layer_sweep if info.layers is not None else ():
        check_layer(layer, info.layers, info.architecture == "flux")
    default = CONCEPT_LAYERS[info.architecture]
    if settings.concept_layer is not None or info.layers is None or default in info.layers:
        return settings.concept_layer
    doubles = sorted((block for block in info.layers if block.startswith("transformer_blocks.")),
                     key=lambda block: int(block.split(".")[1]))
    hint = f", e.g. --concept-layer {doubles[-1]} (its last double block)" if doubles else ""
    raise ConceptrolError(f"the default concept block {default!r} is not a block of this transformer; pass "
                          f"--concept-layer{hint}")


def _scoring_models(settings: Any) -> list[tuple[str, str, str]]:
    """(flag, name, hub id or folder) of the CLIP and DINO scoring models."""
    return [("--clip-model", "CLIP", settings.clip_model or CLIP_ID),
            ("--dino-model", "DINO", settings.dino_model or DINO_ID)]


def check_scoring_models(settings: Any) -> None:
    """CLIP and DINO are in a local folder, the cache or a reachable hub; one line saying what to pass if not."""
    from ..app.loading import resolve_repo
    from ..app.preflight import ensure_available

    try:
        for flag, name, repo in _scoring_models(settings):
            ensure_available(resolve_repo(repo, flag, CLIP_ID), "config.json", flag, f"the {name} scoring model")
    except ConceptrolError as error:
        raise _scoring_error(error) from None


def load_metrics(settings: Any, device: str) -> Any:
    """CLIP and DINO, loaded before any image is generated (checked in check_run); the same one line if they fail."""
    from ..app.loading import pick_device
    from .metrics import MetricModels

    (_, _, clip), (_, _, dino) = _scoring_models(settings)
    try:
        return MetricModels.load(clip, dino, str(pick_device(device)))
    except (ConceptrolError, OSError, ValueError) as error:
        raise _scoring_error(error) from None


def _scoring_error(error: Exception) -> ConceptrolError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ConceptrolError(f"{reason}; or pass --no-score to generate without scoring")
