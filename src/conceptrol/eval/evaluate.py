"""`conceptrol evaluate` as a library function: settings checked once up front, then the resumable passes.

Everything that can be checked without model weights is checked before the pipeline loads: the
benchmark, every argument, the model's configs and tokenizer (each case's concept is located), the
adapter, the run folder's stored settings (run.json), the scoring backbones and the judge.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from ..app.settings import GenerateSettings, check_number, check_seed, resolve_concept_layer
from ..core.errors import ConceptNotFoundError, ConceptrolError, ConceptrolWarning
from .benchmark import Case, describe, load_benchmark
from .models import check_scoring_models, concept_layer, load_metrics, model_for
from .protocol import PROTOCOLS, apply_protocol, dreambench_plus_data

JUDGE_MODEL = "gpt-4o"
JUDGE_RUNS = 3
SCALE = 1.0


@dataclass(frozen=True)
class EvaluateSettings:
    """What `conceptrol evaluate` runs; field names are the command's flags. None = the default named beside it."""

    benchmark: Path  # DreamBench++ folder, DreamBench folder, or a .jsonl/.csv manifest
    out: Path  # the run folder: records, images, run.json
    method: tuple[str, ...] = ()  # baselines (runner.METHODS) and/or conceptrol; () = the model's baseline and conceptrol
    scale: tuple[float, ...] = ()  # () = the protocol's per-method scales, else 1.0
    seeds: tuple[int, ...] = (0,)
    model: str = "sd15"  # as for generate, or 'tiny' (tiny-flux, tiny-flux-ip, ...) for an offline random model
    adapter: str | None = None
    adapter_repo: str | None = None
    start: float | None = None  # Conceptrol's warm-up (None = 0.2 on SD, 0 on FLUX); baselines always start at 0
    end: float = 1.0
    steps: int | None = None
    size: tuple[int, int] | None = None
    guidance: float | None = None
    negative_prompt: str | None = None
    concept_layer: str | tuple[str, ...] | None = None  # one layer (or auto:DIR), or several: Conceptrol at each
    concept_layer_architecture: str | None = None  # set from auto:DIR: the architecture that analysis was made on
    condition_size: int | None = None
    limit: int | None = None  # only the first N cases
    no_score: bool = False
    clip_model: str | None = None  # None = openai/clip-vit-base-patch32
    dino_model: str | None = None  # None = facebook/dino-vits16
    judge_url: str | None = None
    judge_model: str | None = None  # None = gpt-4o
    judge_runs: int | None = None  # None = 3
    judge_max_tokens: int | None = None  # the judge's answer length limit (None: the endpoint's default)
    protocol: str | None = None  # dreambench-plus: Table 1's settings and DreamBench++'s judge (eval/protocol.py)
    yes: bool = False  # start a judged run without asking (after printing its cost)
    dry_run: bool = False  # list and check, generate nothing
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", _unique("method", self.method))
        object.__setattr__(self, "scale", _unique("scale", tuple(float(s) for s in self.scale)))
        object.__setattr__(self, "seeds", _unique("seeds", self.seeds))
        self._resolve_layers()
        from .runner import METHODS

        unknown = [m for m in self.method if m not in METHODS]
        if unknown:
            raise ConceptrolError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
        for scale in self.scale:
            check_number("scale", scale)
        for seed in self.seeds:
            check_seed(seed)
        if self.protocol is not None and self.protocol not in PROTOCOLS:
            raise ConceptrolError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.limit is not None and self.limit < 1:
            raise ConceptrolError(f"--limit must be at least 1 (the first N cases), got {self.limit}")
        if self.start is not None and self.method and "conceptrol" not in self.method:
            raise ConceptrolError("--start is Conceptrol's warm-up; the baselines always start at 0, so leave it out "
                                  "or add --method conceptrol")
        self._check_scoring()
        self.template  # noqa: B018 (builds and so checks every generation setting)

    def _resolve_layers(self) -> None:
        """--concept-layer given once is the run's layer; given several times, a sweep: Conceptrol runs at each."""
        given = (self.concept_layer,) if isinstance(self.concept_layer, str) else tuple(self.concept_layer or ())
        resolved = [resolve_concept_layer(layer) for layer in _unique("concept-layer", given)]
        architectures = {architecture for _, architecture in resolved if architecture is not None}
        if len(architectures) > 1:
            raise ConceptrolError(f"--concept-layer auto: analyses of different models ({', '.join(sorted(architectures))})")
        layers = tuple(layer for layer, _ in resolved)
        object.__setattr__(self, "concept_layer", layers[0] if len(layers) == 1 else (layers or None))
        object.__setattr__(self, "concept_layer_architecture", next(iter(architectures), None))

    @property
    def layer_sweep(self) -> tuple[str, ...]:
        """The layers of a sweep (--concept-layer given more than once), else ()."""
        return self.concept_layer if isinstance(self.concept_layer, tuple) else ()

    def _check_scoring(self) -> None:
        if self.no_score and (self.clip_model or self.dino_model):
            raise ConceptrolError("--clip-model and --dino-model choose the scoring backbones; --no-score skips "
                                  "scoring, so leave one or the other out")
        if self.judge_url is None and (self.judge_model, self.judge_runs, self.judge_max_tokens) != (None, None, None):
            raise ConceptrolError("--judge-model, --judge-runs and --judge-max-tokens configure the judge; "
                                  "pass --judge-url too")
        self.judge  # noqa: B018 (checks the judge settings)

    @property
    def template(self) -> GenerateSettings:
        """The generation settings all jobs share; prompt, concept, image, method, scale and seed vary per job."""
        return GenerateSettings(
            prompt="(each case's prompt)", concept=("concept",), image=(Path("reference.png"),), model=self.model,
            adapter=self.adapter, adapter_repo=self.adapter_repo, start=self.start, end=self.end, steps=self.steps,
            size=self.size, guidance=self.guidance, negative_prompt=self.negative_prompt,
            concept_layer=None if self.layer_sweep else self.concept_layer,
            concept_layer_architecture=self.concept_layer_architecture, condition_size=self.condition_size,
            device=self.device,
            dtype=self.dtype, out=self.out, scale=self.scale[0] if self.scale else None)

    @property
    def judge(self) -> Any:
        if self.judge_url is None:
            return None
        from .judge import JudgeConfig

        protocol = {"protocol": "dreambench-plus", "clone": Path(self.benchmark)} if self.protocol else {}
        return JudgeConfig(self.judge_url, self.judge_model or JUDGE_MODEL,
                           JUDGE_RUNS if self.judge_runs is None else self.judge_runs,
                           max_tokens=self.judge_max_tokens, **protocol)


@dataclass
class EvaluateSummary:
    rank: int
    world_size: int
    jobs: int  # jobs of the whole run (all ranks)
    generated: int = 0  # made by this process now
    failed: int = 0  # of those, failed
    scored: int = 0
    judged: int = 0
    judge_failed: int = 0  # judgements without a readable score after the retries (asked again on resume)
    ok_in_run: int = 0  # jobs of the run whose current record is a success (any process, any time)
    first_error: str = ""
    out: Path = field(default_factory=Path)

    def line(self) -> str:
        return (f"rank {self.rank}/{self.world_size}: {self.generated} generated ({self.failed} failed), "
                f"{self.scored} scored, {self.judged} judged" + (f" ({self.judge_failed} failed)" if self.judge_failed else "")
                + f"; {self.jobs} jobs in all; results in {self.out}")


def _unique(name: str, values: tuple) -> tuple:
    unique = tuple(dict.fromkeys(values))
    if len(unique) != len(values):
        repeated = sorted({str(v) for v in values if list(values).count(v) > 1})
        warnings.warn(f"--{name} {', '.join(repeated)} given more than once; each runs once", ConceptrolWarning,
                      stacklevel=3)
    return unique


@dataclass
class Plan:
    """A checked run: what `evaluate` will do, before any weights load."""

    settings: EvaluateSettings  # with the protocol's presets filled in
    base: GenerateSettings  # the generation settings every job shares
    info: Any  # the model's ModelInfo
    pipe: Any  # a pipeline when cheap to build (tiny models), else None: loaded after the checks
    jobs: list  # every (case, method, scale, seed) of the run
    from_preset: tuple[str, ...] = ()
    failing: frozenset[str] = frozenset()  # ids of the cases without their concept in the prompt: their jobs fail


def evaluate(settings: EvaluateSettings, echo: Callable[[str], None] = print,
             before_loading: Callable[[], None] = lambda: None) -> EvaluateSummary:
    """Check everything, then generate, score and judge this process's share of the jobs (resumable).

    `echo` prints the run's notes; `before_loading` runs once every check has passed, before any weights load.
    With `dry_run`, only the checks and the list of what would run.
    """
    from ..app.generate import pipeline_for
    from .records import shard
    from .runner import generate_pass, process_rank

    rank, world = process_rank()
    plan = check_run(settings, echo if rank == 0 else lambda _: None)
    settings, out = plan.settings, plan.base.out
    summary = EvaluateSummary(rank, world, len(plan.jobs), out=out)
    if settings.dry_run:
        return summary
    before_loading()
    metrics = None if settings.no_score else load_metrics(settings, plan.base.device)
    pipe = plan.pipe if plan.pipe is not None else pipeline_for(plan.base)
    pipe.set_progress_bar_config(disable=True)
    with _progress("generate", rank, world) as progress:
        for record in generate_pass(pipe, plan.jobs, out, plan.base, rank, world, progress):
            summary.generated += 1
            if record["status"] == "error":
                summary.failed += 1
                summary.first_error = summary.first_error or record["error"]
    _score_and_judge(settings, summary, metrics, rank, world)
    _finish(summary, shard(plan.jobs, rank, world), out)
    return summary


def check_run(settings: EvaluateSettings, echo: Callable[[str], None]) -> Plan:
    """Every check, in order of cost; run.json and judge.json are written once all have passed (not in a dry run)."""
    from ..app.outputs import make_output_dir
    from .runs import check_run_file, run_identity, run_record, write_judge_file, write_run_file

    data = dreambench_plus_data(settings.benchmark) if settings.protocol else settings.benchmark
    benchmark = load_benchmark(data)
    cases = benchmark[: settings.limit]
    echo(f"benchmark {data}: {describe(cases)}")
    plan = _plan(settings, cases, echo)
    record = run_record(run_identity(plan.settings, plan.base, plan.info), settings.benchmark, benchmark,
                        settings.protocol, plan.from_preset)
    check_run_file(plan.base.out, record)
    if not settings.no_score:
        check_scoring_models(settings)
    judge = _check_judge(plan, echo)
    if settings.dry_run:
        _describe_plan(plan, echo)
        return plan
    make_output_dir(plan.base.out)
    write_run_file(plan.base.out, record)
    if judge is not None:
        write_judge_file(plan.base.out, judge)
    return plan


def _plan(settings: EvaluateSettings, cases: list[Case], echo: Callable[[str], None]) -> Plan:
    """The jobs, with the model's and the protocol's defaults filled in and checked against the model and each case;
    the run folder is checked to be writable, and created only once every check has passed (check_run)."""
    from ..app.outputs import check_output_dir
    from .runner import BASELINES, jobs_for, process_device, process_rank

    out = Path(settings.out).expanduser() if settings.dry_run else check_output_dir(settings.out)
    world = process_rank()[1]
    device = process_device() if world > 1 and settings.device == "auto" else settings.device
    pipe, info = model_for(settings, settings.template.replace(device=device, out=out))
    settings = replace(settings, concept_layer=concept_layer(settings, info))
    profile = info.profile(settings.adapter)
    methods = settings.method or (BASELINES[profile], "conceptrol")
    if settings.protocol:
        applied = apply_protocol(settings, profile, BASELINES[profile])
        settings, scales, from_preset = applied.settings, applied.method_scales, applied.from_preset
        echo(f"protocol {settings.protocol}: from its presets {', '.join(from_preset) or 'nothing'} (flags given "
             "explicitly win)")
    else:
        scales, from_preset = {m: settings.scale or (SCALE,) for m in methods}, ()
    base = settings.template.replace(device=device, out=out)
    failing = _check_cases(settings, base, info, cases, echo)
    jobs = jobs_for(cases, scales, settings.seeds, settings.layer_sweep)
    return Plan(settings, base, info, pipe, jobs, from_preset, failing)


def _check_judge(plan: Plan, echo: Callable[[str], None]) -> Any:
    """The judge answers; its templates exist and did not change; its cost is printed and, unless --yes, confirmed.

    Returns the judge's JudgeConfig (None without --judge-url).
    """
    settings = plan.settings
    judge = settings.judge
    if judge is None:
        return None
    from .judge import check_judge, judge_cost
    from .runs import check_judge_file

    check_judge(judge)
    check_judge_file(plan.base.out, judge)
    pending = _to_judge(plan)
    echo(f"judge: {judge_cost(judge, len(pending), [job.case.category for job in pending]).describe()}")
    if settings.yes or settings.dry_run:
        return judge
    import sys

    if not sys.stdin.isatty():
        raise ConceptrolError("a judged run costs money (see the line above); pass --yes to start it from a script")
    if input("Start the run? [y/N] ").strip().lower() not in ("y", "yes"):
        raise ConceptrolError("stopped before starting: nothing was generated or judged")
    return judge


def _to_judge(plan: Plan) -> list:
    """The jobs a judged run will ask about: those still to generate and those whose picture has no verdict yet,
    leaving out the jobs that will fail (their case's concept is not in its prompt)."""
    from .runner import pending_images, pending_jobs

    out = plan.base.out
    unjudged = {record["key"] for record in pending_images(out, "judgements")} if out.is_dir() else set()
    to_make = {job.key for job in pending_jobs(out, plan.jobs)}
    return [job for job in plan.jobs
            if job.case.case_id not in plan.failing and (job.key in to_make or job.key in unjudged)]


def _describe_plan(plan: Plan, echo: Callable[[str], None]) -> None:
    """A dry run's list: jobs per method and scale still to generate, and an example of each."""
    from collections import Counter

    from .runner import pending_jobs

    todo = pending_jobs(plan.base.out, plan.jobs)  # the generation pass's own rule: a success from the same case
    counts = Counter((job.method, job.scale) for job in todo)
    echo(f"dry run: {len(todo)} of {len(plan.jobs)} jobs to generate "
         + ("; ".join(f"{m} at scale {s:g}: {n}" for (m, s), n in sorted(counts.items())) or "(all are done)"))
    for job in todo[:3]:
        echo(f"  e.g. {job.key}: {job.case.prompt!r} (concept {job.case.concept!r})")
    echo("dry run: nothing was generated, scored or judged")


def _check_cases(settings: EvaluateSettings, base: GenerateSettings, info: Any, cases: list[Case],
                 echo: Callable[[str], None]) -> frozenset[str]:
    """Model options once; each case's concept located with the tokenizer. Returns the ids of the cases without
    it (counted here; their jobs are recorded as failed)."""
    from ..app.preflight import check_concepts, check_model_options

    check_model_options(base, info)
    missing = []
    for case in cases:
        try:
            check_concepts(base.replace(prompt=case.prompt, concept=(case.concept,)), info)
        except ConceptNotFoundError:
            missing.append(case)
    if missing:
        echo(f"{len(missing)} of {len(cases)} cases do not have their concept in the prompt (e.g. {missing[0].case_id}: "
             f"{missing[0].concept!r} in {missing[0].prompt!r}); they will be recorded as failed")
    return frozenset(case.case_id for case in missing)


def _progress(what: str, rank: int, world: int) -> Any:
    from ..app.progress import JobProgress

    label = what if world == 1 else f"{what} (rank {rank}/{world})"
    return JobProgress(label, interactive=None if rank == 0 else False)


def _score_and_judge(settings: EvaluateSettings, summary: EvaluateSummary, metrics: Any, rank: int, world: int) -> None:
    from .runner import judge_pass, score_pass

    if metrics is not None:
        with _progress("score", rank, world) as progress:
            summary.scored = sum(1 for _ in score_pass(metrics, summary.out, rank, world, progress))
    if settings.judge is not None:
        with _progress("judge", rank, world) as progress:
            for verdict in judge_pass(settings.judge, summary.out, rank, world, progress):
                summary.judged += 1
                summary.judge_failed += verdict.get("status") == "error"


def _finish(summary: EvaluateSummary, my_jobs: list, out: Path) -> None:
    """Count this process's successes; a run in which every job failed is an error, not a result."""
    from .runner import latest, read_all

    current = latest(read_all(out, "generations"))
    keys = {job.key for job in my_jobs}
    summary.ok_in_run = sum(1 for key in keys if current.get(key, {}).get("status") == "ok")
    if summary.ok_in_run == 0 and summary.generated:
        raise ConceptrolError(f"every one of the {len(keys)} jobs failed (first error: {summary.first_error}); "
                              f"see {out}/generations.rank*.jsonl")
