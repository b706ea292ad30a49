"""run.json: the settings a run folder's pictures were made with, so a resume cannot mix in other settings."""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path
from typing import Any

from ..app.outputs import write_json_atomic
from ..app.settings import tiny_profile
from ..core.errors import ConceptrolError, ConceptrolWarning

RUN_FILE = "run.json"
JUDGE_FILE = "judge.json"
FORMAT = 1


PER_JOB = "per job (a layer sweep)"  # run.json's concept layer when --concept-layer was given several times
RECORDED_LATER = ("protocol", "from_preset", "cases")  # fields an older run.json may lack: recorded on resume


def run_identity(settings: Any, base: Any, info: Any) -> dict[str, Any]:
    """Every setting that changes the pictures, with the architecture's defaults filled in.

    Methods, scales and seeds are not here: they are part of each job's key, so a resume may add more; nor are the
    layers of a layer sweep (the concept layer is then "per job").
    Where the weights come from (--adapter-repo) and the device are not either: they do not change them.
    """
    from ..app.loading import PROFILE_ADAPTERS, dtype_name, pick_device, pick_dtype, resolve_model
    from ..app.settings import resolved_values
    from ..core.config import CONCEPT_LAYERS

    profile = info.profile(base.adapter)
    values = resolved_values(base, profile)
    dtype = pick_dtype(base.dtype, pick_device(base.device), base.model)
    model = base.model if tiny_profile(base.model) else resolve_model(base.model)
    if Path(model).expanduser().is_dir():
        model = str(Path(model).expanduser().resolve())
    return {
        "model": model, "architecture": profile, "adapter": base.adapter or PROFILE_ADAPTERS[profile],
        "steps": values["steps"], "size": "x".join(map(str, base.size)) if base.size else "model default",
        "start": values["start"], "end": base.end, "guidance": values["guidance"],
        "negative_prompt": values["negative_prompt"], "condition_size": values["condition_size"],
        "concept_layer": PER_JOB if getattr(settings, "layer_sweep", ()) else
        base.concept_layer or CONCEPT_LAYERS[info.architecture],
        "dtype": dtype_name(dtype),
    }


def cases_digest(cases: list[Any]) -> str:
    """A digest of a benchmark's whole case list (ids, prompts, concepts, reference bytes), in no particular order."""
    lines = sorted(f"{case.case_id}\0{case.fingerprint}" for case in cases)
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()[:16]


def run_record(identity: dict[str, Any], benchmark: Path, cases: list[Any], protocol: str | None,
               from_preset: tuple[str, ...]) -> dict[str, Any]:
    """What run.json holds: the settings, the protocol, the benchmark (resolved path, digest of all its cases)."""
    from .. import __version__

    return {"format": FORMAT, "settings": identity, "protocol": protocol, "from_preset": list(from_preset),
            "benchmark": str(Path(benchmark).expanduser().resolve()), "cases": cases_digest(cases),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "conceptrol": __version__, "diffusers": _diffusers()}


def read_run_file(out: Path) -> dict[str, Any] | None:
    """The stored run.json, or None if there is none; a damaged one is an error that says what to do."""
    path = Path(out) / RUN_FILE
    if not path.exists():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(stored.get("settings"), dict):
            raise ValueError("no settings")
    except (OSError, ValueError, AttributeError) as error:
        raise ConceptrolError(f"{path} is damaged ({error}); restore it, or pass a new --out") from None
    return stored


def has_records(out: Path, name: str) -> bool:
    """Whether any process has written a `name` record (generations, scores, judgements) into the run folder."""
    return any(path.stat().st_size for path in Path(out).glob(f"{name}.rank*.jsonl"))


def check_run_file(out: Path, record: dict[str, Any]) -> None:
    """Refuse to resume a run folder whose run.json holds other settings, another protocol or another benchmark.

    The benchmark is the same when its resolved path is, or when a benchmark elsewhere holds exactly the run's
    cases (moved or copied); at the same path, cases may be added or edited (edited ones are made again). Fields
    an older run.json lacks are not compared. A folder without generation records yet takes any settings.
    """
    from .. import __version__

    stored = read_run_file(out)
    if stored is None or not has_records(out, "generations"):
        return
    differences = [f"{key} {stored['settings'].get(key)!r} there, {value!r} now"
                   for key, value in record["settings"].items() if stored["settings"].get(key) != value]
    differences += _benchmark_differences(stored, record)
    if differences:
        raise ConceptrolError(f"{out} holds a run made with other settings ({'; '.join(differences)}); resume with "
                              "the same settings, or pass a new --out")
    if (stored.get("conceptrol"), stored.get("diffusers")) != (__version__, _diffusers()):
        warnings.warn(f"{out} was started with conceptrol {stored.get('conceptrol')} and diffusers "
                      f"{stored.get('diffusers')}; resuming with conceptrol {__version__} and diffusers {_diffusers()} "
                      "may make pictures that differ slightly from the earlier ones", ConceptrolWarning, stacklevel=2)


def _benchmark_differences(stored: dict[str, Any], record: dict[str, Any]) -> list[str]:
    """The protocol if it changed; the benchmark if it is at another path and holds other cases."""
    differences = []
    if "protocol" in stored and stored["protocol"] != record["protocol"]:
        differences.append(f"protocol {stored['protocol'] or 'none'} there, {record['protocol'] or 'none'} now")
    if "benchmark" in stored and stored["benchmark"] != record["benchmark"] and stored.get("cases") != record["cases"]:
        differences.append(f"benchmark {stored['benchmark']} there, {record['benchmark']} now (with other cases)")
    return differences


def write_run_file(out: Path, record: dict[str, Any]) -> None:
    """run.json for a new run (or a folder without records); a resumed run's keeps its settings, and takes the
    benchmark's path and digest (a move, added or edited cases) and the fields an older run.json lacks."""
    stored = read_run_file(out)
    if stored is None or not has_records(out, "generations"):
        write_json_atomic(record, Path(out) / RUN_FILE, replace=stored is not None)
        return
    updated = {key: record[key] for key in RECORDED_LATER} | stored | {"benchmark": record["benchmark"],
                                                                       "cases": record["cases"]}
    if updated != stored:
        write_json_atomic(updated, Path(out) / RUN_FILE)


def _diffusers() -> str:
    import diffusers

    return diffusers.__version__


def judge_identity(config: Any) -> dict[str, Any]:
    """What decides a run's judgements: the protocol, the model, the runs, the answer limit, the templates' digests."""
    return {"protocol": config.protocol, "model": config.model, "runs": config.runs, "max_tokens": config.max_tokens,
            "templates": config.template_digest}


def write_judge_file(out: Path, config: Any) -> None:
    """judge.json, written once every check of a judged run has passed (again while no verdict exists)."""
    if not (Path(out) / JUDGE_FILE).exists() or not has_records(out, "judgements"):
        write_json_atomic(judge_identity(config), Path(out) / JUDGE_FILE)


def check_judge_file(out: Path, config: Any) -> None:
    """A run's later judged passes must judge as its first did (no mixed verdicts); before any verdict, any judge."""
    from .dreambench_judge import changed_templates

    path, identity = Path(out) / JUDGE_FILE, judge_identity(config)
    if not path.exists() or not has_records(out, "judgements"):
        return
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConceptrolError(f"{path} is damaged ({error}); restore it, or pass a new --out") from None
    changed = changed_templates(stored.get("templates", {}), identity["templates"])
    if changed:
        raise ConceptrolError(f"DreamBench++ template(s) {', '.join(changed)} changed since {out} was judged; restore "
                              "them, or pass a new --out")
    differences = [f"{key} {stored.get(key)!r} there, {value!r} now" for key, value in identity.items()
                   if key != "templates" and stored.get(key) != value]
    if differences:
        raise ConceptrolError(f"{out} was judged with another judge ({'; '.join(differences)}); judge it the same way, "
                              "or pass a new --out")
