"""apply_conceptrol(pipe, config) -> handle: the one entry point, choosing a model family from one table.

A family is a folder (`unet/`, `flux/`, ...) whose package gives `recognises(pipe) -> bool` and
`install(pipe, config, **keywords) -> handle`; adding a model family is one folder and one line in FAMILIES.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from .core.config import ConceptrolConfig
from .core.errors import ConceptrolError
from .core.quiet import quiet_imports


@dataclass(frozen=True)
class Family:
    """One model family: its folder under conceptrol/, and the extra keywords of apply_conceptrol it takes."""

    package: str
    keywords: dict[str, str] = field(default_factory=dict)  # keyword -> what it goes with, for the error message


# Tried in order; the first family whose `recognises(pipe)` is true installs Conceptrol on the pipeline.
FAMILIES = (
    Family("flux2"),  # before flux: FLUX.2's transformer has double- and single-stream blocks too
    Family("flux", {"redux": "a FLUX.1 pipeline (FluxPipeline)"}),
    Family("unet"),
    Family("qwenimage"),  # its transformer's class: no family above takes it (none has a unet or single blocks)
)


def apply_conceptrol(pipe: Any, config: ConceptrolConfig | None = None, redux: Any = None) -> Any:
    """Install Conceptrol on a diffusers pipeline with a reference adapter; returns the handle to call it through.

    SD 1.5 / SDXL with an IP-Adapter; FLUX.1 with the OminiControl subject LoRA, with XLabs' IP-Adapter, as a
    FluxKontextPipeline, or with `redux=` a FluxPriorReduxPipeline (then `pipe` is a FluxPipeline with its text
    encoders); FLUX.2 (Flux2Pipeline, Flux2KleinPipeline, Flux2KleinKVPipeline) and Qwen-Image-Edit
    (QwenImageEditPlusPipeline, QwenImageEditPipeline) with several reference images.
    """
    keywords = {name: value for name, value in {"redux": redux}.items() if value is not None}
    found = family_of(pipe)
    if found is not None:
        family, module = found
        _check_keywords(pipe, family, keywords)
        return module.install(pipe, config or ConceptrolConfig(), **keywords)
    raise ConceptrolError(
        f"{type(pipe).__name__} is not supported; Conceptrol supports Stable Diffusion 1.5 and SDXL pipelines "
        "with an IP-Adapter, FLUX.1 pipelines with OminiControl, XLabs' IP-Adapter, Kontext or Redux, FLUX.2 "
        "pipelines and Qwen-Image-Edit pipelines"
    )


def family_of(pipe: Any) -> tuple[Family, ModuleType] | None:
    """The first family of FAMILIES that recognises `pipe`, and its package (imported); None when none does."""
    for family in FAMILIES:
        with quiet_imports():
            module = importlib.import_module(f".{family.package}", __package__)
        if module.recognises(pipe):
            return family, module
    return None


def _check_keywords(pipe: Any, family: Family, keywords: dict[str, Any]) -> None:
    for name in keywords:
        if name not in family.keywords:
            home = next(f.keywords[name] for f in FAMILIES if name in f.keywords)
            raise ConceptrolError(f"{name}= goes with {home}, not {type(pipe).__name__}")
