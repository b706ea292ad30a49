"""Generation and scoring passes over (case, method, scale, seed) jobs; resumable and shardable.

Every process writes its own JSON-lines files (generations.rank<R>.jsonl, scores.rank<R>.jsonl) and
reads all ranks' files to know what is done, so a run resumes after a kill and may be resumed with a
different number of processes. Under `accelerate launch`, jobs are split by process index.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from PIL import Image
from tqdm.auto import tqdm

from ..errors import ConceptrolError
from ..generate import GenerateSettings, run_conceptrol, safe_name
from ..images import load_reference_image
from .benchmark import Case
from .records import RecordStore, shard

METHODS = {"ip-adapter": "none", "ominicontrol": "none", "conceptrol": "global"}  # method -> masking


@dataclass(frozen=True)
class Job:
    case: Case
    method: str
    scale: float
    seed: int

    @property
    def key(self) -> str:
        return f"{self.method}/{self.scale:g}/{self.seed}/{self.case.case_id}"

    def image_path(self, out: Path) -> Path:
        """Under out/images only: every part is reduced to safe characters."""
        parts = [safe_name(self.method), safe_name(f"scale{self.scale:g}"), f"seed{self.seed}", safe_name(self.case.case_id)]
        return out / "images" / Path(*parts[:-1]) / f"{parts[-1]}.png"


def jobs(cases: list[Case], methods: list[str], scales: list[float], seeds: list[int]) -> list[Job]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConceptrolError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    return [Job(c, m, s, seed) for m in methods for s in scales for seed in seeds for c in cases]


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
    """This rank's store and every rank's store for `name` (generations or scores)."""
    mine = RecordStore(out / f"{name}.rank{rank}.jsonl")
    return mine, [RecordStore(p) for p in sorted(out.glob(f"{name}.rank*.jsonl"))] or [mine]


def read_all(out: Path, name: str) -> list[dict]:
    return [record for store in stores(out, name, 0)[1] for record in store.read()]


def generate_pass(pipe: Any, all_jobs: list[Job], out: Path, base: GenerateSettings, rank: int = 0,
                  world_size: int = 1) -> Iterator[dict]:
    """Generate this rank's unfinished jobs, appending one record per job as it finishes."""
    mine, _ = stores(out, "generations", rank)
    done = {record["key"] for record in read_all(out, "generations")}
    todo = [job for job in shard(all_jobs, rank, world_size) if job.key not in done]
    for job in tqdm(todo, desc=f"generate (rank {rank})", disable=None):
        record = _generate_one(pipe, job, out, base)
        mine.append(record)
        yield record


def _generate_one(pipe: Any, job: Job, out: Path, base: GenerateSettings) -> dict:
    record = {"key": job.key, "case_id": job.case.case_id, "method": job.method, "scale": job.scale,
              "seed": job.seed, "prompt": job.case.prompt, "concept": job.case.concept,
              "reference": str(job.case.image), "category": job.case.category}
    masking = METHODS[job.method]
    start = 0.0 if masking == "none" and base.start is None else base.start  # baselines run without warm-up
    settings = GenerateSettings(**{**base.__dict__, "prompt": job.case.prompt, "concept": (job.case.concept,),
                                   "image": (job.case.image,), "masking": masking, "scale": job.scale, "start": start,
                                   "seed": job.seed, "num_images": 1, "save_masks": False})
    try:
        result = run_conceptrol(pipe, settings, [load_reference_image(job.case.image)])
    except ConceptrolError as error:  # e.g. the concept is not in this prompt: keep going, say so in the record
        return record | {"status": "error", "error": str(error)}
    path = job.image_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    result.images[0].save(path)
    return record | {"status": "ok", "image": str(path.relative_to(out))}


def score_pass(metrics: Any, out: Path, rank: int = 0, world_size: int = 1) -> Iterator[dict]:
    """Score this rank's generated-but-unscored images (CLIP-T, CLIP-I, DINO)."""

    def score(record: dict, image: Image.Image, reference: Image.Image) -> dict:
        return {"clip_t": metrics.clip_t([image], [record["prompt"]])[0],
                "clip_i": metrics.clip_i([image], [reference])[0], "dino": metrics.dino_score([image], [reference])[0]}

    return _image_pass(out, "scores", rank, world_size, score)


def judge_pass(judge: Any, out: Path, rank: int = 0, world_size: int = 1) -> Iterator[dict]:
    """Ask the judge about this rank's generated-but-unjudged images; each answer is kept as it arrives."""
    from .judge import judge_case

    def verdict(record: dict, image: Image.Image, reference: Image.Image) -> dict:
        return judge_case(judge, reference, image, record["prompt"], record["concept"])

    return _image_pass(out, "judgements", rank, world_size, verdict)


def _image_pass(out: Path, name: str, rank: int, world_size: int,
                evaluate: Callable[[dict, Image.Image, Image.Image], dict]) -> Iterator[dict]:
    """Run `evaluate` on this rank's generated images that `name` has no record of yet, appending each result."""
    mine, _ = stores(out, name, rank)
    finished = {record["key"] for record in read_all(out, name)}
    generated = sorted((r for r in read_all(out, "generations") if r["status"] == "ok"), key=lambda r: r["key"])
    todo = [r for r in shard(generated, rank, world_size) if r["key"] not in finished]
    for record in tqdm(todo, desc=f"{name} (rank {rank})", disable=None):
        image = Image.open(out / record["image"]).convert("RGB")
        result = {"key": record["key"]} | evaluate(record, image, load_reference_image(record["reference"]))
        mine.append(result)
        yield result
