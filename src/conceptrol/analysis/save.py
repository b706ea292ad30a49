"""Writing an analysis into a folder: analysis.json, the cases' images and masks, the maps, pictures and a page."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from safetensors.torch import save_file

from ..core.errors import ConceptrolError
from ..core.files import free_suffix, with_suffix, write_new_png, write_new_text

if TYPE_CHECKING:
    from torch import Tensor

    from .result import BlockAnalysis

PICTURES = ("auc_over_steps.png", "panel.png")  # Fig. 6 and Fig. 5 of arXiv 2503.06568, for this analysis


def planned_files(analysis: BlockAnalysis) -> list[str]:
    """Every file save() writes, before the suffix that keeps earlier analyses: the same set each time."""
    cases = [name for i in range(len(analysis.cases)) for name in (f"case-{i}.png", f"mask-{i}.png")]
    return ["analysis.json", *cases, "maps.safetensors", *PICTURES, "analysis.html"]


def save_analysis(analysis: BlockAnalysis, folder: Path) -> list[Path]:
    """Write the analysis into `folder` (created if needed), never over an earlier file; returns what was written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConceptrolError(f"cannot create {folder} ({error.strerror or error}); pass a writable --out") from None
    suffix = free_suffix(folder, planned_files(analysis))
    name = lambda base: with_suffix(base, suffix)  # noqa: E731
    images = [name(f"case-{i}.png") for i in range(len(analysis.cases))]
    masks = [name(f"mask-{i}.png") for i in range(len(analysis.cases))]
    written = []
    for result, image, mask in zip(analysis.cases, images, masks):
        written.append(write_new_png(result.image, folder / image))
        pixels = (result.subject.numpy().astype(np.uint8) * 255)
        written.append(write_new_png(Image.fromarray(pixels, mode="L"), folder / mask))
    record = analysis.to_json(images, [_mask_entry(r, m) for r, m in zip(analysis.cases, masks)])
    save_file(stack_maps(analysis.maps), str(folder / name("maps.safetensors")))
    written.append(folder / name("maps.safetensors"))
    written += _pictures(analysis, folder, name, record)
    record["files"] = [path.name for path in written] + [name("analysis.json")]
    written.append(write_new_text(json.dumps(record, indent=2) + "\n", folder / name("analysis.json")))
    return written


def stack_maps(maps: dict[str, list[Tensor]]) -> dict[str, Tensor]:
    """The maps as one tensor per block and case, for safetensors: 'block/case' -> [steps, h, w]."""
    return {f"{block}/{index}": m.contiguous() for block, per_case in maps.items() for index, m in enumerate(per_case)}


def _mask_entry(result: Any, written: str) -> str:
    """The mask a case was scored against: the user's file, else the mask written beside the image."""
    source = Path(result.mask_source)
    return str(source) if source.is_absolute() else written


def _pictures(analysis: BlockAnalysis, folder: Path, name: Any, record: dict) -> list[Path]:
    """Fig. 6's plot and Fig. 5's panel (matplotlib, the eval extra), then the HTML page that shows them."""
    from .pictures import auc_over_steps, block_panel, html_page

    written = []
    try:
        written.append(auc_over_steps(analysis, folder / name(PICTURES[0])))
        written.append(block_panel(analysis, folder / name(PICTURES[1])))
    except ImportError:
        record["pictures_skipped"] = "the plots need matplotlib: pip install 'conceptrol[eval]'"
    written.append(write_new_text(html_page(analysis, record, written), folder / name("analysis.html")))
    return written
