"""`conceptrol generate`, `demo`, `evaluate`, `report`, `ui` and `comfyui install`: thin front-ends over the library's dataclasses.

Nothing heavy is imported at module level: `--help` and argument mistakes answer at once, and each
command imports torch, diffusers or gradio only when it needs them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import NoReturn

from .app.settings import NEGATIVE_PROMPT, TINY_MODELS
from .core.errors import ConceptrolError, ConceptrolWarning


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a mistake is one line (`conceptrol: error: ...`) with exit status 2, like every other error."""

    def error(self, message: str) -> NoReturn:
        print(f"conceptrol: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 512x768 (WIDTHxHEIGHT), got {text!r}") from None
    return width, height


DEMO_SHORT_NAMES = tuple(name.removeprefix("tiny-") for name in TINY_MODELS)  # `demo --model sd15` and the like
MODEL_HELP = ("sd15, sdxl, flux, flux-dev, flux-kontext, flux2-klein, flux2-dev, qwen-image-edit-plus, a hub id, a local "
              f"folder, or an offline tiny model with random weights ({', '.join(TINY_MODELS)}) (default: sd15)")
ADAPTER_HELP = ("SD: base, plus, plus-face, full-face (default plus); FLUX.1: subject, subject-1024 (OminiControl, the "
                "default), xlabs-ip, redux; Kontext: kontext (the default); FLUX.2 and Qwen-Image-Edit take their "
                "references themselves (references, the default)")
ADAPTER_REPO_HELP = ("hub id or local copy of the adapter's repository: h94/IP-Adapter, Yuanshi/OminiControl, "
                     "XLabs-AI/flux-ip-adapter, black-forest-labs/FLUX.1-Redux-dev")
DEVICE_HELP = "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps (default: auto)"
DTYPE_HELP = "auto (fp16 on GPU, bf16 for FLUX, fp32 on CPU), fp32, fp16, bf16 (default: auto)"
MASKING_HELP = ("global (the paper's), local (every layer its own mask), or none: the adapter as is (vanilla "
                "IP-Adapter, plain OminiControl, the stock XLabs IP-Adapter, Kontext or Redux)")


def _generation_flags(parser: argparse.ArgumentParser, sweep: bool = False) -> None:
    """Flags `generate` and `evaluate` share (same names as GenerateSettings' fields)."""
    parser.add_argument("--model", default="sd15", help=MODEL_HELP)
    parser.add_argument("--adapter", help=ADAPTER_HELP)
    parser.add_argument("--adapter-repo", help=ADAPTER_REPO_HELP)
    parser.add_argument("--concept-layer", action="append" if sweep else "store", help="layer (SD) or block (FLUX) "
                        "that reads the mask, or auto:DIR for the best block of `conceptrol analyze --out DIR` "
                        "(default: the preset)" + ("; repeat it for a sweep: Conceptrol runs at each layer" if sweep else ""))
    parser.add_argument("--start", type=float, help="fraction of steps before Conceptrol's adapter acts "
                                                    "(default: 0.2; FLUX 0); baselines always start at 0")
    parser.add_argument("--end", type=float, default=1.0, help="fraction of steps after which it stops (default: 1.0)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: 50; FLUX.1 8 to 28; FLUX.2 [klein] 4, "
                                                  "[dev] 50; Qwen-Image-Edit 40)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance (default: 7.5 for SD 1.5, 6.0 for "
                                                       "SDXL; FLUX.1-dev 3.5; not for FLUX.1-schnell; FLUX.2 [dev] 4; "
                                                       "Qwen-Image-Edit's true CFG 4)")
    parser.add_argument("--negative-prompt", help=f"SD (default: the paper's, {NEGATIVE_PROMPT!r}) and Qwen-Image-Edit "
                                                  "(default: ' ')")
    parser.add_argument("--size", type=_size, help="WIDTHxHEIGHT (default: the model's own)")
    parser.add_argument("--condition-size", type=int, help="OminiControl: the reference's square size (default: 512); "
                                                           "Kontext: its longer side (default: Kontext's own ~1 MP)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--dtype", default="auto", help=DTYPE_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="conceptrol", description="Conceptrol: personalization adapters that follow the prompt.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    gen = commands.add_parser("generate", help="generate images with Conceptrol (real weights)")
    gen.add_argument("--prompt", required=True, help="the text prompt")
    gen.add_argument("--image", "--reference", dest="image", type=Path, action="append", required=True,
                     help="reference image (repeat for several subjects)")
    gen.add_argument("--concept", action="append", required=True, help="the prompt's word or phrase for each --image, "
                     "in order; WORD@N picks its N-th occurrence (dog@2: the second 'dog'); '-' keeps that reference "
                     "global (a background or style; FLUX.2 and Qwen-Image-Edit)")
    _generation_flags(gen)
    gen.add_argument("--masking", default="global", choices=["global", "local", "none"], help=MASKING_HELP)
    gen.add_argument("--scale", type=float, help="adapter scale (default: 1.5 for SD 1.5, 1.0 for SDXL and FLUX)")
    gen.add_argument("--seed", type=int, default=0, help="random seed of the first image (default: 0)")
    gen.add_argument("--num-images", type=int, default=1, help="images per prompt, from one seeded generator (default: 1)")
    gen.add_argument("--out", type=Path, default=Path("outputs"), help="output folder (default: outputs); "
                                                                       "earlier files are never overwritten")
    gen.add_argument("--save-masks", action="store_true", help="also save concept-mask overlays")
    ev = commands.add_parser("evaluate", help="generate and score a benchmark (resumable; shard with accelerate launch)")
    ev.add_argument("--benchmark", type=Path, required=True, help="a DreamBench++ release folder, a DreamBench "
                    "(DreamBooth) folder, or a .jsonl/.csv manifest (image, prompt, concept)")
    ev.add_argument("--method", nargs="+", action="extend", help="a baseline (ip-adapter, ominicontrol, xlabs-ip, "
                    "kontext, redux: the model's adapter as is) or conceptrol; several values or repeated (default: "
                    "the model's baseline and conceptrol)")
    ev.add_argument("--scale", type=float, nargs="+", action="extend", help="adapter scale(s); several values or "
                    "repeated (default: the protocol's per-method scale, else 1.0)")
    ev.add_argument("--seed", "--seeds", dest="seeds", type=int, nargs="+", action="extend",
                    help="random seed(s), one image per case and seed; several values or repeated (default: 0)")
    _generation_flags(ev, sweep=True)
    ev.set_defaults(model="sd15")
    ev.add_argument("--limit", type=int, help="only the first N cases")
    ev.add_argument("--no-score", action="store_true", help="generation pass only")
    ev.add_argument("--clip-model", help="CLIP for CLIP-T/CLIP-I: hub id or local folder (default: openai/clip-vit-base-patch32)")
    ev.add_argument("--dino-model", help="DINO for the DINO score: hub id or local folder (default: facebook/dino-vits16)")
    ev.add_argument("--judge-url", help="OpenAI-compatible endpoint for the CP/PF judge, e.g. https://api.openai.com/v1 "
                                        "(key from CONCEPTROL_JUDGE_API_KEY or OPENAI_API_KEY); none = no judge columns")
    ev.add_argument("--judge-model", help="the judge's model (default: gpt-4o)")
    ev.add_argument("--judge-runs", type=int, help="judgements averaged per image (default: 3)")
    ev.add_argument("--judge-max-tokens", type=int, help="the judge's answer length limit (default: the endpoint's)")
    ev.add_argument("--protocol", choices=["dreambench-plus"], help="dreambench-plus: the paper's Table 1 settings "
                    "per method and DreamBench++'s own judge templates; --benchmark is then a DreamBench++ clone")
    ev.add_argument("--yes", action="store_true", help="start a judged run without asking (its cost is printed)")
    ev.add_argument("--dry-run", action="store_true", help="check everything and list what would run; generate nothing")
    ev.add_argument("--out", type=Path, required=True, help="the run folder (resumable; run.json holds its settings)")
    rep = commands.add_parser("report", help="print the table of a run and write report.html")
    rep.add_argument("run", type=Path, help="the run folder (the --out of `conceptrol evaluate`)")
    rep.add_argument("--paper", action="store_true", help="compare CP / PF / CP·PF with the paper's Table 1, with 95%% "
                                                           "bootstrap intervals over the judged images")
    rep.add_argument("--baseline-scale", type=float, help="with --paper: the baseline's scale that Conceptrol's gain is "
                                                          "measured against (default: the same scale, else the "
                                                          "baseline's only one)")
    demo = commands.add_parser("demo", help="run offline on a tiny random model and write images and masks")
    demo.add_argument("--out", type=Path, default=Path("conceptrol-demo"),
                      help="output folder (default: conceptrol-demo); earlier files are never overwritten")
    demo.add_argument("--steps", type=int, default=20, help="denoising steps (default: 20)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--model", default="tiny-sd15", choices=[*TINY_MODELS, *DEMO_SHORT_NAMES],
                      help="tiny-sd15: SD 1.5 with IP-Adapter; tiny-flux: FLUX.1 with OminiControl; tiny-flux-ip, "
                           "tiny-flux-kontext, tiny-flux-redux: FLUX.1 with XLabs' IP-Adapter, Kontext or Redux; all "
                           "tiny, random, offline (sd15, flux, ... without 'tiny-' also work) (default: tiny-sd15)")
    _ui_parser(commands)
    _analyze_parser(commands)
    _comfyui_parser(commands)
    return parser


def _analyze_parser(commands: argparse._SubParsersAction) -> None:
    an = commands.add_parser("analyze", help="find a model's concept-specific block: every block's concept map scored "
                                             "against the subject mask (ROC AUC per step; the paper's Figs. 5-6)")
    an.add_argument("--model", default="sd15", help="sd15, sdxl, flux, flux-dev, flux2-klein, flux2-dev, "
                    "qwen-image-edit-plus, a hub id, a local folder, or tiny-sd15 / tiny-flux / tiny-flux2 / "
                    "tiny-qwen-edit (the stock model: no adapter is loaded) (default: sd15)")
    an.add_argument("--reference", type=Path, action="append", help="an image the model edits, the same for every "
                    "case (repeat for several): Qwen-Image-Edit needs one, FLUX.2 may take some; SD and FLUX.1 none")
    an.add_argument("--prompt", help="the prompt of the one case (or --cases)")
    an.add_argument("--concept", help="the prompt's word or phrase for the subject (WORD@N: its N-th occurrence)")
    an.add_argument("--mask", type=Path, help="the subject's mask, white on black (any size of the image's shape); "
                    "without it the image is segmented from the concept word (--segmenter)")
    an.add_argument("--seed", type=int, default=0, help="random seed of the case (default: 0)")
    an.add_argument("--cases", type=Path, help="many cases: a JSONL file, one object per line with prompt, concept, "
                    "and optionally mask (relative to the file) and seed")
    an.add_argument("--steps", type=int, help="denoising steps (default: the pipeline's own: 50 on SD, 28 on FLUX)")
    an.add_argument("--size", type=_size, help="WIDTHxHEIGHT (default: the model's own)")
    an.add_argument("--guidance", type=float, help="guidance scale; Qwen-Image-Edit's true CFG scale, with "
                    "--negative-prompt (default: the pipeline's own)")
    an.add_argument("--negative-prompt", help="SD and Qwen-Image-Edit (default: none, as the stock pipeline)")
    an.add_argument("--steps-range", help="rank the blocks on steps a to b-1 only, written a:b (the paper's Fig. 6: 0:10;"
                    " default: all steps)")
    an.add_argument("--segmenter", default="owlv2-sam", choices=["owlv2-sam", "grounding-dino-sam", "clipseg"],
                    help="segments the image from the concept word when a case has no mask: an open-vocabulary box "
                    "detector and SAM on its box (as the paper), or the lighter CLIPSeg (default: owlv2-sam)")
    an.add_argument("--device", default="auto", help=DEVICE_HELP)
    an.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    an.add_argument("--out", type=Path, required=True, help="the folder for analysis.json, the images, the pictures and "
                    "analysis.html (an earlier analysis there is never overwritten)")


def _comfyui_parser(commands: argparse._SubParsersAction) -> None:
    comfyui = commands.add_parser("comfyui", help="the ComfyUI node pack that ships with conceptrol")
    actions = comfyui.add_subparsers(dest="comfyui_command", required=True, parser_class=OneLineParser)
    install = actions.add_parser("install", help="make a ComfyUI folder load the Conceptrol nodes (writes a small "
                                                 "loader into its custom_nodes/; run again to check)")
    install.add_argument("path", type=Path, help="the ComfyUI folder (the one holding main.py, comfy/ and custom_nodes/)")


def _ui_parser(commands: argparse._SubParsersAction) -> None:
    ui = commands.add_parser("ui", help="start the local web UI (vanilla vs Conceptrol side by side)")
    ui.add_argument("--model", action="append", help="a model of the menu: sd15, sdxl, flux, flux-dev, flux-kontext, a "
                    "hub id, a local folder or a tiny model (repeatable; default: sd15, sdxl and flux)")
    ui.add_argument("--adapter", help=f"{ADAPTER_HELP}; for every model of the menu (default: each model's own)")
    ui.add_argument("--adapter-repo", action="append", help=f"{ADAPTER_REPO_HELP}; repeatable: each model of the menu "
                    "takes the one that holds its adapter")
    ui.add_argument("--demo", action="store_true", help="offline: tiny random models, nothing downloaded")
    ui.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1, this machine only)")
    ui.add_argument("--port", type=int, help="port (default: the first free one from 7860)")
    ui.add_argument("--max-file-size", default="25mb", help="largest upload accepted (default: 25mb)")
    ui.add_argument("--device", default="auto", help=DEVICE_HELP)
    ui.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    ui.add_argument("--ip-adapter-repo", help="deprecated: use --adapter-repo")
    ui.add_argument("--ominicontrol-repo", help="deprecated: use --adapter-repo")


def _fields(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k != "command"}


def cmd_generate(args: argparse.Namespace) -> None:
    from .app.settings import GenerateSettings

    settings = GenerateSettings(**_fields(args) | {"image": tuple(args.image), "concept": tuple(args.concept)})
    from .app.generate import check_generation, generate

    checked = check_generation(settings)
    _no_bars_in_logs()
    for path in generate(settings, checked=checked, on_step=None if sys.stderr.isatty() else _step_lines).files:
        print(path)


def _step_lines(done: int, total: int) -> None:
    """Progress for logs (stderr is not a terminal): a plain line every tenth of the steps, not a redrawn bar."""
    if done == total or done % max(1, total // 10) == 0:
        print(f"generating: step {done}/{total}", file=sys.stderr, flush=True)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .eval.evaluate import EvaluateSettings

    fields = _fields(args)
    settings = EvaluateSettings(**fields | {
        "method": tuple(args.method or ()), "scale": tuple(args.scale or ()),
        "seeds": tuple(args.seeds or (0,)), "concept_layer": tuple(args.concept_layer or ()) or None})
    from .eval.evaluate import evaluate

    summary = evaluate(settings, before_loading=_no_bars_in_logs)
    if not settings.dry_run:
        print(summary.line())


def cmd_report(args: argparse.Namespace) -> None:
    if args.baseline_scale is not None and not args.paper:
        raise ConceptrolError("--baseline-scale goes with --paper")
    if args.paper:
        from .eval.report import paper_report

        lines = paper_report(args.run, args.baseline_scale)
    else:
        from .eval.report import report

        lines = report(args.run)
    for line in lines:
        print(line)


def cmd_demo(args: argparse.Namespace) -> None:
    """The demo on a tiny model (`sd15` and the other short names are the same as `tiny-sd15`, ...)."""
    from .app.settings import check_seed, check_steps

    check_steps(args.steps)
    check_seed(args.seed)
    from .app.offline_demo import run_offline_demo

    model = args.model.removeprefix("tiny-")
    for path in run_offline_demo(args.out, steps=args.steps, seed=args.seed, model=model):
        print(path)


def cmd_ui(args: argparse.Namespace) -> None:
    try:
        from .demo import UIOptions
        from .demo import main as launch_ui
    except ImportError as error:
        raise ConceptrolError(str(error)) from None
    launch_ui(UIOptions(**_fields(args) | {"model": tuple(args.model or UIOptions.model),
                                          "adapter_repo": tuple(args.adapter_repo or ())}))


def cmd_analyze(args: argparse.Namespace) -> None:
    from .app.analyze import AnalyzeSettings

    settings = AnalyzeSettings(**_fields(args))
    from .app.analyze import check_analysis, run_analysis, summary_lines
    from .app.progress import JobProgress

    checked = check_analysis(settings)
    _no_bars_in_logs()
    with JobProgress("analyze", unit="step") as progress:
        progress.start(checked.steps * len(checked.cases))
        analysis = run_analysis(settings, checked, lambda done, total: progress.update())
    for path in analysis.files:
        print(path)
    for line in summary_lines(analysis):
        print(line)


def cmd_comfyui(args: argparse.Namespace) -> None:
    from .comfyui.install import install_comfyui_loader

    print(install_comfyui_loader(args.path).line())


def _quiet_libraries() -> None:
    """Keep the libraries' advisory messages out of the CLI's output (their errors still show); ours stay one line."""
    for library in ("TRANSFORMERS", "DIFFUSERS"):
        os.environ.setdefault(f"{library}_VERBOSITY", "error")  # read when they are first imported, below
    if not sys.stderr.isatty():  # download bars are noise in logs
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # diffusers imports torchao when it is installed: its import logs warnings about its own CUDA extensions, and
    # torch's pytree one about torchao's enums; advice to library authors, noise in our output
    for logger in ("torchao", "torch.utils._pytree"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    for library in ("diffusers", "transformers", "huggingface_hub", "accelerate", "peft", "torch"):
        warnings.filterwarnings("ignore", category=UserWarning, module=library)
        warnings.filterwarnings("ignore", category=FutureWarning, module=library)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=library)
    warnings.showwarning = _show_warning
    _SHOWN.clear()


_SHOWN: set[str] = set()  # each of our warnings once per command, though the checks and the run may both raise it


def _no_bars_in_logs() -> None:
    """When stderr is a log rather than a terminal, no model-loading bars from diffusers and transformers."""
    if sys.stderr.isatty():
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file=None, line=None) -> None:
    """Our own warnings as one `conceptrol: warning: ...` line, each once; others as Python prints them."""
    if issubclass(category, ConceptrolWarning):
        if str(message) not in _SHOWN:
            _SHOWN.add(str(message))
            print(f"conceptrol: warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        {"generate": cmd_generate, "demo": cmd_demo, "evaluate": cmd_evaluate, "report": cmd_report,
         "ui": cmd_ui, "comfyui": cmd_comfyui, "analyze": cmd_analyze}[args.command](args)
    except ConceptrolError as error:
        print(f"conceptrol: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("conceptrol: interrupted; finished results are kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
