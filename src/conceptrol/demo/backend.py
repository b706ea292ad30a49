"""What the web UI runs: one comparison (vanilla adapter vs Conceptrol) on a lazily loaded model (no gradio)."""

from __future__ import annotations

import gc
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from ..app.generate import PAPER_DEMO, GenerateSettings, run_conceptrol
from ..app.loading import DEFAULT_ADAPTERS, adapter_weights, guess_family, profile_for, resolve_model, resolve_repo
from ..app.settings import MULTI_REFERENCE, ModelSource
from ..core.concepts import Concept
from ..core.errors import ConceptrolError
from ..core.images import load_reference_image

Progress = Callable[[float, str], None]  # (fraction done, what is running)


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the UI's model menu."""

    key: str  # preset name (sd15, sdxl, flux, flux-dev), hub id or local folder; or tiny-sd15 / tiny-flux
    label: str  # what the menu shows
    architecture: str  # sd15, sdxl, flux (OminiControl), flux-ip, flux-kontext or flux-redux: picks the defaults
    size: tuple[int, int]  # default (width, height)
    steps: int | None = None  # None = the paper's demo steps for the architecture
    concept_layer: str | None = None  # None = the architecture's preset layer
    condition_size: int | None = None  # OminiControl: the reference's square (None = 512); Kontext: its longer side
    adapter: str | None = None  # None = the family's default adapter
    adapter_repo: str | None = None  # None = the adapter's own hub repository

    @property
    def tiny(self) -> bool:
        return self.key.startswith("tiny-")

    def defaults(self) -> dict[str, float]:
        """Initial values of the scale, warm-up and steps controls."""
        paper = PAPER_DEMO[self.architecture]
        return dict(scale=paper["scale"], start=paper["start"], steps=self.steps or paper["steps"])


PRESET_CHOICES = {
    "sd15": ModelChoice("sd15", "Stable Diffusion 1.5 + IP-Adapter Plus", "sd15", (512, 512)),
    "sdxl": ModelChoice("sdxl", "SDXL + IP-Adapter Plus (ViT-H)", "sdxl", (1024, 1024)),
    "flux": ModelChoice("flux", "FLUX.1-schnell + OminiControl subject", "flux", (512, 512)),
    "flux-dev": ModelChoice("flux-dev", "FLUX.1-dev + OminiControl subject", "flux", (512, 512), steps=28),
    "flux-kontext": ModelChoice("flux-kontext", "FLUX.1 Kontext [dev]", "flux-kontext", (1024, 1024)),
    "flux2-klein": ModelChoice("flux2-klein", "FLUX.2 [klein] 4B (several references)", "flux2-klein", (1024, 1024)),
    "flux2-dev": ModelChoice("flux2-dev", "FLUX.2 [dev] (several references)", "flux2-dev", (1024, 1024)),
    "qwen-image-edit-plus": ModelChoice("qwen-image-edit-plus", "Qwen-Image-Edit-2509 (several references)",
                                        "qwen-edit", (1024, 1024)),
}
DEMO_CHOICES = (  # offline, random weights: shows the whole path runs, not image quality
    ModelChoice("tiny-sd15", "tiny random SD 1.5 + IP-Adapter Plus (offline demo)", "sd15", (128, 96), steps=10),
    ModelChoice("tiny-flux", "tiny random FLUX + OminiControl LoRA (offline demo)", "flux", (128, 96), steps=8,
                condition_size=32),
    ModelChoice("tiny-flux-ip", "tiny random FLUX.1 + XLabs IP-Adapter (offline demo)", "flux-ip", (128, 96), steps=8),
    ModelChoice("tiny-flux-kontext", "tiny random FLUX.1 Kontext (offline demo)", "flux-kontext", (128, 96), steps=8,
                condition_size=32),
    ModelChoice("tiny-flux-redux", "tiny random FLUX.1 + Redux (offline demo)", "flux-redux", (128, 96), steps=8),
    ModelChoice("tiny-flux2", "tiny random FLUX.2 [klein], several references (offline demo)", "flux2-klein", (96, 64),
                steps=4),
    ModelChoice("tiny-qwen-edit", "tiny random Qwen-Image-Edit-Plus, several references (offline demo)", "qwen-edit",
                (96, 64), steps=4),
)


def model_choice(model: str, adapter: str | None = None) -> ModelChoice:
    """The menu entry for a preset name, a hub id, a local folder or a tiny model, with its adapter (None = default).

    The model and adapter names are checked here, without the hub: a mistake is found when the UI starts.
    """
    tiny = {choice.key: choice for choice in DEMO_CHOICES}
    if model in tiny:
        if adapter is not None:
            raise ConceptrolError(f"--model {model} carries its own random adapter; leave out --adapter")
        return tiny[model]
    resolve_model(model, "--model")
    family = guess_family(model)
    default = DEFAULT_ADAPTERS[family]
    try:
        adapter_weights(family, adapter or default)
    except ConceptrolError as error:
        raise ConceptrolError(f"--adapter {adapter} does not fit --model {model}: {error}") from None
    profile = profile_for(family, adapter)
    base = PRESET_CHOICES.get(model)
    if base is not None and adapter in (None, default):
        return base
    size = {"sd15": (512, 512), "sdxl": (1024, 1024), "flux": (512, 512)}.get(family, (1024, 1024))
    label = (base.label.split(" + ")[0] if base else model) + (f" + {adapter}" if adapter not in (None, default) else "")
    steps = base.steps if base is not None and base.steps is not None else None
    return ModelChoice(model, label, profile, base.size if base else size, steps, adapter=adapter)


def with_adapter_repos(choices: list[ModelChoice], repos: tuple[str, ...]) -> list[ModelChoice]:
    """Each menu entry with the --adapter-repo that holds its adapter (a local copy holds its weight file; a hub id
    is its adapter's own repository); a repository that fits no entry, or two that fit one, is an error."""
    taken: dict[str, str] = {}
    for repo in repos:
        source = resolve_repo(repo, "--adapter-repo")
        fits = [choice.key for choice in choices if not choice.tiny and _holds(source, choice)]
        if not fits:
            wanted = "; ".join(f"{c.key}: {_adapter_file(c)}" for c in choices if not c.tiny)
            raise ConceptrolError(f"--adapter-repo {repo} holds the adapter of no model in the menu ({wanted}); pass "
                                  "the folder `hf download <the adapter's repository> --local-dir DIR` wrote")
        for key in fits:
            if key in taken:
                raise ConceptrolError(f"--adapter-repo {taken[key]} and {repo} both hold the adapter of --model {key}; "
                                      "pass one of them")
            taken[key] = repo
    return [replace(choice, adapter_repo=taken.get(choice.key)) for choice in choices]


def _weights(choice: ModelChoice) -> Any:
    family = guess_family(choice.key)
    return adapter_weights(family, choice.adapter or DEFAULT_ADAPTERS[family])


def _adapter_file(choice: ModelChoice) -> str:
    weights = _weights(choice)
    return str(Path(weights.subfolder) / weights.weight_name) if weights.weight_name else "built into the model"


def _holds(source: str, choice: ModelChoice) -> bool:
    """Whether the repository `source` (a folder or a hub id) is where `choice`'s adapter comes from."""
    weights = _weights(choice)
    if not weights.weight_name:  # Kontext: the reference goes in the model's own sequence
        return False
    folder = Path(source).expanduser()
    if folder.is_dir():
        return (folder / weights.subfolder / weights.weight_name).is_file()
    return source == weights.repo


@dataclass(frozen=True)
class CompareRequest:
    """One click of Generate."""

    model: str  # a ModelChoice key
    prompt: str
    references: tuple[Path, ...]  # uploaded reference image files
    concepts: tuple[Concept | None, ...]  # one per reference; None: it acts everywhere (FLUX.2, Qwen-Image-Edit)
    scale: float
    start: float  # warm-up: fraction of steps before Conceptrol's adapter acts
    steps: int
    seed: int
    size: tuple[int, int]  # (width, height)

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise ConceptrolError("type a prompt first")
        if not self.references:
            raise ConceptrolError("upload a reference image first")
        if len(self.concepts) != len(self.references):
            raise ConceptrolError(f"got {len(self.concepts)} concept(s) for {len(self.references)} reference image(s); "
                                  "pick one concept per reference")
        if self.steps < 1:
            raise ConceptrolError(f"steps must be at least 1, got {self.steps}")


@dataclass
class Comparison:
    """The page's three outputs: vanilla adapter, Conceptrol, and where each concept was found."""

    vanilla: Image.Image
    conceptrol: Image.Image
    overlays: list[tuple[Image.Image, str]]  # (mask over the Conceptrol image, concept label), one per reference
    seconds: float


def compare(pipe: Any, choice: ModelChoice, request: CompareRequest, references: list[Image.Image],
            progress: Progress) -> Comparison:
    """The vanilla adapter (same scale, no mask, no warm-up) and Conceptrol, with the same seed."""
    began = time.perf_counter()
    settings = GenerateSettings(
        prompt=request.prompt, concept=request.concepts, image=request.references, model=choice.key,
        adapter=choice.adapter, adapter_repo=choice.adapter_repo, scale=request.scale, start=request.start, steps=request.steps, seed=request.seed, size=request.size,
        concept_layer=choice.concept_layer, condition_size=choice.condition_size,
    )
    total = 2 * request.steps
    vanilla = run_conceptrol(pipe, replace(settings, masking="none", start=0.0), references,
                             on_step=lambda done, _: progress(done / total, "vanilla adapter"))
    ours = run_conceptrol(pipe, settings, references,
                          on_step=lambda done, steps: progress((steps + done) / total, "Conceptrol"))
    image = ours.images[0]
    overlays = [(ours.masks.overlay(image, sample=0, concept=j), f"mask of '{label}'")
                for j, label in enumerate(ours.masks.concepts[0]) if request.concepts[j] is not None]
    return Comparison(vanilla.images[0], image, overlays, time.perf_counter() - began)


class LocalBackend:
    """The UI's `generate_fn`: loads the chosen model on first use, keeps one loaded, runs one request at a time."""

    def __init__(self, choices: list[ModelChoice] | tuple[ModelChoice, ...], device: str = "auto", dtype: str = "auto",
                 loader: Callable[[ModelChoice], Any] | None = None) -> None:
        self.choices = {choice.key: choice for choice in choices}
        self.device, self.dtype = device, dtype
        self._load = loader or self._load_pipeline
        self._lock = threading.Lock()
        self.loaded: tuple[str, Any] | None = None  # (model key, pipeline)

    def __call__(self, request: CompareRequest, progress: Progress) -> Comparison:
        choice = self._choice(request.model)
        references = [load_reference_image(path) for path in request.references]  # bad files fail before loading
        if choice.architecture.startswith("flux") and choice.architecture not in MULTI_REFERENCE and len(references) != 1:
            raise ConceptrolError(f"the FLUX.1 adapters take one reference image, got {len(references)}; "
                                  "remove the others, or pick an SD, FLUX.2 or Qwen-Image-Edit model")
        if choice.architecture not in MULTI_REFERENCE and None in request.concepts:
            raise ConceptrolError("a reference without a concept (acting everywhere) applies to FLUX.2 and "
                                  "Qwen-Image-Edit; pick the words of this model's reference")
        if all(concept is None for concept in request.concepts):
            raise ConceptrolError("every reference is marked 'no concept': pick the words of at least one, or the "
                                  "stock model is all Conceptrol would run")
        with self._lock:
            pipe = self._pipeline(choice, progress)
            return compare(pipe, choice, request, references, progress)

    def _choice(self, key: str) -> ModelChoice:
        if key not in self.choices:
            raise ConceptrolError(f"unknown model {key!r}; choose one of {', '.join(self.choices)}")
        return self.choices[key]

    def _pipeline(self, choice: ModelChoice, progress: Progress) -> Any:
        if self.loaded is not None and self.loaded[0] == choice.key:
            return self.loaded[1]
        self.loaded = None  # drop the previous model before loading the next: one in memory at a time
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        progress(0.0, f"loading {choice.label}" + ("" if choice.tiny else " (the first time downloads its weights)"))
        pipe = self._load(choice)
        self.loaded = (choice.key, pipe)
        return pipe

    def _load_pipeline(self, choice: ModelChoice) -> Any:
        from ..app.generate import pipeline_for

        source = ModelSource(model=choice.key, adapter=choice.adapter, adapter_repo=choice.adapter_repo,
                             device="cpu" if choice.tiny else self.device, dtype="fp32" if choice.tiny else self.dtype)
        return pipeline_for(source)
