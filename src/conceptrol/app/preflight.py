"""Checks that need a model's configs and tokenizer but not its weights, run before anything heavy loads.

`conceptrol generate`, `evaluate` and the library's `generate()` find a concept missing from the prompt,
an unknown adapter or layer, an option that does not apply to the model, or an unreachable hub here,
in about a second, instead of after minutes of loading a U-Net or a FLUX transformer.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from ..core.concepts import Concept, resolve_concepts
from ..core.config import CONCEPT_LAYERS, normalize_layer_name
from ..core.errors import ConceptrolError
from .loading import (
    DEFAULT_ADAPTERS,
    MULTI_REFERENCE_PIPELINES,
    adapter_weights,
    profile_for,
    resolve_model,
    resolve_repo,
    xlabs_image_encoder,
)
from .settings import MULTI_REFERENCE, PROFILE_NAMES, GenerateSettings, check_resolved_window, check_size

FLUX_MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default T5 length; concept spans must lie inside it


@dataclass(frozen=True)
class ModelInfo:
    """What the checks need to know about a model, read from its configs and tokenizer (or a loaded pipeline)."""

    architecture: str  # sd15, sdxl, flux, flux2 or qwenimage
    tokenizer: Any  # the tokenizer whose positions concept spans count: CLIP (SD), T5 (FLUX.1), the chat model's
    max_length: int  # that text encoder's token limit
    layers: tuple[str, ...] | None = None  # layer (SD) or block (FLUX) names a concept layer may take; None = unknown
    guidance_embeds: bool = False  # FLUX.1-dev takes a guidance value; FLUX.1-schnell does not
    pixel_multiple: int = 8  # output sizes must be multiples of this
    family: str = ""  # for the adapter names: sd15, sdxl, flux or flux-kontext ('' = the architecture)
    loaded_profile: str | None = None  # a loaded pipeline's: what its adapter makes of it (flux-ip, flux-redux, ...)
    locate: Callable[[str, Any], slice] | None = None  # a chat-templated model's: (prompt, concept) -> its span

    @property
    def adapter_family(self) -> str:
        return self.family or self.architecture

    def profile(self, adapter: str | None) -> str:
        """sd15, sdxl, flux (OminiControl), flux-ip, flux-redux or flux-kontext."""
        return self.loaded_profile or profile_for(self.adapter_family, adapter)


def info_from_pipeline(pipe: Any, as_real: bool = False) -> ModelInfo:
    """The ModelInfo of a loaded pipeline (its adapter loaded; Redux as ReduxPipelines). `as_real`: a tiny model,
    checked as the real model it stands for (sizes in multiples of the real VAE's: 8 on SD, 16 on the DiTs; or of the
    tiny model's own where it is coarser, as tiny Qwen-Image's 64x VAE)."""
    info = _info_from_pipeline(pipe)
    real = 16 if info.architecture in ("flux", "flux2", "qwenimage") else 8
    return replace(info, pixel_multiple=max(real, info.pixel_multiple)) if as_real else info


def _info_from_pipeline(pipe: Any) -> ModelInfo:
    from ..unet import detect_architecture

    profile = pipeline_profile(pipe)
    pipe = getattr(pipe, "pipe", pipe)
    transformer = getattr(pipe, "transformer", None)
    if profile in MULTI_REFERENCE:
        return _multi_reference_info(pipe, profile)
    if hasattr(transformer, "single_transformer_blocks"):
        from ..flux.blocks import block_names

        return ModelInfo("flux", pipe.tokenizer_2, FLUX_MAX_SEQUENCE_LENGTH, tuple(block_names(transformer)),
                         bool(transformer.config.get("guidance_embeds")), pipe.vae_scale_factor * 2,
                         "flux-kontext" if profile == "flux-kontext" else "flux", profile)
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise ConceptrolError(f"{type(pipe).__name__} is not supported; use a Stable Diffusion 1.5, SDXL or FLUX pipeline")
    layers = tuple(name.removesuffix(".processor") for name, p in unet.attn_processors.items() if hasattr(p, "to_k_ip"))
    tokenizer = getattr(pipe, "tokenizer", None) or pipe.tokenizer_2
    return ModelInfo(detect_architecture(unet), tokenizer, tokenizer.model_max_length, layers, False, pipe.vae_scale_factor)


def _multi_reference_info(pipe: Any, profile: str) -> ModelInfo:
    """FLUX.2 or Qwen-Image-Edit, loaded: its blocks, and its concepts located in its chat template."""
    transformer = pipe.transformer
    if profile.startswith("flux2"):
        from ..core.blocks import dual_stream_block_names
        from ..flux2.text import locate_concept

        blocks = dual_stream_block_names(transformer)
        locate = lambda prompt, concept: locate_concept(pipe, prompt, concept)  # noqa: E731
        tokenizer = getattr(pipe.tokenizer, "tokenizer", pipe.tokenizer)
        return ModelInfo("flux2", tokenizer, 512, tuple(blocks), True, pipe.vae_scale_factor * 2, profile, profile,
                         locate)
    from ..qwenimage.text import locate_concept as locate_qwen

    blocks = [f"transformer_blocks.{i}" for i in range(len(transformer.transformer_blocks))]
    locate = lambda prompt, concept: locate_qwen(pipe, prompt, concept)  # noqa: E731
    return ModelInfo("qwenimage", pipe.tokenizer, 1024, tuple(blocks), False, pipe.vae_scale_factor * 2, profile,
                     profile, locate)


def pipeline_profile(pipe: Any) -> str:
    """What a loaded pipeline's adapter makes of it: sd15, sdxl, flux (OminiControl), flux-ip, flux-redux, flux-kontext."""
    from .loading import ReduxPipelines, pipeline_architecture, pipeline_family

    if isinstance(pipe, ReduxPipelines):
        return "flux-redux"
    family = pipeline_family(pipe)
    if family != "flux":
        return family  # sd15, sdxl, flux-kontext, or a pipeline that takes its references itself
    processors = pipe.transformer.attn_processors.values()
    return "flux-ip" if any(hasattr(p, "to_k_ip") for p in processors) else pipeline_architecture(pipe)


def info_from_source(model: str, need_layers: bool = False, flag: str = "--model") -> ModelInfo:
    """The ModelInfo of a preset, hub id or local folder, from its model_index.json, configs and tokenizer only."""
    source = resolve_model(model, flag)
    ensure_available(source, "model_index.json", flag, "the model")
    index = _read_json(source, "model_index.json", flag)
    name = str(index.get("_class_name", ""))
    if name in MULTI_REFERENCE_PIPELINES:
        return _multi_reference_source(source, index, name, flag)
    if "Flux" in name:
        config = _read_json(source, "transformer/config.json", flag)
        blocks = tuple(f"transformer_blocks.{i}" for i in range(config.get("num_layers", 19))) + tuple(
            f"single_transformer_blocks.{i}" for i in range(config.get("num_single_layers", 38)))
        tokenizer = _tokenizer(source, index, "tokenizer_2", flag)
        family = "flux-kontext" if "Kontext" in name else "flux"
        return ModelInfo("flux", tokenizer, FLUX_MAX_SEQUENCE_LENGTH, blocks, bool(config.get("guidance_embeds")), 16,
                         family)
    if "unet" not in index:
        raise ConceptrolError(f"{flag} {model}: {name or 'this pipeline'} is not supported; Conceptrol supports "
                              "Stable Diffusion 1.5 and SDXL with an IP-Adapter, and FLUX.1 (with OminiControl, XLabs' "
                              "IP-Adapter or Redux, or FLUX.1 Kontext)")
    config = _read_json(source, "unet/config.json", flag)
    architecture = "sdxl" if config.get("addition_embed_type") == "text_time" else "sd15"
    tokenizer = _tokenizer(source, index, "tokenizer", flag)
    layers = _cross_attention_layers(config) if need_layers else None
    return ModelInfo(architecture, tokenizer, tokenizer.model_max_length, layers)


def _multi_reference_source(source: str, index: dict, name: str, flag: str) -> ModelInfo:
    """FLUX.2 or Qwen-Image-Edit from its configs and tokenizer: blocks, and concepts located in its chat template."""
    family = MULTI_REFERENCE_PIPELINES[name]
    config = _read_json(source, "transformer/config.json", flag)
    tokenizer = _tokenizer(source, index, "tokenizer" if family.startswith("flux2") else "processor", flag)
    if family.startswith("flux2"):
        from ..flux2.text import locate_in_template

        blocks = tuple(f"transformer_blocks.{i}" for i in range(config.get("num_layers", 8))) + tuple(
            f"single_transformer_blocks.{i}" for i in range(config.get("num_single_layers", 48)))
        dev = family == "flux2-dev"
        locate = lambda prompt, concept: locate_in_template(tokenizer, prompt, concept, dev=dev)  # noqa: E731
        return ModelInfo("flux2", getattr(tokenizer, "tokenizer", tokenizer), 512, blocks, True, 16, family, None,
                         locate)
    from ..qwenimage.text import locate_in_template as locate_qwen

    blocks = tuple(f"transformer_blocks.{i}" for i in range(config.get("num_layers", 60)))
    locate = lambda prompt, concept: locate_qwen(tokenizer, prompt, concept, name)  # noqa: E731
    return ModelInfo("qwenimage", getattr(tokenizer, "tokenizer", tokenizer), 1024, blocks, False, 16, family, None,
                     locate)


def check_settings(settings: GenerateSettings, info: ModelInfo, check_adapter: bool = True) -> None:
    """Every check of `settings` against the model that needs no weights; raises ConceptrolError."""
    check_model_options(settings, info, check_adapter)
    check_concepts(settings, info)


def check_model_options(settings: GenerateSettings, info: ModelInfo, check_adapter: bool = True) -> None:
    """The adapter name, the concept layer, the size and the options that only some models take."""
    flux = info.architecture in ("flux", "flux2", "qwenimage")  # transformer blocks, not U-Net layers
    family = info.adapter_family
    if check_adapter:
        adapter_weights(family, settings.adapter or DEFAULT_ADAPTERS[family])
    profile = info.profile(settings.adapter)
    _check_options(settings, profile, info)
    check_resolved_window(settings, profile)
    check_size(settings.size, info.pixel_multiple)
    analysed = settings.concept_layer_architecture
    if analysed is not None and analysed != info.architecture:
        raise ConceptrolError(f"--concept-layer auto: that analysis is of an {analysed} model, this is an "
                              f"{info.architecture} model; analyse this model (`conceptrol analyze --model ...`)")
    if settings.concept_layer is not None and info.layers is not None:
        check_layer(settings.concept_layer, info.layers, flux)


def check_concepts(settings: GenerateSettings, info: ModelInfo) -> None:
    """Each concept is found in the prompt's tokens with the model's own tokenizer (ConceptNotFoundError if not)."""
    if info.locate is not None:  # a chat-templated model: None concepts stay global
        resolve_concepts(info.tokenizer, [settings.prompt], [_concept(c) for c in settings.concept], 1,
                         locate=info.locate, optional=True)
        return
    if any(concept is None for concept in settings.concept):
        raise ConceptrolError("--concept - (a global reference) applies to FLUX.2 and Qwen-Image-Edit; on this model "
                              "every reference needs a word of the prompt")
    resolve_concepts(info.tokenizer, [settings.prompt], [_concept(c) for c in settings.concept], 1, info.max_length)


FLUX_ADAPTER_NAMES = {"flux": "OminiControl", "flux-ip": "XLabs' IP-Adapter", "flux-redux": "FLUX.1 Redux",
                      "flux-kontext": "FLUX.1 Kontext"}


def _check_options(settings: GenerateSettings, profile: str, info: ModelInfo) -> None:
    """Options that do not apply to this model and adapter are refused, not ignored."""
    if profile in ("sd15", "sdxl"):
        if settings.condition_size is not None:
            raise ConceptrolError("--condition-size applies to FLUX with OminiControl or Kontext (the reference's "
                                  "size); leave it out for SD")
        return
    if profile in MULTI_REFERENCE:
        name = PROFILE_NAMES[profile]
        if settings.masking == "local":
            raise ConceptrolError(f"{name} has no local masking; use --masking global (Conceptrol) or none (as is)")
        if settings.condition_size is not None:
            raise ConceptrolError(f"--condition-size sizes OminiControl's and Kontext's reference; {name} sizes its "
                                  "references itself")
        if settings.negative_prompt is not None and profile != "qwen-edit":
            raise ConceptrolError(f"--negative-prompt applies to SD and Qwen-Image-Edit (true CFG); {name} takes none")
        return
    name = FLUX_ADAPTER_NAMES[profile]
    if len(settings.image) != 1:
        raise ConceptrolError(f"{name} (FLUX) takes one reference image, got {len(settings.image)}; pass one --image "
                              "and one --concept, or use an SD model for several subjects")
    if settings.masking == "local" and profile != "flux-ip":
        raise ConceptrolError(f"{name} has no local masking; use --masking global (Conceptrol) or none (the adapter as is)")
    if settings.negative_prompt is not None:
        raise ConceptrolError(f"--negative-prompt applies to SD 1.5 / SDXL; {name} on FLUX takes none here")
    if settings.guidance is not None and not info.guidance_embeds:
        raise ConceptrolError("--guidance applies to guidance-distilled models (SD, FLUX.1-dev, Kontext); this FLUX "
                              "model (e.g. FLUX.1-schnell) ignores it, so leave it out")
    if settings.condition_size is not None and profile not in ("flux", "flux-kontext"):
        raise ConceptrolError(f"--condition-size sizes OminiControl's and Kontext's reference; {name} sizes it itself")


def check_references(info: ModelInfo, adapter: str | None, references: list[Any]) -> None:
    """What the model's pipeline refuses in a reference image, before weights load (FLUX.2: at least 64 pixels a
    side, aspect ratios up to 8:1)."""
    if info.profile(adapter).startswith("flux2"):
        from ..flux2.handle import check_reference

        for number, image in enumerate(references, start=1):
            check_reference(number, image)


def check_layer(layer: str, layers: tuple[str, ...], flux: bool = False) -> None:
    """`layer` must be one of the model's cross-attention layers (SD) or blocks (FLUX), with suggestions."""
    layer = normalize_layer_name(layer)
    if layer in layers:
        return
    close = difflib.get_close_matches(layer, layers, n=3, cutoff=0.6)
    what = "block of this transformer" if flux else "cross-attention layer with an IP-Adapter in this U-Net"
    example = CONCEPT_LAYERS["flux" if flux else "sd15"]
    hint = f"did you mean one of {close}?" if close else f"names look like {example!r}"
    raise ConceptrolError(f"concept layer {layer!r} is not a {what}; {hint}")


def check_adapter_source(family: str, adapter: str | None, adapter_repo: str | None,
                         flag: str = "--adapter-repo") -> None:
    """The adapter's weights (and XLabs' image encoder) are in a local copy, the local cache, or on a reachable hub."""
    weights = adapter_weights(family, adapter or DEFAULT_ADAPTERS[family])
    if weights.kind in ("kontext", "references"):
        return  # built into the model
    repo = resolve_repo(adapter_repo, flag) if adapter_repo else weights.repo
    what = f"adapter {weights.weight_name}" if weights.kind != "redux" else "the Redux prior"
    ensure_available(repo, str(Path(weights.subfolder) / weights.weight_name), flag, what)
    if weights.kind == "xlabs-ip":
        encoder = xlabs_image_encoder(repo, weights)
        if not Path(encoder).is_dir():
            ensure_available(encoder, "config.json", flag, f"XLabs' image encoder {encoder} (or put a copy in "
                             "<--adapter-repo>/image_encoder)")


def ensure_available(repo: str, filename: str, flag: str, what: str, hint: str | None = None) -> None:
    """`filename` is in a local folder, in the Hugging Face cache, or the hub answers for `repo` (one quick request).

    Without this, an unreachable hub costs about a minute of retries inside from_pretrained.
    """
    local = Path(repo).expanduser()
    if local.is_dir():
        if not (local / filename).is_file():
            raise ConceptrolError(f"could not load {what}: {local / filename} does not exist; pass as {flag} a folder "
                                  "laid out as the hub repository is (`hf download REPO --local-dir DIR` makes one)")
        return
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(repo, filename), str):
        return
    download = hint or f"download it where the hub is reachable (`hf download {repo} --local-dir DIR`) and pass {flag} DIR"
    if constants.HF_HUB_OFFLINE:
        raise ConceptrolError(f"could not load {what} from {repo!r}: it is not in the local cache and HF_HUB_OFFLINE "
                              f"is set; {download}")
    try:
        model_info(repo, timeout=15)
    except GatedRepoError:
        raise ConceptrolError(f"{repo!r} is gated: accept its license on huggingface.co, log in with `hf auth login`, "
                              f"and run again; or {download}") from None
    except RepositoryNotFoundError:
        raise ConceptrolError(f"{flag} {repo!r}: no such repository on the Hugging Face Hub; check the name") from None
    except Exception as error:  # connection refused, DNS, timeouts, proxies: all mean "not reachable"
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConceptrolError(f"could not load {what} from {repo!r}: the Hugging Face Hub at {constants.ENDPOINT} "
                              f"is unreachable ({reason}); {download}") from None


def _concept(value: Any) -> Any:
    return value if value is None or isinstance(value, (Concept, slice, tuple)) else str(value)


def _read_json(source: str, filename: str, flag: str) -> dict:
    local = Path(source).expanduser()
    try:
        if local.is_dir():
            path = local / filename
        else:
            from huggingface_hub import hf_hub_download, try_to_load_from_cache

            cached = try_to_load_from_cache(source, filename)
            path = Path(cached if isinstance(cached, str) else hf_hub_download(source, filename))
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConceptrolError(f"{flag} {source}: cannot read {filename} ({error}); pass a complete diffusers "
                              "pipeline folder or hub id") from None


def _tokenizer(source: str, index: dict, component: str, flag: str) -> Any:
    """The tokenizer class model_index.json names for `component`, loaded from its subfolder (no model weights)."""
    import transformers

    entry = index.get(component) or [None, None]
    cls = getattr(transformers, str(entry[1]), None) or transformers.AutoTokenizer
    try:
        try:  # the cache first: no request to the hub when the model is there already
            return cls.from_pretrained(source, subfolder=component, local_files_only=True)
        except OSError:
            return cls.from_pretrained(source, subfolder=component)
    except (OSError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConceptrolError(f"{flag} {source}: cannot load its {component} ({reason})") from None


def _cross_attention_layers(config: dict) -> tuple[str, ...]:
    """The U-Net's cross-attention layer names, from a weightless (meta-device) copy built from its config."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    return tuple(name.removesuffix(".processor") for name in unet.attn_processors if name.endswith("attn2.processor"))
