"""Generation, scoring and judging passes over (case, method, scale, seed) jobs; resumable and shardable.

Every process writes its own JSON-lines files (generations.rank<R>.jsonl, scores.rank<R>.jsonl, ...) and
reads all ranks' files to know what is done, so a run resumes after a kill and may be resumed with a
different number of processes. A job counts as done only when its latest record is a success made from
the same case (prompt, concept and reference bytes: `Case.fingerprint`); failed jobs run again. Images
are written to a temporary file, synced and renamed before their record is appended.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from PIL import Image

from ..app.outputs import save_atomic
from ..app.progress import JobProgress
from ..app.settings import GenerateSettings
from ..core.errors import ConceptrolError
from ..core.files import safe_name
from ..core.images import load_reference_image
from .benchmark import Case
from .records import RecordStore, shard

# method -> masking: each adapter as is (the baselines), and Conceptrol on whichever adapter the model carries
METHODS = {"ip-adapter": "none", "ominicontrol": "none", "xlabs-ip": "none", "kontext": "none", "redux": "none",
           "flux2": "none", "qwen-edit": "none", "conceptrol": "global"}
BASELINES = {"sd15": "ip-adapter", "sdxl": "ip-adapter", "flux": "ominicontrol", "flux-ip": "xlabs-ip",
             "flux-kontext": "kontext", "flux-redux": "redux", "flux2-klein": "flux2", "flux2-dev": "flux2",
             "qwen-edit": "qwen-edit"}  # profile -> its baseline method (the stock pipeline)


@dataclass(frozen=True)
class Job:
    case: Case
    method: str
    scale: float
    seed: int
    layer: str | None = None  # a layer sweep's concept layer (None: the run's one layer)

    @property
    def key(self) -> str:
        layer = "" if self.layer is None else f"{self.layer}/"
        return f"{self.method}/{self.scale:g}/{self.seed}/{layer}{self.case.case_id}"

    def image_path(self, out: Path) -> Path:
        """Under out/images only, from safe characters; the id's digest keeps ids that fold alike ('A', 'a') apart."""
        digest = hashlib.sha1(self.case.case_id.encode("utf-8")).hexdigest()[:8]
        folder = out / "images" / safe_name(self.method) / safe_name(f"scale{self.scale:g}") / f"seed{self.seed}"
        if self.layer is not None:
            folder = folder / f"{safe_name(self.layer)}-{hashlib.sha1(self.layer.encode()).hexdigest()[:6]}"
        return folder / f"{safe_name(self.case.case_id)}-{digest}.png"


def jobs(cases: list[Case], methods: Iterable[str], scales: Iterable[float], seeds: Iterable[int]) -> list[Job]:
    """Every (method, scale, seed, case) once; repeated values are taken once."""
    methods, scales, seeds = (list(dict.fromkeys(values)) for values in (methods, scales, seeds))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConceptrolError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    return [Job(c, m, float(s), seed) for m in methods for s in scales for seed in seeds for c in cases]


def jobs_for(cases: list[Case], scales: dict[str, Iterable[float]], seeds: Iterable[int],
             layers: tuple[str, ...] = ()) -> list[Job]:
    """`jobs` with each method at its own scales (a protocol's per-method presets); with a layer sweep, Conceptrol's
    jobs once per layer (the baselines use no concept layer, so they run once)."""
    found = [job for method, method_scales in scales.items() for job in jobs(cases, [method], method_scales, seeds)]
    swept = [replace(job, layer=layer) for job in found if job.method == "conceptrol" for layer in layers]
    return [job for job in found if not (layers and job.method == "conceptrol")] + swept


def job_settings(base: GenerateSettings, job: Job) -> GenerateSettings:
    """The generation of one job; baselines (masking none) always run without warm-up (start 0)."""
    masking = METHODS[job.method]
    return base.replace(prompt=job.case.prompt, concept=(job.case.concept,), image=(job.case.image,), masking=masking,
                        scale=job.scale, start=0.0 if masking == "none" else base.start, seed=job.seed, num_images=1,
                        save_masks=False, concept_layer=job.layer if job.layer is not None else base.concept_layer)


def process_rank() -> tuple[int, int]:
    """(rank, world size) from the variables `accelerate launch` and `torchrun` set, else (0, 1).

    Sharding needs no process group: each process takes every world_size-th job from its rank.
    """
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def process_device() -> str:
    """This process's device under a multi-process launch: its own GPU when there are GPUs, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return "cpu"


def stores(out: Path, name: str, rank: int) -> tuple[RecordStore, list[RecordStore]]:
    """This rank's store and every rank's store for `name` (generations, scores or judgements)."""
    mine = RecordStore(out / f"{name}.rank{rank}.jsonl")
    return mine, [RecordStore(p) for p in sorted(out.glob(f"{name}.rank*.jsonl"))] or [mine]


def read_all(out: Path, name: str) -> list[dict]:
    return [record for store in stores(out, name, 0)[1] for record in store.read()]


def latest(records: Iterable[dict]) -> dict[str, dict]:
    """The newest record of each key (by the time it finished; later lines win ties)."""
    newest: dict[str, dict] = {}
    for record in records:
        key = record.get("key")
        if key is not None and record.get("finished", 0) >= newest.get(key, {}).get("finished", 0):
            newest[key] = record
    return newest


def generate_pass(pipe: Any, all_jobs: list[Job], out: Path, base: GenerateSettings, rank: int = 0,
                  world_size: int = 1, progress: JobProgress | None = None) -> Iterator[dict]:
    """Generate this rank's jobs that are not done, appending one record per job as it finishes."""
    mine, _ = stores(out, "generations", rank)
    todo = pending_jobs(out, shard(all_jobs, rank, world_size))
    progress = progress or JobProgress(f"generate (rank {rank})", interactive=False)
    progress.start(len(todo))
    for job in todo:
        record = _generate_one(pipe, job, out, base, rank)
        mine.append(record)
        progress.update()
        yield record


def pending_jobs(out: Path, all_jobs: list[Job]) -> list[Job]:
    """The jobs a generation pass runs: those whose latest record is not a success made from the same case."""
    current = latest(read_all(out, "generations")) if out.is_dir() else {}  # (read_all would create the folder)
    return [job for job in all_jobs if not _done(current.get(job.key), job.case)]


def _done(record: dict | None, case: Case) -> bool:
    return record is not None and record.get("status") == "ok" and record.get("fingerprint") == case.fingerprint


def _generate_one(pipe: Any, job: Job, out: Path, base: GenerateSettings, rank: int) -> dict:
    from ..app.generate import run_conceptrol

    settings = job_settings(base, job)
    record = {"key": job.key, "case_id": job.case.case_id, "fingerprint": job.case.fingerprint, "method": job.method,
              "scale": job.scale, "seed": job.seed, "start": settings.start, "prompt": job.case.prompt,
              **({"concept_layer": job.layer} if job.layer is not None else {}),
              "concept": job.case.concept, "reference": str(Path(job.case.image).resolve()),
              "category": job.case.category, "generation_id": uuid.uuid4().hex, "rank": rank}
    try:
        result = run_conceptrol(pipe, settings, [load_reference_image(job.case.image)])
    except ConceptrolError as error:  # e.g. the concept is not in this prompt: keep going, say so in the record
        return record | {"status": "error", "error": str(error), "finished": time.time()}
    path = job.image_path(out)
    save_atomic(result.images[0], path)  # the image is complete on disk before its record exists
    return record | {"status": "ok", "image": path.relative_to(out).as_posix(), "finished": time.time()}


def score_pass(metrics: Any, out: Path, rank: int = 0, world_size: int = 1,
               progress: JobProgress | None = None) -> Iterator[dict]:
    """Score this rank's generated-but-unscored images (CLIP-T, CLIP-I, DINO)."""

    def score(record: dict, image: Image.Image, reference: Image.Image) -> dict:
        return {"clip_t": metrics.clip_t([image], [record["prompt"]])[0],
                "clip_i": metrics.clip_i([image], [reference])[0], "dino": metrics.dino_score([image], [reference])[0]}

    return _image_pass(out, "scores", rank, world_size, score, progress)


def judge_pass(judge: Any, out: Path, rank: int = 0, world_size: int = 1,
               progress: JobProgress | None = None) -> Iterator[dict]:
    """Ask the judge about this rank's generated-but-unjudged images; each answer is kept as it arrives."""
    from .judge import JudgeAnswerError, judge_case

    def verdict(record: dict, image: Image.Image, reference: Image.Image) -> dict:
        try:
            return judge_case(judge, reference, image, record["prompt"], record["concept"],
                              category=record.get("category", ""))
        except JudgeAnswerError as error:  # no readable score after the retries: a failed judgement, redone on resume
            return {"status": "error", "error": str(error)}

    return _image_pass(out, "judgements", rank, world_size, verdict, progress)


def pending_images(out: Path, name: str, rank: int = 0, world_size: int = 1) -> list[dict]:
    """This rank's current successful generations that `name` has no valid record of yet."""
    finished = latest(read_all(out, name))
    generated = sorted((r for r in latest(read_all(out, "generations")).values() if r.get("status") == "ok"),
                       key=lambda r: r["key"])
    return [r for r in shard(generated, rank, world_size) if not _evaluated(finished.get(r["key"]), r)]


def _evaluated(entry: dict | None, generation: dict) -> bool:
    """A score or verdict counts if it succeeded and belongs to the current picture of its job."""
    return (entry is not None and entry.get("status", "ok") == "ok"
            and entry.get("generation_id") == generation.get("generation_id"))


def _image_pass(out: Path, name: str, rank: int, world_size: int,
                evaluate: Callable[[dict, Image.Image, Image.Image], dict],
                progress: JobProgress | None) -> Iterator[dict]:
    """Run `evaluate` on this rank's pending images, appending each result (a missing image is recorded, not fatal)."""
    mine, _ = stores(out, name, rank)
    todo = pending_images(out, name, rank, world_size)
    progress = progress or JobProgress(f"{name} (rank {rank})", interactive=False)
    progress.start(len(todo))
    for record in todo:
        entry = {"key": record["key"], "generation_id": record.get("generation_id")}
        try:
            with Image.open(out / record["image"]) as file:
                image = file.convert("RGB")
            reference = load_reference_image(record["reference"])
        except (OSError, ConceptrolError) as error:
            result = entry | {"status": "error", "error": f"cannot read the images: {error}", "finished": time.time()}
        else:
            result = entry | {"status": "ok"} | evaluate(record, image, reference) | {"finished": time.time()}
        mine.append(result)
        progress.update()
        yield result
