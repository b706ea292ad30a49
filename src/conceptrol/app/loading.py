"""Loading real pipelines and IP-Adapters by preset name or local folder, with errors that say what to do."""

from __future__ import annotations

import difflib
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..core.errors import ConceptrolError
from .settings import TINY_MODELS, check_device_name, check_dtype, tiny_profile

if TYPE_CHECKING:
    import torch

MODEL_PRESETS = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "flux": "black-forest-labs/FLUX.1-schnell",
    "flux-dev": "black-forest-labs/FLUX.1-dev",
    "flux-kontext": "black-forest-labs/FLUX.1-Kontext-dev",
    "flux2-klein": "black-forest-labs/FLUX.2-klein-4B",
    "flux2-dev": "black-forest-labs/FLUX.2-dev",
    "qwen-image-edit-plus": "Qwen/Qwen-Image-Edit-2509",
}
# Pipelines whose references go into the joint sequence (ALGORITHM.md section 6): class name -> family
MULTI_REFERENCE_PIPELINES = {"Flux2KleinPipeline": "flux2-klein", "Flux2KleinKVPipeline": "flux2-klein",
                             "Flux2Pipeline": "flux2-dev", "QwenImageEditPlusPipeline": "qwen-edit",
                             "QwenImageEditPipeline": "qwen-edit"}


@dataclass(frozen=True)
class AdapterWeights:
    """Where one adapter lives (a hub id by default, or a local copy of that repository) and how it loads."""

    subfolder: str
    weight_name: str  # the file inside the repository (Redux: its pipeline's model_index.json)
    image_encoder: str  # the image encoder: a folder of the repo (h94/IP-Adapter) or a hub id (XLabs: CLIP ViT-L)
    repo: str = "h94/IP-Adapter"
    kind: str = "ip-adapter"  # ip-adapter, ominicontrol, xlabs-ip, redux, or kontext / references (in the model)


OMINICONTROL, XLABS, REDUX = "Yuanshi/OminiControl", "XLabs-AI/flux-ip-adapter", "black-forest-labs/FLUX.1-Redux-dev"
# Adapters per model family: sd15, sdxl, flux (FluxPipeline models) and flux-kontext (FluxKontextPipeline models).
ADAPTERS: dict[str, dict[str, AdapterWeights]] = {
    "sd15": {
        "base": AdapterWeights("models", "ip-adapter_sd15.safetensors", "models/image_encoder"),
        "plus": AdapterWeights("models", "ip-adapter-plus_sd15.safetensors", "models/image_encoder"),
        "plus-face": AdapterWeights("models", "ip-adapter-plus-face_sd15.safetensors", "models/image_encoder"),
        "full-face": AdapterWeights("models", "ip-adapter-full-face_sd15.safetensors", "models/image_encoder"),
    },
    "sdxl": {
        "base": AdapterWeights("sdxl_models", "ip-adapter_sdxl.safetensors", "sdxl_models/image_encoder"),
        "plus": AdapterWeights("sdxl_models", "ip-adapter-plus_sdxl_vit-h.safetensors", "models/image_encoder"),
        "plus-face": AdapterWeights("sdxl_models", "ip-adapter-plus-face_sdxl_vit-h.safetensors", "models/image_encoder"),
    },
    "flux": {  # OminiControl's subject LoRAs go through FLUX's VAE; XLabs' IP-Adapter and Redux have encoders
        "subject": AdapterWeights("", "omini/subject_512.safetensors", "", OMINICONTROL, "ominicontrol"),
        "subject-1024": AdapterWeights("", "omini/subject_1024_beta.safetensors", "", OMINICONTROL, "ominicontrol"),
        "xlabs-ip": AdapterWeights("", "ip_adapter.safetensors", "openai/clip-vit-large-patch14", XLABS, "xlabs-ip"),
        "redux": AdapterWeights("", "model_index.json", "", REDUX, "redux"),
    },
    "flux-kontext": {"kontext": AdapterWeights("", "", "", "", "kontext")},  # the reference goes in the sequence
    # FLUX.2 and Qwen-Image-Edit take their references themselves, into the joint sequence
    **{family: {"references": AdapterWeights("", "", "", "", "references")}
       for family in ("flux2-klein", "flux2-dev", "qwen-edit")},
}
DEFAULT_ADAPTERS = {"sd15": "plus", "sdxl": "plus", "flux": "subject", "flux-kontext": "kontext",
                    "flux2-klein": "references", "flux2-dev": "references", "qwen-edit": "references"}
# The adapter each profile runs when none is named (a loaded pipeline's profile says which one it carries).
PROFILE_ADAPTERS = {"sd15": "plus", "sdxl": "plus", "flux": "subject", "flux-ip": "xlabs-ip", "flux-kontext": "kontext",
                    "flux-redux": "redux", "flux2-klein": "references", "flux2-dev": "references",
                    "qwen-edit": "references"}
# What each adapter makes of a FLUX model: the profile that picks the front-ends' defaults (settings.PAPER_DEMO).
FLUX_PROFILES = {"ominicontrol": "flux", "xlabs-ip": "flux-ip", "redux": "flux-redux", "kontext": "flux-kontext"}


def profile_for(family: str, adapter: str | None) -> str:
    """sd15, sdxl, flux (OminiControl), flux-ip, flux-redux, flux-kontext, flux2-klein, flux2-dev or qwen-edit."""
    if family in ("sd15", "sdxl", "flux2-klein", "flux2-dev", "qwen-edit"):
        return family
    return FLUX_PROFILES[adapter_weights(family, adapter or DEFAULT_ADAPTERS[family]).kind]


@dataclass
class ReduxPipelines:
    """A FLUX pipeline and the FluxPriorReduxPipeline that turns the reference into tokens (FLUX.1 Redux)."""

    pipe: Any
    prior: Any

    def to(self, *args: Any, **kwargs: Any) -> ReduxPipelines:
        """Both pipelines to a device (and dtype), as DiffusionPipeline.to takes them."""
        self.pipe.to(*args, **kwargs)
        self.prior.to(*args, **kwargs)
        return self

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        self.pipe.set_progress_bar_config(**kwargs)


def dtype_name(dtype: torch.dtype) -> str:
    """fp32, fp16 or bf16: the --dtype value that names a torch dtype."""
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[str(dtype).removeprefix("torch.")]


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def looks_local(text: str) -> bool:
    """A path rather than a hub id: starts with '.', '/' or '~', uses backslashes, or has more than one '/'."""
    return text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1 or text.endswith("/")


def _inside_a_folder(path: Path) -> bool:
    """`owner/name` that is no folder, but whose `owner` is one here: a mistyped local path, not a hub id."""
    return len(path.parts) > 1 and path.parent.is_dir() and str(path.parent) not in (".", "/")


def resolve_model(model: str, flag: str = "--model") -> str:
    """The hub id or local folder that `model` names; a mistake is found here, without touching the hub."""
    if model in MODEL_PRESETS:
        return MODEL_PRESETS[model]
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ConceptrolError(f"{flag} {model}: {path} is not a diffusers pipeline folder (it has no model_index.json); "
                                  f"pass the folder that `hf download <model> --local-dir DIR` wrote")
        return str(path)
    if looks_local(model) or _inside_a_folder(path):
        raise ConceptrolError(f"{flag} {model}: no such folder")
    if "/" not in model or not HUB_ID.fullmatch(model):
        close = difflib.get_close_matches(model.lower(), [*MODEL_PRESETS, *TINY_MODELS], n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else f"use a preset ({', '.join(MODEL_PRESETS)}), a hub id (owner/name) or a folder"
        raise ConceptrolError(f"{flag} {model!r} is not a preset, a hub id or an existing folder; {hint}")
    return model


def resolve_repo(repo: str, flag: str = "--adapter-repo", example: str = "h94/IP-Adapter") -> str:
    """The hub id or local folder of a repository (an adapter's, a scoring model's), checked without the hub."""
    path = Path(repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConceptrolError(f"{flag} {repo}: {path} is a file; pass the folder holding the repository")
        return str(path)
    if _inside_a_folder(path):
        raise ConceptrolError(f"{flag} {repo}: no such folder in {path.parent}")
    if looks_local(repo) or "/" not in repo or not HUB_ID.fullmatch(repo):
        raise ConceptrolError(f"{flag} {repo}: no such folder (hub ids look like owner/name, e.g. {example})")
    return repo


def pick_device(device: str = "auto") -> torch.device:
    """The torch device `device` names, checked to exist on this machine."""
    import torch

    check_device_name(device)
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    chosen = torch.device(device)
    available = {"cpu": lambda: True, "cuda": torch.cuda.is_available,
                 "mps": lambda: getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
                 "xpu": lambda: hasattr(torch, "xpu") and torch.xpu.is_available()}[chosen.type]
    if not available():
        hint = ("this torch is a CPU-only build or no NVIDIA GPU is visible; install the CUDA build of torch "
                "(see the README) or pass --device cpu") if chosen.type == "cuda" else "pass --device cpu or auto"
        raise ConceptrolError(f"device {device!r} is not available here (torch {torch.__version__}): {hint}")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise ConceptrolError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                              f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return chosen


def pick_dtype(dtype: str, device: torch.device, model: str = "sd15") -> torch.dtype:
    import torch

    check_dtype(dtype)
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        bf16 = guess_architecture(model) in ("flux", "flux2", "qwenimage")  # the DiTs run in bf16
        return torch.bfloat16 if bf16 else torch.float16
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]


def guess_architecture(model: str) -> str:
    """sd15, sdxl, flux, flux2 or qwenimage before loading: from a local folder's model_index.json, else the name."""
    index = Path(model).expanduser() / "model_index.json"
    name = MODEL_PRESETS.get(model, model).lower()
    if index.is_file():
        name = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "").lower()
    if "qwen" in name:
        return "qwenimage"
    if re.search(r"flux\.?2", name):
        return "flux2"
    if "flux" in name:
        return "flux"
    return "sdxl" if "xl" in name else "sd15"


def guess_family(model: str) -> str:
    """guess_architecture, with 'flux-kontext' for Kontext models, 'flux2-klein' / 'flux2-dev' for FLUX.2 and
    'qwen-edit' for Qwen-Image-Edit (from model_index.json or the name)."""
    architecture = guess_architecture(model)
    index = Path(model).expanduser() / "model_index.json"
    name = MODEL_PRESETS.get(model, model).lower()
    if index.is_file():
        name = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "").lower()
    if architecture == "flux2":
        return "flux2-klein" if "klein" in name else "flux2-dev"
    if architecture == "qwenimage":
        return "qwen-edit"
    return "flux-kontext" if architecture == "flux" and "kontext" in name else architecture


def load_pipeline(model: str, adapter: str | None, adapter_repo: str | None, device: torch.device,
                  dtype: torch.dtype, flags: dict[str, str] | None = None) -> Any:
    """A pipeline with its adapter: IP-Adapter (SD 1.5 / SDXL); OminiControl's LoRA, XLabs' IP-Adapter or a Redux
    prior (FLUX.1); Kontext carries its own. Redux comes back as ReduxPipelines (the pipeline and its prior).

    `flags` names the options that set the model and each architecture's adapter repo, for error messages.
    """
    flags = flags or {}
    from diffusers import DiffusionPipeline

    source = resolve_model(model, flags.get("model", "--model"))
    pipe = _fetch("the model", source, flags.get("model", "--model"),
                  lambda: DiffusionPipeline.from_pretrained(source, **dtype_argument(dtype)))
    family = pipeline_family(pipe)
    weights = adapter_weights(family, adapter or DEFAULT_ADAPTERS[family])
    flag = flags.get(pipeline_architecture(pipe), "--adapter-repo")
    repo = resolve_repo(adapter_repo, flag) if adapter_repo else weights.repo
    loaded = _load_adapter(pipe, weights, repo, flag, dtype)
    return loaded.to(device)


def load_base_pipeline(model: str, device: torch.device, dtype: torch.dtype, flag: str = "--model") -> Any:
    """The stock pipeline a preset, hub id or local folder names, with no adapter loaded."""
    from diffusers import DiffusionPipeline

    source = resolve_model(model, flag)
    pipe = _fetch("the model", source, flag, lambda: DiffusionPipeline.from_pretrained(source, **dtype_argument(dtype)))
    return pipe.to(device)


def _load_adapter(pipe: Any, weights: AdapterWeights, repo: str, flag: str, dtype: torch.dtype) -> Any:
    what = f"adapter {weights.weight_name or weights.kind}"
    if weights.kind in ("kontext", "references"):
        return pipe
    if weights.kind == "ominicontrol":
        _fetch(what, repo, flag, lambda: pipe.load_lora_weights(repo, weight_name=weights.weight_name, adapter_name="subject"))
    elif weights.kind == "xlabs-ip":
        encoder = xlabs_image_encoder(repo, weights)
        _fetch(what, repo, flag, lambda: pipe.load_ip_adapter(repo, weight_name=weights.weight_name,
                                                              image_encoder_pretrained_model_name_or_path=encoder,
                                                              image_encoder_dtype=dtype))
    elif weights.kind == "redux":
        from diffusers import FluxPriorReduxPipeline

        prior = _fetch("the Redux prior", repo, flag,
                       lambda: FluxPriorReduxPipeline.from_pretrained(repo, **dtype_argument(dtype)))
        return ReduxPipelines(pipe, prior)
    else:
        _fetch(what, repo, flag, lambda: pipe.load_ip_adapter(repo, subfolder=weights.subfolder,
                                                              weight_name=weights.weight_name,
                                                              image_encoder_folder=weights.image_encoder))
    return pipe


def dtype_argument(dtype: torch.dtype) -> dict[str, Any]:
    """`from_pretrained`'s dtype keyword: `dtype` where diffusers has it (it deprecates `torch_dtype`), else the old one."""
    from diffusers.pipelines import pipeline_utils

    return {"dtype": dtype} if hasattr(pipeline_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def xlabs_image_encoder(repo: str, weights: AdapterWeights) -> str:
    """The CLIP image encoder for XLabs' IP-Adapter: `<local copy>/image_encoder` when there is one, else the hub id."""
    local = Path(repo).expanduser() / "image_encoder"
    return str(local) if (local / "config.json").is_file() else weights.image_encoder


def pipeline_architecture(pipe: Any) -> str:
    """'flux', 'flux2', 'qwenimage', 'sdxl' or 'sd15': the architecture of the family apply_conceptrol would take."""
    from ..apply import family_of

    pipe = getattr(pipe, "pipe", pipe)  # ReduxPipelines
    found = family_of(pipe)
    if found is None:
        raise ConceptrolError(f"{type(pipe).__name__} is not supported; use a Stable Diffusion 1.5, SDXL, FLUX.1, "
                              "FLUX.2 or Qwen-Image-Edit pipeline")
    return found[1].architecture_of(pipe)


def pipeline_family(pipe: Any) -> str:
    """The pipeline's family for ADAPTERS: 'flux-kontext' for a FluxKontextPipeline, the family of a pipeline that
    takes its references itself (FLUX.2, Qwen-Image-Edit), else its architecture."""
    if type(pipe).__name__ in MULTI_REFERENCE_PIPELINES:
        return MULTI_REFERENCE_PIPELINES[type(pipe).__name__]
    architecture = pipeline_architecture(pipe)
    return "flux-kontext" if architecture == "flux" and "Kontext" in type(pipe).__name__ else architecture


def adapter_weights(family: str, adapter: str) -> AdapterWeights:
    choices = ADAPTERS[family]
    if adapter not in choices:
        what = {"flux-kontext": "a FLUX.1 Kontext model (the reference goes in its sequence)"}.get(
            family, f"{family} (the references go in its sequence)" if "references" in choices else family)
        raise ConceptrolError(f"unknown adapter {adapter!r} for {what}; choose one of {', '.join(choices)}")
    return choices[adapter]


def _fetch(what: str, source: str, flag: str, load: Callable[[], Any]) -> Any:
    try:
        return load()
    except OSError as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip('.')
        local = Path(source).expanduser().exists()
        hint = (f"check that {source} holds the files diffusers expects" if local else
                f"if the Hugging Face Hub is unreachable from here, download it where it is "
                f"(`hf download {source} --local-dir DIR`) and pass {flag} DIR")
        raise ConceptrolError(f"could not load {what} from {source!r}: {reason}; {hint}") from None


# adapter -> the tiny model that carries it
TINY_WITH = {"plus": "tiny-sd15", "subject": "tiny-flux", "xlabs-ip": "tiny-flux-ip", "kontext": "tiny-flux-kontext",
             "redux": "tiny-flux-redux", "references": "tiny-flux2"}


def check_tiny_flags(model: str, adapter: str | None, adapter_repo: str | None) -> str:
    """A tiny model's profile; it carries one random adapter, so another --adapter or any --adapter-repo is refused
    (an adapter name no model has gets the real models' message)."""
    profile = tiny_profile(model)
    carried = PROFILE_ADAPTERS[profile]
    if adapter is not None and adapter != carried:
        family = "sd15" if profile == "sd15" else "flux"
        if adapter not in ADAPTERS[family] and adapter not in ("kontext", "references"):
            adapter_weights(family, adapter)
        other = f", or use --model {TINY_WITH[adapter]}" if adapter in TINY_WITH else ""
        raise ConceptrolError(f"--model {model} carries the adapter {carried} only; leave out --adapter {adapter}{other}")
    if adapter_repo is not None:
        raise ConceptrolError(f"--model {model} carries its own random adapter; leave out --adapter-repo")
    return profile


def tiny_pipeline(model: str = "sd15", seed: int = 0):
    """A tiny random pipeline with its adapter, for a tiny model's profile (sd15, flux, flux-ip, ...); Redux as
    ReduxPipelines."""
    from ..tiny import load_tiny_ip_adapter, tiny_ominicontrol, tiny_sd15_pipeline

    if model == "flux":
        return tiny_ominicontrol(seed=seed)
    if model == "flux2-klein":
        from ..tiny.flux2 import tiny_flux2_klein

        return tiny_flux2_klein(seed=seed, distilled=True)
    if model == "qwen-edit":
        from ..tiny.qwen import tiny_qwen_edit_plus

        return tiny_qwen_edit_plus(seed=seed)
    if model.startswith("flux-"):
        return _tiny_flux1(model, seed)
    pipe = tiny_sd15_pipeline(seed=seed)
    with tempfile.TemporaryDirectory(prefix="conceptrol-demo-") as scratch:
        load_tiny_ip_adapter(pipe, "plus", seed=seed, folder=Path(scratch))
    return pipe


def _tiny_flux1(model: str, seed: int):
    from ..tiny import load_tiny_xlabs_ip_adapter, tiny_flux, tiny_kontext, tiny_redux_prior

    if model == "flux-kontext":
        return tiny_kontext(seed=seed)
    pipe = tiny_flux(seed=seed, guidance=True)
    if model == "flux-redux":
        return ReduxPipelines(pipe, tiny_redux_prior(seed=seed))
    with tempfile.TemporaryDirectory(prefix="conceptrol-demo-") as scratch:
        load_tiny_xlabs_ip_adapter(pipe, Path(scratch), seed=seed)
    return pipe
