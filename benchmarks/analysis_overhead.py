"""Time and peak memory of the attention block analysis (`analyze_blocks`: every block's concept map recorded at every
step, then scored) against the plain generation of the same image, for SD 1.5 and FLUX.1 at real width.

SD 1.5: the real U-Net size (random weights), 512x512, CFG, every attn2 recorded. FLUX.1: FLUX.1-dev's transformer at
its real width (3072, 24 heads) with `--double` + `--single` blocks (12B parameters do not fit this CPU machine), 512
T5 tokens, every block recorded. Text encoders and VAEs are small stand-ins of the right output widths (8x VAEs).
Runs alternate between the two and the medians are compared.

    python benchmarks/analysis_overhead.py                      # both, CPU fp32
    python benchmarks/analysis_overhead.py --tiny --repeats 1   # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, FluxPipeline

sys.path.insert(0, str(Path(__file__).parent))
from overhead import SD15_UNET, PeakMemory, fixed_mmap_threshold, random_unet  # noqa: E402
from overhead_flux_adapters import build_transformer  # noqa: E402

from conceptrol import analyze_blocks  # noqa: E402
from conceptrol.tiny import REAL_TEXT_DIMS, clip_tokenizer, flux_components, tiny_flux, tiny_sd15_pipeline  # noqa: E402
from conceptrol.tiny.text import text_encoder  # noqa: E402

PROMPT = "a photo of a dog surfing a wave"


def vae(latent_channels: int, **scaling: float) -> AutoencoderKL:
    """An 8x VAE (4 levels) of few channels: the real latent grid, little decoding cost."""
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8,) * 4, norm_num_groups=8, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         **scaling).eval()


def sd15_pipeline(tiny: bool) -> tuple[object, dict]:
    tokenizer = clip_tokenizer()
    pipe = tiny_sd15_pipeline(tokenizer=tokenizer)
    if not tiny:
        pipe = type(pipe)(**(pipe.components | {"unet": random_unet(SD15_UNET), "vae": vae(4),
                                                 "text_encoder": text_encoder(tokenizer, 1, hidden=768)}))
    size = 32 if tiny else 512
    return pipe, dict(height=size, width=size, guidance_scale=7.5)


def flux_pipeline(tiny: bool, double: int, single: int) -> tuple[object, dict]:
    if tiny:
        return tiny_flux(guidance=True), dict(height=32, width=48, guidance_scale=3.5, max_sequence_length=64)
    components = flux_components(guidance=True, text_dims=REAL_TEXT_DIMS)
    components |= {"transformer": build_transformer(double, single, "cpu", torch.float32), "vae": vae(16, scaling_factor=0.3611, shift_factor=0.1159)}
    return FluxPipeline(**components), dict(height=256, width=256, guidance_scale=3.5, max_sequence_length=512)


def square_mask(height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width))
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 1.0
    return mask


def measure(pipe: object, kwargs: dict, steps: int, repeats: int) -> dict:
    """Seconds and peak memory of the plain call and of the analysis, alternating which goes first."""
    mask = square_mask(kwargs["height"], kwargs["width"])
    pipe.set_progress_bar_config(disable=True)
    runs = {"plain": lambda: pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                                  **kwargs),
            "analysis": lambda: analyze_blocks(pipe, PROMPT, "dog", mask, seed=0, num_inference_steps=steps, **kwargs)}
    times, peaks = {name: [] for name in runs}, {name: [] for name in runs}
    for repeat in range(repeats):
        for name in (list(runs) if repeat % 2 == 0 else list(runs)[::-1]):
            with torch.no_grad(), PeakMemory("cpu") as memory:
                began = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - began)
            peaks[name].append(memory.peak)
    seconds = {name: statistics.median(values) for name, values in times.items()}
    memory = {name: statistics.median(values) for name, values in peaks.items()}
    return {"seconds": seconds, "peak_bytes": memory, "time_ratio": seconds["analysis"] / seconds["plain"],
            "memory_ratio": memory["analysis"] / memory["plain"], "repeats": repeats, "steps": steps,
            "size": f"{kwargs['width']}x{kwargs['height']}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["sd15", "flux", "both"], default="both")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--double", type=int, default=1, help="FLUX double-stream blocks (FLUX.1 has 19)")
    parser.add_argument("--single", type=int, default=2, help="FLUX single-stream blocks (FLUX.1 has 38)")
    parser.add_argument("--tiny", action="store_true", help="tiny models: a smoke run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    fixed_mmap_threshold()
    torch.set_num_threads(torch.get_num_threads())
    results = {}
    for model in (("sd15", "flux") if args.model == "both" else (args.model,)):
        pipe, kwargs = sd15_pipeline(args.tiny) if model == "sd15" else flux_pipeline(args.tiny, args.double, args.single)
        results[model] = measure(pipe, kwargs, args.steps, args.repeats)
        r = results[model]
        print(f"{model}: plain {r['seconds']['plain']:.2f} s, analysis {r['seconds']['analysis']:.2f} s per call "
              f"({r['steps']} steps, {r['size']}): time {r['time_ratio']:.3f}x, peak memory {r['memory_ratio']:.3f}x "
              f"({r['peak_bytes']['plain'] / 2**20:.0f} vs {r['peak_bytes']['analysis'] / 2**20:.0f} MiB)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
