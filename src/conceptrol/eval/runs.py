"""run.json: the settings a run folder's pictures were made with, so a resume cannot mix in other settings."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

from ..app.outputs import write_json_atomic
from ..core.errors import ConceptrolError, ConceptrolWarning

RUN_FILE = "run.json"
JUDGE_FILE = "judge.json"
FORMAT = 1


def run_identity(settings: Any, base: Any, info: Any) -> dict[str, Any]:
    """Every setting that changes the pictures, with the architecture's defaults filled in.

    Methods, scales and seeds are not here: they are part of each job's key, so a resume may add more.
    Where the weights come from (--adapter-repo) and the device are not either: they do not change them.
    """
    from ..app.generate import resolved_values
    from ..app.loading import DEFAULT_ADAPTERS, pick_device, pick_dtype, resolve_model
    from ..core.config import CONCEPT_LAYERS

    profile = info.profile(base.adapter)
    values = resolved_values(base, profile)
    dtype = pick_dtype(base.dtype, pick_device(base.device), base.model)
    model = base.model if base.model.startswith("tiny") else resolve_model(base.model)
    if Path(model).expanduser().is_dir():
        model = str(Path(model).expanduser().resolve())
    return {
        "model": model, "architecture": profile, "adapter": base.adapter or DEFAULT_ADAPTERS[info.adapter_family],
        "steps": values["steps"], "size": "x".join(map(str, base.size)) if base.size else "model default",
        "start": values["start"], "end": base.end, "guidance": values["guidance"],
        "negative_prompt": values["negative_prompt"], "condition_size": values["condition_size"],
        "concept_layer": base.concept_layer or CONCEPT_LAYERS[info.architecture],
        "dtype": {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[str(dtype).removeprefix("torch.")],
    }


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


def check_run_file(out: Path, identity: dict[str, Any], benchmark: Path, write: bool = True,
                   extra: dict[str, Any] | None = None) -> None:
    """Write run.json for a new run folder; for an existing one, refuse settings that differ from the stored ones.

    `extra` is stored beside the settings for the reader (e.g. the protocol and which values came from its
    presets) and not compared; `write=False` (a dry run) only compares.
    """
    from .. import __version__

    stored = read_run_file(out)
    if stored is None:
        if not write:
            return
        write_json_atomic({
            "format": FORMAT, "settings": identity, "benchmark": str(Path(benchmark).expanduser().resolve()),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "conceptrol": __version__, "diffusers": _diffusers(),
            **(extra or {}),
        }, Path(out) / RUN_FILE, replace=False)
        stored = read_run_file(out)  # another process may have written it first: compare with that one
    differences = [f"{key} {stored['settings'].get(key)!r} there, {value!r} now" for key, value in identity.items()
                   if stored["settings"].get(key) != value]
    if differences:
        raise ConceptrolError(f"{out} holds a run made with other settings ({'; '.join(differences)}); resume with "
                              "the same settings, or pass a new --out")
    if (stored.get("conceptrol"), stored.get("diffusers")) != (__version__, _diffusers()):
        warnings.warn(f"{out} was started with conceptrol {stored.get('conceptrol')} and diffusers "
                      f"{stored.get('diffusers')}; resuming with conceptrol {__version__} and diffusers {_diffusers()} "
                      "may make pictures that differ slightly from the earlier ones", ConceptrolWarning, stacklevel=2)


def _diffusers() -> str:
    import diffusers

    return diffusers.__version__


def judge_identity(config: Any) -> dict[str, Any]:
    """What decides a run's judgements: the protocol, the model, the runs, the answer limit, the templates' digests."""
    return {"protocol": config.protocol, "model": config.model, "runs": config.runs, "max_tokens": config.max_tokens,
            "templates": config.template_digest}


def check_judge_file(out: Path, config: Any, write: bool = True) -> None:
    """judge.json: written by a run's first judged pass; later passes must judge the same way (no mixed verdicts)."""
    from .dreambench_judge import changed_templates

    path, identity = Path(out) / JUDGE_FILE, judge_identity(config)
    if not path.exists():
        if write:
            write_json_atomic(identity, path, replace=False)
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
