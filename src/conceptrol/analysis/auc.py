"""The score of a block's textual concept map against a subject mask (ALGORITHM.md section 5; arXiv 2503.06568,
Figs. 5-6): ROC AUC over pixels, the map upsampled to the image with nearest-neighbour.

AUC = P(map at a random subject pixel > map at a random background pixel) + 1/2 P(equal), the Mann-Whitney form.
A nearest-upsampled map is constant on each map cell's block of pixels, so the pixel AUC is computed exactly from
the cells, each weighted by its subject and background pixel counts: no pixel-sized array per map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def cell_of_pixel(grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """For each pixel of an image of `size` (H, W), the map cell F.interpolate(mode="nearest") takes it from: [H, W]."""
    h, w = grid
    cells = torch.arange(h * w, dtype=torch.float64).view(1, 1, h, w)
    return F.interpolate(cells, size=size, mode="nearest")[0, 0].long()


def cell_counts(grid: tuple[int, int], subject: Tensor) -> tuple[Tensor, Tensor]:
    """Subject and background pixels per map cell ([h*w] each), for a boolean subject mask [H, W]."""
    cells = cell_of_pixel(grid, tuple(subject.shape)).flatten()
    inside = subject.flatten()
    count = grid[0] * grid[1]
    return (torch.bincount(cells[inside], minlength=count).double(),
            torch.bincount(cells[~inside], minlength=count).double())


def weighted_auc(values: Tensor, positives: Tensor, negatives: Tensor) -> float:
    """Mann-Whitney AUC of scores `values` [K], each standing for `positives`/`negatives` samples; ties count half."""
    order, group = torch.unique(values.double(), sorted=True, return_inverse=True)
    pos = torch.zeros(len(order), dtype=torch.float64).index_add_(0, group, positives)
    neg = torch.zeros(len(order), dtype=torch.float64).index_add_(0, group, negatives)
    below = torch.cumsum(neg, 0) - neg  # background samples with a strictly lower score than each group
    return float((pos * (below + neg / 2)).sum() / (positives.sum() * negatives.sum()))


def map_auc(concept_map: Tensor, subject: Tensor, counts: tuple[Tensor, Tensor] | None = None) -> float:
    """The AUC of one map [h, w] against a subject mask [H, W] (pass `counts` = cell_counts(...) to reuse them)."""
    positives, negatives = counts if counts is not None else cell_counts(tuple(concept_map.shape), subject)
    return weighted_auc(concept_map.flatten(), positives, negatives)
