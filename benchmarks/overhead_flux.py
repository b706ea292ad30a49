"""Per-step time and peak memory of Conceptrol vs plain OminiControl on a FLUX transformer of the real width.

Random weights (nothing downloaded) with a random subject LoRA; one transformer evaluation per step with
512 T5 tokens, the latent and the condition tokens. FLUX.1's 12B parameters do not fit a 24 GiB CPU
machine, so on CPU pass fewer blocks (the per-block cost is what the ratio measures):

    python benchmarks/overhead_flux.py --double 2 --single 4 --size 256          # CPU
    python benchmarks/overhead_flux.py --device cuda --dtype bf16 --size 512     # real depth on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from diffusers import FluxTransformer2DModel
from overhead import PeakMemory
from peft import LoraConfig

from conceptrol.flux.ominicontrol.attention import FluxCall
from conceptrol.flux.ominicontrol.transformer import ConditionTokens, OminiControlTransformer, StepInputs

LORA_TARGETS = ["x_embedder", "norm1.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.2",
                "norm.linear", "proj_mlp", "proj_out"]


def build(double: int, single: int, device: str, dtype: torch.dtype) -> FluxTransformer2DModel:
    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=double, num_single_layers=single, guidance_embeds=False)
    model = model.to_empty(device="cpu")
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.02)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=LORA_TARGETS))
    return model.eval().to(device, dtype)


def ids(side: int, shift: int = 0) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols + shift], -1).view(-1, 3).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--size", type=int, default=256, help="output and condition side in pixels")
    parser.add_argument("--double", type=int, default=19)
    parser.add_argument("--single", type=int, default=38)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    model = build(args.double, args.single, args.device, dtype)
    side = args.size // 16
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(args.device, dtype)

    step = StepInputs(text=rand(1, 512, 4096), pooled=rand(1, 768), timestep=torch.full((1,), 0.5).to(args.device),
                      img_ids=ids(side).to(args.device), txt_ids=torch.zeros(512, 3).to(args.device))
    condition = ConditionTokens(tokens=rand(1, side * side, 64), ids=ids(side, side).to(args.device))
    latents = rand(1, side * side, 64)
    mask_blocks = (f"transformer_blocks.{args.double - 1}", f"single_transformer_blocks.{args.single // 2}",
                   f"single_transformer_blocks.{args.single - 1}")
    runner = OminiControlTransformer(model, mask_blocks)
    calls = {"ominicontrol": lambda: FluxCall(spans=None), "conceptrol": lambda: FluxCall(spans=[slice(3, 5)])}
    times = {name: [] for name in calls}
    peaks = {name: [] for name in calls}
    for repeat in range(args.repeats + 1):
        for name in (list(calls) if repeat % 2 == 0 else list(reversed(calls))):
            call = calls[name]()
            with PeakMemory(args.device) as memory:
                start = time.perf_counter()
                runner(latents, step, condition, call, 1.0)  # first evaluation of the call
                runner(latents, step, condition, call, 1.0)  # a later step: the mask carries over
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                elapsed = (time.perf_counter() - start) / 2
            if repeat:  # the first round warms up
                times[name].append(elapsed)
                peaks[name].append(memory.peak)
    result = {name: {"median_step_s": statistics.median(times[name]), "peak_bytes": statistics.median(peaks[name])}
              for name in calls}
    result["time_ratio"] = result["conceptrol"]["median_step_s"] / result["ominicontrol"]["median_step_s"]
    result["memory_ratio"] = result["conceptrol"]["peak_bytes"] / max(result["ominicontrol"]["peak_bytes"], 1)
    result["setup"] = vars(args) | {"torch": torch.__version__}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
