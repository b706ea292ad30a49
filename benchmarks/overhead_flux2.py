"""Time and peak memory of one FLUX.2 transformer evaluation with two references, stock vs Conceptrol.

A transformer of FLUX.2's real width (diffusers' Flux2Transformer2DModel defaults: 48 heads x 128 = 6144, text width
15360, 128 latent channels, guidance-distilled as [dev]) with random weights; nothing is downloaded. Only
`pipe.transformer(...)` is timed, with the keywords Flux2Pipeline passes at one step: the text encoder and the VAE are
the same for both and would dominate. Tokens per evaluation (batch 1): 512 text tokens, (size / 16)^2 latent tokens
and two references of the same size (time coordinates 10 and 20), each with its own concept.

Conceptrol runs with global masking at step 1 with the previous step's masks carried in, so the log Â terms act in
every block, as in every step after the first; the concept block reads both references' masks. Stock runs have the
stock processors installed (the handle removed); the two alternate, and medians are reported.

FLUX.2 [dev]'s 32B parameters do not fit a 24 GiB CPU machine, so on CPU pass fewer blocks (the per-block cost is what
the ratio measures); the concept block is the last double block:

    python benchmarks/overhead_flux2.py --double 1 --single 2 --size 256 --repeats 5 \
        --json benchmarks/results-flux2-cpu.json                                     # CPU
    python benchmarks/overhead_flux2.py --device cuda --dtype bf16 --size 1024       # real depth (8 + 48 blocks)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
from overhead import PeakMemory, fixed_mmap_threshold

from conceptrol import ConceptrolConfig, apply_conceptrol
from conceptrol.core.joint import ReferenceCall
from conceptrol.tiny.flux2 import MISTRAL_SPECIAL_TOKENS, MISTRAL_TEMPLATE, flux2_vae, mistral3_encoder
from conceptrol.tiny.text import chat_tokenizer

TEXT_TOKENS, STEPS, GUIDANCE = 512, 50, 4.0  # Flux2Pipeline's defaults
SPANS = [[slice(200, 202), slice(205, 206)]]  # each reference's concept among the text keys


def build_transformer(double: int, single: int, device: str, dtype: torch.dtype) -> Flux2Transformer2DModel:
    """FLUX.2's transformer at its real width with `double` + `single` blocks and random weights."""
    with torch.device("meta"):
        model = Flux2Transformer2DModel(num_layers=double, num_single_layers=single)
    model = model.to(dtype).to_empty(device=device)  # allocated where it runs
    torch.manual_seed(0)
    for param in model.parameters():  # the values do not affect the cost
        torch.nn.init.normal_(param, std=0.02)
    return model.eval()


def image_ids(side: int, time_coordinate: int) -> torch.Tensor:
    """[side^2, 4] FLUX.2 position ids (t, h, w, l)."""
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([torch.full_like(rows, time_coordinate), rows, cols, torch.zeros_like(rows)], -1).view(-1, 4)


def make_pipe(model: Flux2Transformer2DModel) -> Flux2Pipeline:
    """Flux2Pipeline around `model`; its tiny text encoder and VAE never run here."""
    tokenizer = chat_tokenizer(MISTRAL_TEMPLATE, special_tokens=MISTRAL_SPECIAL_TOKENS, bos="<s>", eos="</s>", pad="<pad>")
    return Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=flux2_vae(), tokenizer=tokenizer,
                         text_encoder=mistral3_encoder(len(tokenizer)), transformer=model)


def inputs(model: Flux2Transformer2DModel, side: int, device: str, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([image_ids(side, 0), image_ids(side, 10), image_ids(side, 20)])  # latent, reference 1, reference 2
    text_ids = torch.zeros(TEXT_TOKENS, 4, dtype=torch.long)
    text_ids[:, 3] = torch.arange(TEXT_TOKENS)
    return dict(hidden_states=torch.randn(1, ids.shape[0], model.config.in_channels, generator=g).to(device, dtype),
                encoder_hidden_states=torch.randn(1, TEXT_TOKENS, model.config.joint_attention_dim,
                                                  generator=g).to(device, dtype),
                timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
                guidance=torch.full((1,), GUIDANCE, device=device, dtype=torch.float32),
                img_ids=ids.to(device), txt_ids=text_ids.to(device), return_dict=False)


def evaluate(pipe: Any, kwargs: dict, device: str) -> tuple[float, int]:
    with PeakMemory(device) as memory, torch.no_grad():
        wall = time.perf_counter()
        pipe.transformer(**kwargs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        wall = time.perf_counter() - wall
    return wall, memory.peak


def arguments(doc: str, depth: dict[str, int]) -> tuple[argparse.Namespace, torch.dtype]:
    """The options both reference benchmarks take (`depth`: their block counts and defaults), and the dtype; the
    CPU's allocator fixed so that resident memory is comparable between runs."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--size", type=int, default=256, help="output and reference side in pixels")
    for name, default in depth.items():
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not args.device.startswith("cuda"):
        fixed_mmap_threshold()
    return args, {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]


def main() -> None:
    args, dtype = arguments(__doc__, {"double": 8, "single": 48})
    model = build_transformer(args.double, args.single, args.device, dtype)
    pipe = make_pipe(model)
    kwargs = inputs(model, args.size // 16, args.device, dtype)
    config = ConceptrolConfig(concept_layer=f"transformer_blocks.{args.double - 1}")
    result = measure(pipe, config, kwargs, SPANS, STEPS, args.device, args.repeats)
    side = args.size // 16
    result["tokens"] = {"text": TEXT_TOKENS, "latent": side * side, "references": [side * side, side * side]}
    report(result, args, model.inner_dim, config.concept_layer)


def measure(pipe: Any, config: ConceptrolConfig, kwargs: dict, spans: list, steps: int, device: str,
            repeats: int) -> dict:
    """Stock and Conceptrol transformer evaluations alternated `repeats` times: medians, raw values and ratios.
    Conceptrol runs at step 1 with step 0's masks carried in (the log Â terms act in every block)."""

    def conceptrol(masks: torch.Tensor | None) -> tuple[tuple[float, int], torch.Tensor]:
        handle = apply_conceptrol(pipe, config)
        handle.state.call = ReferenceCall(spans=spans, total_steps=steps, step=1 if masks is not None else 0)
        handle.state.call.masks = masks
        try:
            result = evaluate(pipe, kwargs, device)
            return result, handle.state.call.masks
        finally:
            handle.state.call = None
            handle.remove()

    evaluate(pipe, kwargs, device)  # warm-up
    _, masks = conceptrol(None)  # step 0: reads the masks
    if masks is None or masks.shape[1] != len(spans[0]):
        raise RuntimeError("the concept block read no masks: Conceptrol did not act, the comparison would be void")
    runs = {"stock": lambda: evaluate(pipe, kwargs, device), "conceptrol": lambda: conceptrol(masks)[0]}
    raw = {name: {"eval_s": [], "peak_bytes": []} for name in runs}
    for repeat in range(repeats):
        for name in (list(runs) if repeat % 2 == 0 else list(reversed(runs))):
            seconds, peak = runs[name]()
            raw[name]["eval_s"].append(seconds)
            raw[name]["peak_bytes"].append(peak)
    result = {name: {"median_eval_s": statistics.median(r["eval_s"]), "peak_bytes": statistics.median(r["peak_bytes"]),
                     "raw": r} for name, r in raw.items()}
    result["time_ratio"] = result["conceptrol"]["median_eval_s"] / result["stock"]["median_eval_s"]
    result["memory_ratio"] = result["conceptrol"]["peak_bytes"] / result["stock"]["peak_bytes"]
    return result


def report(result: dict, args: argparse.Namespace, width: int, concept_layer: str) -> None:
    """The ratios and setup on stdout; everything into --json when given."""
    result["setup"] = vars(args) | {"json": str(args.json), "torch": torch.__version__, "width": width,
                                    "threads": torch.get_num_threads(), "concept_layer": concept_layer}
    print(json.dumps({k: v for k, v in result.items() if k not in ("stock", "conceptrol")}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
