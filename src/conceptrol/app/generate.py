"""One generation from settings to files: the library function behind `conceptrol generate` and the demo.

torch and diffusers are imported where a pipeline is loaded or run, so the checks before that answer quickly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from ..core.concepts import Concept
from ..core.config import ConceptrolConfig
from ..core.files import free_suffix, safe_name, with_suffix, write_new_text
from ..core.images import load_reference_image
from .outputs import check_output_dir, make_output_dir, write_new_png
from .settings import (
    MULTI_REFERENCE,
    NEGATIVE_PROMPT,
    PAPER_DEMO,
    GenerateSettings,
    ModelSource,
    resolved_values,
    tiny_profile,
)

__all__ = ["NEGATIVE_PROMPT", "PAPER_DEMO", "GenerateResult", "GenerateSettings", "ModelSource", "generate",
           "pipeline_for", "run_conceptrol", "safe_name"]


@dataclass
class GenerateResult:
    images: list[Image.Image]
    masks: Any  # ConceptMasks of the call, or None with masking none
    parameters: dict[str, Any] = field(default_factory=dict)  # every setting the call ran with, defaults filled in
    files: list[Path] = field(default_factory=list)


@dataclass
class Checked:
    """What `check_generation` found: the output folder and the reference images, read and checked."""

    out: Path
    references: list[Image.Image]
    pipe: Any = None  # a tiny offline model, built by the checks (cheap), else None: loaded after them


def check_generation(settings: GenerateSettings, pipe: Any = None) -> Checked:
    """Every check that needs no model weights, in order of cost: the output folder, the reference files, the
    model's configs and tokenizer (the concepts located in the prompt), adapter and layer names, options that do
    not apply, the hub (one quick request), the device."""
    from .preflight import check_adapter_source, check_references, check_settings, info_from_pipeline, info_from_source

    out = check_output_dir(settings.out)
    references = [load_reference_image(path) for path in settings.image]
    if pipe is None and tiny_profile(settings.model):
        pipe = tiny_model(settings)
    if pipe is not None:
        info = info_from_pipeline(pipe, as_real=tiny_profile(settings.model) is not None)
        check_settings(settings, info, check_adapter=False)
        check_references(info, settings.adapter, references)
        return Checked(out, references, pipe)
    info = info_from_source(settings.model, need_layers=settings.concept_layer is not None)
    check_settings(settings, info)
    check_references(info, settings.adapter, references)
    check_adapter_source(info.adapter_family, settings.adapter, settings.adapter_repo)
    from .loading import pick_device

    pick_device(settings.device)
    return Checked(out, references)


def generate(settings: GenerateSettings, pipe: Any = None, checked: Checked | None = None,
             on_step: Callable[[int, int], None] | None = None) -> GenerateResult:
    """Generate with Conceptrol and save images (and mask overlays) into `settings.out`, never over earlier files.

    `check_generation` runs first (pass its result as `checked` if you ran it already), so mistakes are found
    before the pipeline loads; `pipe` is loaded from the settings when not given. `on_step(done, total)` is called
    after every denoising step; a pipeline loaded here then shows no progress bar of its own.
    """
    checked = checked or check_generation(settings, pipe)
    if pipe is None:
        pipe = checked.pipe if checked.pipe is not None else pipeline_for(settings)
        if on_step is not None:
            pipe.set_progress_bar_config(disable=True)
    result = run_conceptrol(pipe, settings, checked.references, on_step)
    result.files = save_result(result, settings, checked.out)
    return result


def pipeline_for(settings: ModelSource | GenerateSettings, flags: dict[str, str] | None = None) -> Any:
    """The pipeline and adapter the settings name, on their device and dtype (`flags`: see load_pipeline)."""
    from .loading import load_pipeline, pick_device, pick_dtype

    if tiny_profile(settings.model):
        return tiny_model(settings)
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device, settings.model)
    return load_pipeline(settings.model, settings.adapter, settings.adapter_repo, device, dtype, flags)


def tiny_model(settings: ModelSource | GenerateSettings) -> Any:
    """The tiny offline model `settings.model` names, on the settings' device and dtype; flags that choose real
    weights are refused (a tiny model carries its own random adapter)."""
    from .loading import check_tiny_flags, pick_device, pick_dtype, tiny_pipeline

    profile = check_tiny_flags(settings.model, settings.adapter, settings.adapter_repo)
    device = pick_device(settings.device)
    return tiny_pipeline(profile).to(device, pick_dtype(settings.dtype, device, settings.model))


def run_conceptrol(pipe: Any, settings: GenerateSettings, references: list[Image.Image],
                   on_step: Callable[[int, int], None] | None = None) -> GenerateResult:
    """Call `pipe` under Conceptrol with the settings, the adapter's defaults filled in; the pipeline is left as found.

    `pipe` is any pipeline `pipeline_for` loads (for Redux, the pipeline and its prior). `on_step(done, total)` is
    called after every denoising step (for progress bars).
    """
    import torch

    from ..apply import apply_conceptrol
    from .preflight import pipeline_profile

    profile = pipeline_profile(pipe)
    values = resolved_values(settings, profile)
    config = ConceptrolConfig(masking=settings.masking, start=values["start"], end=settings.end,
                              concept_layer=settings.concept_layer, scale=values["scale"])
    common = dict(num_inference_steps=values["steps"], num_images_per_prompt=settings.num_images,
                  guidance_scale=values["guidance"], generator=torch.Generator("cpu").manual_seed(settings.seed))
    if on_step is not None:
        common["callback_on_step_end"] = _step_reporter(on_step, values["steps"])
    handle = apply_conceptrol(getattr(pipe, "pipe", pipe), config, redux=getattr(pipe, "prior", None))
    try:
        output = _call(handle, profile, settings, references, values, common)
    finally:
        handle.remove()
    images = list(output.images)
    values |= {"concept_layer": handle.config.concept_layer, "size": f"{images[0].width}x{images[0].height}"}
    return GenerateResult(images=images, masks=handle.masks, parameters=_parameters(settings, values, pipe))


def _call(handle: Any, profile: str, settings: GenerateSettings, references: list[Image.Image],
          values: dict[str, Any], common: dict[str, Any]) -> Any:
    """The handle called with each adapter's keywords for the reference and the size."""
    concepts = list(settings.concept)
    if profile in MULTI_REFERENCE:  # FLUX.2, Qwen-Image-Edit: every reference in the sequence, each its own concept
        width, height = settings.size or (None, None)
        if profile == "qwen-edit":  # true CFG: a negative prompt and its scale; no guidance embedding
            guidance = common.pop("guidance_scale")
            common |= {"true_cfg_scale": guidance, "negative_prompt": values["negative_prompt"]}
        return handle(prompt=settings.prompt, concepts=concepts, image=list(references), width=width, height=height,
                      **common)
    if profile in ("sd15", "sdxl"):
        width, height = settings.size or (None, None)
        return handle(prompt=settings.prompt, concepts=concepts, ip_adapter_image=[references],
                      negative_prompt=values["negative_prompt"], width=width, height=height, **common)
    default = (512, 512) if profile == "flux" else (None, None)  # OminiControl's; the others size as their pipelines do
    width, height = settings.size or default
    common |= {"width": width, "height": height}
    if profile == "flux":
        return handle(settings.prompt, concepts=concepts, image=references[0], condition_size=values["condition_size"],
                      **common)
    if profile == "flux-ip":
        return handle(prompt=settings.prompt, concepts=concepts, ip_adapter_image=references[0], **common)
    reference = references[0]
    if profile == "flux-kontext":
        if settings.size is not None:
            common["max_area"] = width * height  # else Kontext scales the requested size to a megapixel
        if values["condition_size"] is not None:  # the reference at this size instead of Kontext's preferred ones
            reference = fit_longer_side(reference, values["condition_size"], handle.pipe.vae_scale_factor * 2)
            common["_auto_resize"] = False
    return handle(prompt=settings.prompt, concepts=concepts, image=reference, **common)


def fit_longer_side(image: Image.Image, size: int, multiple: int) -> Image.Image:
    """The image resized (bicubic) so its longer side is `size`, the aspect kept, both sides multiples of `multiple`."""
    scale = size / max(image.size)
    width, height = (max(multiple, round(side * scale / multiple) * multiple) for side in image.size)
    return image.resize((width, height), Image.BICUBIC)


def _parameters(settings: GenerateSettings, values: dict[str, Any], pipe: Any) -> dict[str, Any]:
    """What a result file records about how it was made (PNG text chunks and sidecar JSON): enough to make it again."""
    import diffusers

    from .. import __version__

    concepts = [concept.text if isinstance(concept, Concept) else "-" if concept is None else concept
                for concept in settings.concept]
    occurrences = [concept.occurrence if isinstance(concept, Concept) else 0 for concept in settings.concept]
    parameters = {"prompt": settings.prompt, "concepts": [str(c) for c in concepts], "model": _absolute(settings.model),
                  "masking": settings.masking, "end": settings.end, "seed": settings.seed,
                  "num_images": settings.num_images,
                  "references": [str(Path(p).expanduser().resolve()) for p in settings.image],
                  "conceptrol": __version__, "diffusers": diffusers.__version__}
    parameters |= _pipeline_facts(pipe, settings, values["architecture"])
    if any(occurrences):
        parameters["occurrences"] = occurrences
    return parameters | {key: value for key, value in values.items() if value is not None}


def _pipeline_facts(pipe: Any, settings: GenerateSettings, profile: str) -> dict[str, Any]:
    """The adapter and its repository, the dtype and the device the call really ran with (defaults resolved)."""
    from .loading import ADAPTERS, PROFILE_ADAPTERS, dtype_name, pipeline_family

    denoiser = getattr(pipe, "pipe", pipe)
    adapter = settings.adapter or PROFILE_ADAPTERS[profile]
    weights = ADAPTERS[pipeline_family(pipe)].get(adapter)
    repo = _absolute(settings.adapter_repo) if settings.adapter_repo else (weights.repo if weights else None) or None
    if tiny_profile(settings.model):
        repo = None  # a tiny model's adapter is random, from no repository
    return {"adapter": adapter, "adapter_repo": repo, "dtype": dtype_name(denoiser.dtype),
            "device": str(denoiser._execution_device)}


def _absolute(source: str) -> str:
    """A local folder as an absolute path; a preset or hub id as given."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.is_dir() else source


def _step_reporter(on_step: Callable[[int, int], None], total: int) -> Callable[..., dict]:
    """A diffusers `callback_on_step_end` that reports (steps done, total) and changes nothing."""

    def report(pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        on_step(step + 1, total)
        return {}

    return report


def save_result(result: GenerateResult, settings: GenerateSettings, out: Path) -> list[Path]:
    """Write images, mask overlays and a sidecar JSON per image under `out`, never over an existing file.

    A second run into the same folder gets the next free suffix ('-2', '-3', ...) for all its files.
    """
    planned = []  # (file name, image or None for the sidecar, image index)
    for index, _ in enumerate(result.images):
        stem = f"{settings.masking}-seed{settings.seed}-{index}"
        planned += [(f"{stem}.png", "image", index), (f"{stem}.json", "sidecar", index)]
        if settings.save_masks and result.masks is not None:
            planned += [(f"{stem}-mask{j}-{safe_name(str(label))}.png", ("mask", j), index)
                        for j, label in enumerate(result.parameters.get("concepts", settings.concept))
                        if settings.concept[j] is not None]  # a global reference has no mask
    make_output_dir(out)
    suffix = free_suffix(out, [name for name, _, _ in planned])
    files = []
    for name, kind, index in planned:
        path = out / with_suffix(name, suffix)
        if kind == "image":
            files.append(write_new_png(result.images[index], path, result.parameters))
        elif kind == "sidecar":
            siblings = [with_suffix(n, suffix) for n, k, i in planned if i == index and k != "sidecar"]
            record = result.parameters | {"image_index": index, "files": siblings}
            files.append(write_new_text(json.dumps(record, indent=2, sort_keys=True) + "\n", path))
        else:
            overlay = result.masks.overlay(result.images[index], sample=index, concept=kind[1])
            files.append(write_new_png(overlay, path, result.parameters | {"mask_of": result.parameters["concepts"][kind[1]]}))
    return files
