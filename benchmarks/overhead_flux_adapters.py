"""Time and peak memory of one FLUX transformer evaluation, stock pipeline vs Conceptrol, per reference adapter.

XLabs IP-Adapter, FLUX.1 Kontext and FLUX.1 Redux (ALGORITHM.md section 4) on a transformer of FLUX.1's real
width (24 heads x 128 = 3072, T5 width 4096, pooled 768, 64 latent channels, guidance-distilled like dev) with
random weights; nothing is downloaded. Only `pipe.transformer(...)` is timed, with the keywords the stock
pipeline passes: the text encoders, the image encoders and the VAE are the same for both and would dominate.

Tokens per evaluation (batch 1): 512 T5 tokens and (size / 16)^2 latent tokens, plus
- XLabs: the adapter's 4 (or --ip-tokens 16) image tokens of width 4096, through `encoder_hid_proj`;
- Kontext: a same-size reference, (size / 16)^2 more image tokens with img_ids first coordinate 1;
- Redux: 729 SigLIP tokens appended after the 512 T5 tokens.
Conceptrol runs with global masking at step 1 of 28 with the previous step's mask carried in, so the log Â
(Kontext, Redux) and M (XLabs) terms act in every block, as in every step after the first. By default every
block reads the mask (--read all), which overstates Conceptrol's share: FLUX.1 reads at 3 of its 57 blocks
(--read preset keeps the handle's own reading blocks). Stock runs have the stock processors installed (the
handle is removed); the two alternate, and medians are reported. With --compile the transformer is compiled after
`apply_conceptrol`, the handle stays installed and stock runs open no call (every processor hands over to the
stock one), so each graph compiles once, during the warm-up.

FLUX.1's 12B parameters do not fit a 24 GiB CPU machine, so on CPU pass fewer blocks (the per-block cost
is what the ratio measures); the concept block is then the last double block:

    python benchmarks/overhead_flux_adapters.py --double 1 --single 2 --size 256 --repeats 7 --profile \
        --json benchmarks/results-flux-adapters-cpu.json                                          # CPU
    python benchmarks/overhead_flux_adapters.py --device cuda --dtype bf16 --size 1024 --read preset   # real depth
    python benchmarks/overhead_flux_adapters.py --device cuda --dtype bf16 --size 1024 --read preset --compile
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import FluxKontextPipeline, FluxPipeline, FluxTransformer2DModel
from overhead import PeakMemory, fixed_mmap_threshold

from conceptrol import ConceptrolConfig, apply_conceptrol
from conceptrol.core.config import CONCEPT_LAYERS
from conceptrol.flux.block_processor import AdapterCall, FluxBlockProcessor
from conceptrol.tiny import IMAGE_ENCODER_SIZE, CLIPImageProcessor, flux_components, tiny_redux_prior

ADAPTERS = ("xlabs", "kontext", "redux")
T5_TOKENS, REDUX_TOKENS, CLIP_IMAGE_DIM = 512, 729, 768  # FLUX.1's T5 length; SigLIP 384/14 = 27^2; ViT-L/14
STEPS, GUIDANCE = 28, 3.5  # FLUX.1-dev's defaults
SPAN = slice(3, 5)  # the concept's T5 tokens


@dataclass
class Setup:
    """One adapter's pipeline and the keywords the stock pipeline passes its transformer at one step."""

    pipe: Any
    inputs: Callable[[], dict]  # fresh keywords per call (the transformer pops ip_adapter_image_embeds)
    tokens: dict[str, int]
    prior: Any = None
    num_t5: int | None = None
    teardown: Callable[[], None] = lambda: None


def build_transformer(double: int, single: int, device: str, dtype: torch.dtype) -> FluxTransformer2DModel:
    """FLUX.1-dev's transformer at its real width with `double` + `single` blocks and random weights."""
    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=double, num_single_layers=single, guidance_embeds=True)
    model = model.to(dtype).to_empty(device=device)  # allocated where it runs: 12B fp32 would not fit on CPU
    torch.manual_seed(0)
    for param in model.parameters():  # the values do not affect the cost
        torch.nn.init.normal_(param, std=0.02)
    return model.eval()


def image_ids(side: int, index: int = 0) -> torch.Tensor:
    """[side^2, 3] FLUX image ids (index, row, col); Kontext's reference has index 1."""
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([torch.full_like(rows, index), rows, cols], -1).view(-1, 3).float()


def xlabs_state_dict(transformer: FluxTransformer2DModel, tokens: int) -> dict[str, dict[str, torch.Tensor]]:
    """Random XLabs IP-Adapter weights, already in the {image_proj, ip_adapter} form diffusers' loader converts to."""
    g = torch.Generator().manual_seed(1)
    cross, inner = transformer.config.joint_attention_dim, transformer.inner_dim

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    # tokens * 4096 = 65536 projection rows is how diffusers tells XLabs' 16-token adapter from the 4-token one
    image_proj = {"proj.weight": rand(tokens * cross, CLIP_IMAGE_DIM), "proj.bias": rand(tokens * cross),
                  "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    ip_adapter = {f"{i}.to_{part}_ip.{kind}": rand(inner, cross) if kind == "weight" else rand(inner)
                  for i in range(transformer.config.num_layers) for part in "kv" for kind in ("weight", "bias")}
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def make_setup(adapter: str, model: FluxTransformer2DModel, args: argparse.Namespace, dtype: torch.dtype) -> Setup:
    """The adapter's stock pipeline around `model` (tiny text/image encoders that never run) and its inputs."""
    device, side = args.device, args.size // 16
    components = flux_components(guidance=True) | {"transformer": model}
    pipe_class = FluxKontextPipeline if adapter == "kontext" else FluxPipeline
    pipe = pipe_class(**components)
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype)

    num_text = T5_TOKENS + (REDUX_TOKENS if adapter == "redux" else 0)
    latent_ids = image_ids(side)
    if adapter == "kontext":  # [latent | reference] along the image tokens, as FluxKontextPipeline concatenates
        latent_ids = torch.cat([latent_ids, image_ids(side, index=1)])
    tensors = dict(hidden_states=rand(1, latent_ids.shape[0], model.config.in_channels),
                   encoder_hidden_states=rand(1, num_text, model.config.joint_attention_dim),
                   pooled_projections=rand(1, model.config.pooled_projection_dim),
                   timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
                   guidance=torch.full((1,), GUIDANCE, device=device, dtype=torch.float32),
                   img_ids=latent_ids.to(device, dtype), txt_ids=torch.zeros(num_text, 3, device=device, dtype=dtype))
    tokens = {"t5": T5_TOKENS, "latent": side * side, "reference": 0, "ip_adapter": 0}
    setup = Setup(pipe, lambda: dict(tensors, return_dict=False), tokens)
    if adapter == "kontext":
        tokens["reference"] = side * side
    elif adapter == "redux":
        tokens["reference"] = REDUX_TOKENS
        setup.prior, setup.num_t5 = tiny_redux_prior(text_from=pipe), T5_TOKENS
    else:
        size = IMAGE_ENCODER_SIZE  # set here so that diffusers does not build its torchvision-backed one
        pipe.register_modules(feature_extractor=CLIPImageProcessor(size=size, crop_size=size))
        pipe.load_ip_adapter(xlabs_state_dict(model, args.ip_tokens), weight_name="ip_adapter.safetensors",
                             image_encoder_pretrained_model_name_or_path=None)
        model.to(device, dtype)
        embeds = rand(1, 1, CLIP_IMAGE_DIM)  # CLIP ViT-L/14 embeds, as prepare_ip_adapter_image_embeds shapes them
        setup.inputs = lambda: dict(tensors, return_dict=False,
                                    joint_attention_kwargs={"ip_adapter_image_embeds": [embeds]})
        setup.teardown = pipe.unload_ip_adapter
        tokens["ip_adapter"] = args.ip_tokens
    return setup


class ConceptrolRun:
    """Opens a call as the handle does (AdapterCall on its state; its hook fills the layout).

    Eager, it installs Conceptrol on entry and removes it on exit, so the stock runs between are the stock pipeline.
    Compiled (`handle` given), Conceptrol stays installed and the stock runs have no call open, so every processor
    hands over to the stock one: swapping processors would recompile the transformer at every run.
    """

    def __init__(self, setup: Setup, config: ConceptrolConfig, read_all: bool, step: int, mask: torch.Tensor | None,
                 handle: Any = None):
        self.setup, self.config, self.read_all, self.step, self.mask = setup, config, read_all, step, mask
        self.installed = handle

    def __enter__(self) -> AdapterCall:
        self.handle = self.installed or install(self.setup, self.config, self.read_all)
        call = AdapterCall(spans=[[SPAN]], total_steps=STEPS, num_t5=self.setup.num_t5, step=self.step,
                           mask=self.mask)
        self.handle.state.call = call
        return call

    def __exit__(self, *exc: Any) -> None:
        self.handle.state.call = None
        if self.installed is None:
            self.handle.remove()


def install(setup: Setup, config: ConceptrolConfig, read_all: bool) -> Any:
    handle = apply_conceptrol(setup.pipe, config, redux=setup.prior)
    if read_all:  # every block reads (overstates the cost: FLUX.1 reads at 3 of its 57 blocks)
        for processor in setup.pipe.transformer.attn_processors.values():
            if isinstance(processor, FluxBlockProcessor):
                processor.reads = True
    return handle


def evaluate(setup: Setup, device: str) -> tuple[float, float, int]:
    """Wall and process-CPU seconds and peak memory of one transformer evaluation."""
    inputs = setup.inputs()
    with PeakMemory(device) as memory, torch.no_grad():
        wall, cpu = time.perf_counter(), time.process_time()
        setup.pipe.transformer(**inputs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return wall, cpu, memory.peak


def measure(setup: Setup, config: ConceptrolConfig, args: argparse.Namespace) -> dict:
    """Warm up (the Conceptrol call's first step reads the mask), then alternate stock and Conceptrol evaluations."""
    read_all = args.read == "all"
    handle = install(setup, config, read_all) if args.compile else None
    if args.compile:
        setup.pipe.transformer.compile()  # after apply_conceptrol, as users compile
    evaluate(setup, args.device)
    with ConceptrolRun(setup, config, read_all, step=0, mask=None, handle=handle) as call:
        first = evaluate(setup, args.device)
        mask = call.mask
    runs = {"stock": lambda: evaluate(setup, args.device)}

    def conceptrol() -> tuple[float, float, int]:
        with ConceptrolRun(setup, config, read_all, step=1, mask=mask, handle=handle):  # a later step: the mask carries over
            return evaluate(setup, args.device)

    runs["conceptrol"] = conceptrol
    conceptrol()  # warm-up of the later steps' graph (compiled) or kernels
    raw = {name: {"eval_s": [], "eval_cpu_s": [], "peak_bytes": []} for name in runs}
    for repeat in range(args.repeats):
        for name in (list(runs) if repeat % 2 == 0 else list(reversed(runs))):
            for key, value in zip(raw[name], runs[name]()):
                raw[name][key].append(value)
    result = {name: {"median_eval_s": statistics.median(r["eval_s"]),
                     "median_eval_cpu_s": statistics.median(r["eval_cpu_s"]),
                     "peak_bytes": statistics.median(r["peak_bytes"]), "raw": r} for name, r in raw.items()}
    result["conceptrol"]["first_step_eval_s"] = first[0]  # step 0 (no mask yet), during warm-up: one sample
    ratios = {"time_ratio": "median_eval_s", "cpu_time_ratio": "median_eval_cpu_s", "memory_ratio": "peak_bytes"}
    for key, stat in ratios.items():
        result[key] = result["conceptrol"][stat] / max(result["stock"][stat], 1e-12)
    result["tokens"] = setup.tokens
    if args.profile:
        result["profile"] = profile(setup, config, read_all, mask, args.device, handle)
    if handle is not None:
        handle.remove()
    return result


def profile(setup: Setup, config: ConceptrolConfig, read_all: bool, mask: torch.Tensor, device: str,
            handle: Any = None) -> dict:
    """Self time per operator (ms) of one stock and one Conceptrol evaluation: where the extra time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    tables = {}
    for name in ("stock", "conceptrol"):
        run = ConceptrolRun(setup, config, read_all, 1, mask, handle)
        with run if name == "conceptrol" else contextlib.nullcontext():
            with torch_profile(activities=activities) as prof:
                evaluate(setup, device)
        attribute = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
        events = sorted(prof.key_averages(), key=lambda e: getattr(e, attribute), reverse=True)[:20]
        tables[name] = {e.key: round(getattr(e, attribute) / 1000, 1) for e in events}
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--size", type=int, default=256, help="output (and Kontext reference) side in pixels")
    parser.add_argument("--double", type=int, default=19)
    parser.add_argument("--single", type=int, default=38)
    parser.add_argument("--adapters", nargs="+", default=list(ADAPTERS), choices=ADAPTERS)
    parser.add_argument("--ip-tokens", type=int, default=4, choices=[4, 16], help="XLabs adapter image tokens")
    parser.add_argument("--read", default="all", choices=["all", "preset"],
                        help="all: every block reads the mask (overstates); preset: the handle's reading blocks")
    parser.add_argument("--concept-layer", help="default: FLUX.1's transformer_blocks.18, else the last double block")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer after apply_conceptrol")
    parser.add_argument("--profile", action="store_true", help="add per-operator self times of one evaluation each")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.size % 16:
        parser.error("--size must be a multiple of 16 (the VAE's factor 8, packed 2x2)")
    if not args.device.startswith("cuda"):
        fixed_mmap_threshold()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    model = build_transformer(args.double, args.single, args.device, dtype)
    preset = CONCEPT_LAYERS["flux"]
    layer = args.concept_layer or (preset if args.double > 18 else f"transformer_blocks.{args.double - 1}")
    config = ConceptrolConfig(masking="global", concept_layer=layer)
    result = {}
    for adapter in args.adapters:
        setup = make_setup(adapter, model, args, dtype)
        try:
            result[adapter] = measure(setup, config, args)
        finally:
            setup.teardown()
        summary = {k: v for k, v in result[adapter].items() if k not in ("stock", "conceptrol", "profile")}
        print(adapter, json.dumps(summary), flush=True)
    result["setup"] = vars(args) | {"json": str(args.json), "concept_layer": layer, "torch": torch.__version__,
                                    "threads": torch.get_num_threads(), "guidance_embeds": True,
                                    "width": model.inner_dim, "heads": model.config.num_attention_heads}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
