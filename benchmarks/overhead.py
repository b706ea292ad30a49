"""Per-step time and peak memory of Conceptrol vs diffusers' vanilla IP-Adapter on the same pipeline.

The U-Net has the real SD 1.5 (or SDXL) size (random weights, nothing downloaded) with a real-size random
IP-Adapter Plus; 512x512 (SDXL 1024x1024) with classifier-free guidance. Runs of the two methods are
interleaved (alternating which goes first) and the medians are reported as ratios. `--compile` compiles the
U-Net (after `apply_conceptrol`, as users would) and reports the compiled figures, warm-up excluded.

    python benchmarks/overhead.py                       # CPU, fp32
    python benchmarks/overhead.py --device cuda --dtype fp16 [--compile] [--model sdxl]
    python benchmarks/overhead.py --tiny --steps 2 --repeats 1   # smoke run
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file

from conceptrol import apply_conceptrol
from conceptrol.tiny import clip_tokenizer, ip_adapter_state_dict, tiny_sd15_pipeline, tiny_sdxl_pipeline

SD15_UNET = dict(
    sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
    attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
PLUS_SD15 = dict(clip_dim=1280, resampler_width=768, queries=16)  # ip-adapter-plus_sd15 with ViT-H
SDXL_UNET = dict(
    sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, use_linear_projection=True,
)
PLUS_SDXL = dict(clip_dim=1280, resampler_width=1280, queries=16)  # ip-adapter-plus_sdxl_vit-h
POOLED_SDXL = 1280  # CLIP ViT-bigG's projection, which SDXL's time embedding expects


def build_pipeline(tiny: bool, device: str, dtype: torch.dtype, model: str = "sd15") -> tuple[Any, dict]:
    sdxl = model == "sdxl"
    pipe = (tiny_sdxl_pipeline if sdxl else tiny_sd15_pipeline)(tokenizer=clip_tokenizer())
    sizes = dict(clip_dim=32, resampler_width=32, queries=8)
    if not tiny:
        unet = random_unet(SDXL_UNET if sdxl else SD15_UNET)
        vae = AutoencoderKL(block_out_channels=(8,) * 4, norm_num_groups=8, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        # 8x VAE downsampling as in SD (the VAE never runs: output_type="latent"); SDXL's text encoders are
        # not needed either (the embeddings are given), and its time embedding reads the pooled width
        parts = {"unet": unet, "vae": vae} | ({"text_encoder_2": None} if sdxl else {})
        pipe = type(pipe)(**(pipe.components | parts))
        sizes = PLUS_SDXL if sdxl else PLUS_SD15
    with tempfile.TemporaryDirectory() as folder:
        save_file(ip_adapter_state_dict(pipe.unet, "plus", **sizes), f"{folder}/ip.safetensors")
        pipe.load_ip_adapter(folder, subfolder="", weight_name="ip.safetensors", image_encoder_folder=None)
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe, sizes


def random_unet(config: dict) -> UNet2DConditionModel:
    """A U-Net of this config with random weights, made quickly (the values do not affect the cost)."""
    torch.manual_seed(0)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    unet = unet.to_empty(device="cpu")
    for param in unet.parameters():
        torch.nn.init.normal_(param, std=0.02)
    return unet.eval()


def call_kwargs(pipe, sizes: dict, size: int, steps: int, device: str, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    cross = pipe.unet.config.cross_attention_dim
    text = torch.randn(2, 77, cross, generator=g).to(device, dtype)
    image = torch.randn(2, 1, 257 if sizes["clip_dim"] == 1280 else 17, sizes["clip_dim"], generator=g).to(device, dtype)
    kwargs = dict(prompt_embeds=text[1:], negative_prompt_embeds=text[:1], ip_adapter_image_embeds=[image],
                  height=size, width=size, num_inference_steps=steps, guidance_scale=7.5, output_type="latent",
                  generator=torch.Generator().manual_seed(0))
    if pipe.unet.config.addition_embed_type == "text_time":
        width = POOLED_SDXL if pipe.unet.config.projection_class_embeddings_input_dim == 2816 else \
            pipe.text_encoder_2.config.projection_dim
        pooled = torch.randn(2, width, generator=g).to(device, dtype)
        kwargs |= dict(pooled_prompt_embeds=pooled[1:], negative_pooled_prompt_embeds=pooled[:1])
    return kwargs


def fixed_mmap_threshold() -> None:
    """Large CPU buffers straight from mmap: freed memory leaves the resident set, so RSS growth is comparable."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD; a fixed value ends glibc's sliding one
    except (OSError, AttributeError):  # not glibc: RSS growth is only rougher
        pass


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator stats, or sampled resident memory on CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self.top = _rss()
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.top = max(self.top, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.running = False
            self.thread.join()
            self.peak = self.top - self.start


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def timed_run(run, device: str) -> tuple[list[float], list[float], int]:
    """Per-step wall and process-CPU times (seconds) from the step callback, and the call's peak memory.

    CPU time is reported too because wall time on a shared CPU machine is noisy.
    """
    stamps = []

    def now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def on_step_end(pipe, step, timestep, tensors):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(now())
        return {}

    with PeakMemory(device) as memory:
        start = now()
        run(on_step_end)
    pairs = list(zip([start, *stamps[:-1]], stamps))[1:]  # step 0 also holds text/image preparation
    return [b[0] - a[0] for a, b in pairs], [b[1] - a[1] for a, b in pairs], memory.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--size", type=int, help="image side in pixels (default: 512; 32 with --tiny)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="tiny U-Net instead of the real size")
    parser.add_argument("--model", default="sd15", choices=["sd15", "sdxl"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the U-Net after apply_conceptrol")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.size = args.size or (32 if args.tiny else 1024 if args.model == "sdxl" else 512)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    if not args.device.startswith("cuda"):
        fixed_mmap_threshold()
    pipe, sizes = build_pipeline(args.tiny, args.device, dtype, args.model)
    kwargs = call_kwargs(pipe, sizes, args.size, args.steps, args.device, dtype)
    handle = apply_conceptrol(pipe)
    if args.compile:
        pipe.unet.compile()  # in place, after apply_conceptrol: its processors and hook are traced with the U-Net
    methods = {
        "vanilla": lambda cb: pipe(callback_on_step_end=cb, **kwargs),
        "conceptrol": lambda cb: handle(concepts=[(2, 4)], callback_on_step_end=cb, **kwargs),
    }
    for run in methods.values():  # warm-up (and compilation)
        run(lambda *a: {})
        run(lambda *a: {})
    times = {name: [] for name in methods}
    cpu_times = {name: [] for name in methods}
    peaks = {name: [] for name in methods}
    for repeat in range(args.repeats):
        order = list(methods) if repeat % 2 == 0 else list(reversed(methods))
        for name in order:
            step_times, step_cpu, peak = timed_run(methods[name], args.device)
            times[name] += step_times
            cpu_times[name] += step_cpu
            peaks[name].append(peak)
    result = {name: {"median_step_s": statistics.median(times[name]),
                     "median_step_cpu_s": statistics.median(cpu_times[name]),
                     "peak_bytes": statistics.median(peaks[name])} for name in methods}
    result["time_ratio"] = result["conceptrol"]["median_step_s"] / result["vanilla"]["median_step_s"]
    result["cpu_time_ratio"] = result["conceptrol"]["median_step_cpu_s"] / result["vanilla"]["median_step_cpu_s"]
    result["memory_ratio"] = result["conceptrol"]["peak_bytes"] / max(result["vanilla"]["peak_bytes"], 1)
    result["setup"] = dict(device=args.device, dtype=args.dtype, size=args.size, steps=args.steps,
                           repeats=args.repeats, unet=("tiny " if args.tiny else "real size ") + args.model,
                           compiled=args.compile, torch=torch.__version__,
                           threads=torch.get_num_threads())
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
