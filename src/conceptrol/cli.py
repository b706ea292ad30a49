"""`conceptrol generate`, `demo`, `evaluate`, `report` and `ui`: thin front-ends over the library's dataclasses."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # before diffusers/transformers are imported below

from .errors import ConceptrolError
from .generate import NEGATIVE_PROMPT, GenerateSettings


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x768 (WIDTHxHEIGHT), got {text!r}") from None
    return width, height


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conceptrol", description="Conceptrol: personalization adapters that follow the prompt.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate images with Conceptrol (real weights)")
    gen.add_argument("--prompt", required=True, help="the text prompt")
    gen.add_argument("--image", type=Path, action="append", required=True, help="reference image (repeat for several subjects)")
    gen.add_argument("--concept", action="append", required=True, help="the prompt's word for each --image, in order")
    gen.add_argument("--model", default="sd15", help="sd15, sdxl, flux, flux-dev, a hub id or a local folder (default: sd15)")
    gen.add_argument("--adapter", help="IP-Adapter: base, plus, plus-face, full-face (default plus); "
                                       "FLUX: subject, subject-1024 (default subject)")
    gen.add_argument("--adapter-repo", help="hub id or local copy of h94/IP-Adapter (SD) or Yuanshi/OminiControl (FLUX)")
    gen.add_argument("--masking", default="global", choices=["global", "local", "none"], help="none = vanilla IP-Adapter")
    gen.add_argument("--concept-layer", help="layer (SD) or block (FLUX) that reads the mask (default: the preset)")
    gen.add_argument("--scale", type=float, help="adapter scale (default: 1.5 for SD 1.5, 1.0 for SDXL and FLUX)")
    gen.add_argument("--start", type=float, help="fraction of steps before the adapter acts (default: 0.2; FLUX 0)")
    gen.add_argument("--end", type=float, default=1.0, help="fraction of steps after which it stops (default: 1.0)")
    gen.add_argument("--steps", type=int, help="denoising steps (default: 50; FLUX 8)")
    gen.add_argument("--guidance", type=float, help="classifier-free guidance (default: 7.5 for SD 1.5, 6.0 for SDXL)")
    gen.add_argument("--negative-prompt", default=NEGATIVE_PROMPT)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--size", type=_size, help="WIDTHxHEIGHT (default: the model's own)")
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--condition-size", type=int, default=512, help="FLUX: the reference's square size (default: 512)")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    gen.add_argument("--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16")
    gen.add_argument("--out", type=Path, default=Path("outputs"), help="output folder (default: outputs)")
    gen.add_argument("--save-masks", action="store_true", help="also save concept-mask overlays")
    ev = commands.add_parser("evaluate", help="generate and score a benchmark (resumable; shard with accelerate launch)")
    ev.add_argument("--benchmark", type=Path, required=True, help="DreamBench++ folder or .jsonl/.csv manifest")
    ev.add_argument("--method", action="append", help="ip-adapter, ominicontrol, conceptrol (repeatable; default: ip-adapter and conceptrol)")
    ev.add_argument("--scale", type=float, action="append", help="adapter scale (repeatable; default: 1.0)")
    ev.add_argument("--seeds", type=int, nargs="+", default=[0])
    ev.add_argument("--model", default="sd15", help="as for generate, or 'tiny' for an offline random model")
    ev.add_argument("--adapter")
    ev.add_argument("--adapter-repo")
    ev.add_argument("--start", type=float, help="Conceptrol warm-up start (default 0.2; baselines use 0)")
    ev.add_argument("--steps", type=int)
    ev.add_argument("--size", type=_size)
    ev.add_argument("--limit", type=int, help="only the first N cases")
    ev.add_argument("--no-score", action="store_true", help="generation pass only")
    ev.add_argument("--judge-url", help="OpenAI-compatible endpoint for the CP/PF judge, e.g. https://api.openai.com/v1 "
                                        "(key from CONCEPTROL_JUDGE_API_KEY or OPENAI_API_KEY); none = no judge columns")
    ev.add_argument("--judge-model", default="gpt-4o")
    ev.add_argument("--judge-runs", type=int, default=3, help="judgements averaged per image (default: 3)")
    ev.add_argument("--clip-model", default="openai/clip-vit-base-patch32")
    ev.add_argument("--dino-model", default="facebook/dino-vits16")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--dtype", default="auto")
    ev.add_argument("--out", type=Path, required=True)
    rep = commands.add_parser("report", help="print the table of a run and write report.html")
    rep.add_argument("run", type=Path)
    demo = commands.add_parser("demo", help="run offline on a tiny random model and write images and masks")
    demo.add_argument("--out", type=Path, default=Path("conceptrol-demo"))
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--model", default="sd15", choices=["sd15", "flux"], help="tiny SD 1.5 or tiny FLUX (default: sd15)")
    ui = commands.add_parser("ui", help="start the local web UI (vanilla vs Conceptrol side by side)")
    ui.add_argument("--model", action="append", help="a model of the menu: sd15, sdxl, flux, flux-dev, a hub id or a "
                                                     "local folder (repeatable; default: sd15, sdxl and flux)")
    ui.add_argument("--demo", action="store_true", help="offline: tiny random models, nothing downloaded")
    ui.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1, this machine only)")
    ui.add_argument("--port", type=int, help="port (default: the first free one from 7860)")
    ui.add_argument("--max-file-size", default="25mb", help="largest upload accepted (default: 25mb)")
    ui.add_argument("--device", default="auto")
    ui.add_argument("--dtype", default="auto")
    ui.add_argument("--ip-adapter-repo", help="hub id or local copy of h94/IP-Adapter")
    ui.add_argument("--ominicontrol-repo", help="hub id or local copy of Yuanshi/OminiControl")
    return parser


def cmd_ui(args: argparse.Namespace) -> None:
    try:
        from .demo import UIOptions, main as launch_ui
    except ImportError as error:
        raise ConceptrolError(str(error)) from None
    if args.demo and args.model:
        raise ConceptrolError("--demo uses its own tiny models; leave out --model")
    fields = {k: v for k, v in vars(args).items() if k != "command"}
    launch_ui(UIOptions(**fields | {"model": tuple(args.model or UIOptions.model)}))


def cmd_generate(args: argparse.Namespace) -> None:
    from .generate import generate

    fields = {k: v for k, v in vars(args).items() if k != "command"}
    settings = GenerateSettings(**fields | {"image": tuple(args.image), "concept": tuple(args.concept)})
    for path in generate(settings).files:
        print(path)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .eval.benchmark import load_benchmark
    from .eval.runner import generate_pass, jobs, process_device, process_rank, score_pass
    from .generate import prepare_output_dir

    cases = load_benchmark(args.benchmark)[: args.limit]
    all_jobs = jobs(cases, args.method or ["ip-adapter", "conceptrol"], args.scale or [1.0], args.seeds)
    out = prepare_output_dir(args.out)
    rank, world = process_rank()
    device = process_device() if world > 1 and args.device == "auto" else args.device  # one GPU per process
    base = GenerateSettings(prompt="", concept=("",), image=(Path(),), model=args.model, adapter=args.adapter,
                            adapter_repo=args.adapter_repo, start=args.start, steps=args.steps, size=args.size,
                            device=device, dtype=args.dtype, out=out)
    records = list(generate_pass(_evaluation_pipeline(base), all_jobs, out, base, rank, world))
    failed = sum(r["status"] == "error" for r in records)
    scored = 0
    if not args.no_score:
        from .eval.metrics import MetricModels

        from .loading import pick_device

        metrics = MetricModels.load(args.clip_model, args.dino_model, str(pick_device(base.device)))
        scored = len(list(score_pass(metrics, out, rank, world)))
    judged = 0
    if args.judge_url:
        from .eval.judge import JudgeConfig
        from .eval.runner import judge_pass

        judged = len(list(judge_pass(JudgeConfig(args.judge_url, args.judge_model, args.judge_runs), out, rank, world)))
    print(f"rank {rank}/{world}: {len(records)} generated ({failed} failed), {scored} scored, {judged} judged; "
          f"{len(all_jobs)} jobs in all; results in {out}")


def _evaluation_pipeline(base: GenerateSettings):
    if base.model == "tiny":
        from .offline_demo import tiny_pipeline

        return tiny_pipeline("sd15")
    from .generate import pipeline_for

    return pipeline_for(base)


def cmd_report(args: argparse.Namespace) -> None:
    from .eval.report import format_table, summarize, write_html, write_plots

    rows = summarize(args.run)
    print(format_table(rows))
    plots = write_plots(args.run, rows)
    print(f"wrote {write_html(args.run, rows, plots)} and {', '.join(str(p) for p in plots)}")


def cmd_demo(args: argparse.Namespace) -> None:
    from .offline_demo import run_offline_demo

    for path in run_offline_demo(args.out, steps=args.steps, seed=args.seed, model=args.model):
        print(path)


def _quiet_libraries() -> None:
    """Keep the libraries' advisory warnings and retry logs out of the CLI's output (errors still show)."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    for logging_module in (diffusers_logging, hub_logging, transformers_logging):
        logging_module.set_verbosity_error()
    for library in ("diffusers", "transformers", "huggingface_hub"):
        warnings.filterwarnings("ignore", category=UserWarning, module=library)
        warnings.filterwarnings("ignore", category=FutureWarning, module=library)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        {"generate": cmd_generate, "demo": cmd_demo, "evaluate": cmd_evaluate, "report": cmd_report,
         "ui": cmd_ui}[args.command](args)
    except ConceptrolError as error:
        print(f"conceptrol: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("conceptrol: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
