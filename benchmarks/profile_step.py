"""Where Conceptrol's per-step cost goes: torch.profiler over one U-Net evaluation, vanilla vs Conceptrol.

    python benchmarks/profile_step.py --device cuda --dtype fp16
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from overhead import build_pipeline
from torch.profiler import ProfilerActivity, profile

from conceptrol import apply_conceptrol


def ops(prof) -> tuple[Counter, Counter, Counter]:
    counts, cpu, device = Counter(), Counter(), Counter()
    for event in prof.key_averages():
        counts[event.key] += event.count
        cpu[event.key] += event.self_cpu_time_total
        device[event.key] += getattr(event, "self_device_time_total", 0) or getattr(event, "self_cuda_time_total", 0)
    return counts, cpu, device


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="fp16", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--pipeline", action="store_true", help="profile 4 whole pipeline steps instead of one U-Net call")
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    pipe, sizes = build_pipeline(args.tiny, args.device, dtype)
    handle = apply_conceptrol(pipe)
    unet, side = pipe.unet, 16 if args.tiny else 64
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, side, side, generator=g).to(args.device, dtype)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g).to(args.device, dtype)
    image = torch.randn(2, 1, 17 if args.tiny else 257, sizes["clip_dim"], generator=g).to(args.device, dtype)

    def step() -> None:
        unet(latents, 500, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": [image]})
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    results = {}
    if args.pipeline:
        from overhead import call_kwargs

        kwargs = call_kwargs(pipe, sizes, side * 8, 4, args.device, dtype)
        runs = {"vanilla": lambda: pipe(**kwargs), "conceptrol": lambda: handle(concepts=[(2, 4)], **kwargs)}
        for name, run in runs.items():
            run()
            with profile(activities=activities) as prof:
                run()
                torch.cuda.synchronize() if args.device.startswith("cuda") else None
            results[name] = ops(prof)
        report(results)
        return
    with torch.no_grad():
        for name in ("vanilla", "conceptrol"):
            if name == "conceptrol":
                handle.state.begin([[slice(2, 4)]], [["concept"]], total_steps=10)
                step()  # first evaluation: local masks before the concept layer
                handle.state.call.step = 1
            for _ in range(3):
                step()
            with profile(activities=activities) as prof:
                step()
            results[name] = ops(prof)
            if name == "conceptrol":
                handle.state.end()
    report(results)


def report(results: dict) -> None:
    (vc, vt, vd), (cc, ct, cd) = results["vanilla"], results["conceptrol"]
    print(f"total self CPU us: vanilla {sum(vt.values()):.0f}, conceptrol {sum(ct.values()):.0f}")
    print(f"total self device us: vanilla {sum(vd.values()):.0f}, conceptrol {sum(cd.values()):.0f}")
    for key in sorted(set(vd) | set(cd), key=lambda k: -(cd[k] - vd[k]))[:8]:
        print(f"device {key[:60]:60s} {vd[key]:10.0f} {cd[key]:10.0f}")
    print(f"op calls: vanilla {sum(vc.values())}, conceptrol {sum(cc.values())}")
    keys = sorted(set(vc) | set(cc), key=lambda k: -(ct[k] - vt[k]))
    print(f"{'op':50s} {'calls v':>8s} {'calls c':>8s} {'cpu us v':>10s} {'cpu us c':>10s}")
    for key in keys[:20]:
        print(f"{key[:50]:50s} {vc[key]:8d} {cc[key]:8d} {vt[key]:10.0f} {ct[key]:10.0f}")


if __name__ == "__main__":
    main()
