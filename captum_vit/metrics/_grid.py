"""The grid pointing game (Boehle et al., B-cos networks, CVPR 2022; Rao et al., CVPR 2022).

A grid is ``g x g`` confidently classified images of ``g * g`` distinct
classes tiled into one image; the map of each cell's class should sit in that
cell. Per grid and cell: *pointing* (the map's maximum lies in the cell) and
*mass* (share of the map's positive mass in the cell); a grid's score is the
mean over its cells. Chance is ``1 / g**2`` for both.

A grid is only scored when the model recognises it: every cell's class is
among the model's ``g * g`` highest logits on the grid. Where a model does not
(small pictures it was not trained on), the map of a cell's class explains a
class the model does not see there, so `evaluate_grid_pointing` reports the
recognition rate instead of a score.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .._utils import forward_logits, module_of
from ._evidence import bootstrap_interval
from ._runner import EvaluationBatch, evaluate

#: fewest recognised grids, and smallest recognised share, that `evaluate_grid_pointing` scores
MIN_RECOGNISED_GRIDS = 10
MIN_RECOGNISED_SHARE = 0.5


@dataclass
class PointingGrids:
    """Grids for the pointing game.

    ``images`` ``(N, C, H, W)``: normalised grids at the size of the pictures
    they were built from; ``cell_targets`` ``(N, g*g)`` the class of each cell
    in row-major order; ``sources`` ``(N, g*g)`` the pictures' indices in the
    pool they came from; ``grid`` is ``g``.
    """

    images: Tensor
    cell_targets: Tensor
    sources: Tensor
    grid: int

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def cell_masks(self) -> Tensor:
        """``(g*g, H, W)`` bool: the pixels of each cell (the same for every grid)."""
        H, W = self.images.shape[-2:]
        masks = torch.zeros(self.grid * self.grid, H, W, dtype=torch.bool)
        for k in range(self.grid * self.grid):
            row, col = divmod(k, self.grid)
            masks[k, row * H // self.grid:(row + 1) * H // self.grid, col * W // self.grid:(col + 1) * W // self.grid] = True
        return masks

    def subset(self, rows: Tensor) -> "PointingGrids":
        """The grids at ``rows`` (indices or a bool mask)."""
        return PointingGrids(self.images[rows], self.cell_targets[rows], self.sources[rows], self.grid)

    @torch.no_grad()
    def recognised(self, forward_func: Any, batch_size: int = 64) -> Tensor:
        """``(N,)`` bool: every cell's class is among the model's ``g*g`` highest logits on the grid."""
        if len(self) == 0:
            return torch.zeros(0, dtype=torch.bool)
        top = _logits(forward_func, self.images, batch_size).topk(self.cell_targets.shape[1], dim=1).indices
        return (self.cell_targets[:, :, None] == top[:, None, :]).any(2).all(1)

    def batches(self, batch_size: int) -> List[Any]:
        """`EvaluationBatch`es for the runner: ``extra["grid_target"]`` ``(n, g*g)``, ``extra["grid_cells"]``
        ``(n, g*g, H, W)``; the labels are the first cell's classes (the metric reads every cell's)."""
        cells = self.cell_masks()
        out = []
        for start in range(0, len(self), batch_size):
            rows = slice(start, min(start + batch_size, len(self)))
            n = rows.stop - rows.start
            targets = self.cell_targets[rows]
            out.append(EvaluationBatch(self.images[rows], targets[:, 0], None, torch.arange(rows.start, rows.stop),
                                       {"grid_target": targets, "grid_cells": cells.expand(n, -1, -1, -1)}))
        return out


@torch.no_grad()
def _logits(forward_func: Any, images: Tensor, batch_size: int) -> Tensor:
    """``(N, K)`` float32 logits on the CPU, ``batch_size`` images at a time on the model's device."""
    module = module_of(forward_func)
    parameter = next(module.parameters(), None) if module is not None else None
    device = parameter.device if parameter is not None else images.device
    out = [forward_logits(forward_func, (images[start:start + batch_size].to(device),)).float().cpu()
           for start in range(0, images.shape[0], batch_size)]
    return torch.cat(out) if out else torch.zeros(0, 0)


@torch.no_grad()
def confident_indices(forward_func: Any, images: Tensor, labels: Tensor, confidence: float = 0.9,
                      batch_size: int = 64) -> Tensor:
    """Indices of the pictures the model classifies right with softmax probability >= ``confidence``.

    Args:
        forward_func: the model, ``(B, C, H, W) -> (B, K)`` logits.
        images: ``(M, C, H, W)`` normalised pictures; ``labels``: ``(M,)``.
    """
    if not 0.0 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0, 1); got {confidence!r}.")
    if images.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long)
    top, predicted = _logits(forward_func, images, batch_size).softmax(1).max(1)
    return torch.nonzero((predicted == labels.long()) & (top >= confidence)).flatten()


def make_pointing_grids(images: Tensor, labels: Tensor, n: int, grid: int = 2, seed: int = 0) -> PointingGrids:
    """``n`` grids of ``grid x grid`` pictures of distinct classes, each picture shrunk to one cell.

    Args:
        images: ``(M, C, H, W)`` normalised pictures (``H`` and ``W``
            divisible by ``grid``); the grids have the same size.
        labels: ``(M,)`` their classes; at least ``grid**2`` distinct ones.
        n: number of grids.
        grid: 2 or 3 (cells per side).
        seed: the generator's seed (classes, pictures, their cells).

    Cells are shrunk with antialiased bilinear resampling, so the grid has the
    model's input size and every cell is a quarter (or a ninth) of the image.
    """
    if grid not in (2, 3):
        raise ValueError(f"grid must be 2 or 3 (cells per side); got {grid!r}.")
    if images.dim() != 4 or labels.shape != images.shape[:1]:
        raise ValueError(f"images must be (M, C, H, W) with labels (M,); got {tuple(images.shape)} and "
                         f"{tuple(labels.shape)}.")
    H, W = images.shape[-2:]
    if H % grid or W % grid:
        raise ValueError(f"the pictures' sides ({H}x{W}) must divide by grid={grid}, so that cells tile the grid.")
    classes = labels.long().unique()
    cells = grid * grid
    if len(classes) < cells:
        raise ValueError(f"a {grid}x{grid} grid needs {cells} distinct classes; the pictures have {len(classes)} "
                         "(lower the confidence threshold, or give more pictures).")
    by_class = {int(c): torch.nonzero(labels.long() == c).flatten() for c in classes}
    g = torch.Generator().manual_seed(seed)
    sources = torch.empty(n, cells, dtype=torch.long)
    for i in range(n):
        chosen = classes[torch.randperm(len(classes), generator=g)[:cells]]
        for k, c in enumerate(chosen.tolist()):
            pool = by_class[c]
            sources[i, k] = pool[int(torch.randint(0, len(pool), (1,), generator=g))]
    small = F.interpolate(images[sources.flatten()].float(), size=(H // grid, W // grid), mode="bilinear",
                          align_corners=False, antialias=True).view(n, grid, grid, images.shape[1], H // grid, W // grid)
    tiled = small.permute(0, 3, 1, 4, 2, 5).reshape(n, images.shape[1], H, W)
    return PointingGrids(tiled.to(images.dtype), labels.long()[sources], sources, grid)


def build_pointing_grids(forward_func: Any, images: Tensor, labels: Tensor, n: int, grid: int = 2,
                         confidence: float = 0.9, seed: int = 0, batch_size: int = 64) -> PointingGrids:
    """`make_pointing_grids` from the pictures ``forward_func`` classifies confidently (`confident_indices`);
    ``sources`` index ``images``."""
    keep = confident_indices(forward_func, images, labels, confidence, batch_size)
    if len(keep) == 0:
        raise ValueError(f"the model classifies none of the {images.shape[0]} pictures right with probability >= "
                         f"{confidence}; lower confidence or check the pictures' preprocessing.")
    grids = make_pointing_grids(images[keep], labels[keep], n, grid, seed)
    grids.sources = keep[grids.sources]
    return grids


@dataclass
class GridPointingResult:
    """What `evaluate_grid_pointing` found.

    ``grids``: how many were built; ``recognised``: how many the model
    recognises (every cell's class in its top ``g*g``); ``scored``: whether
    they were scored (`MIN_RECOGNISED_GRIDS`, `MIN_RECOGNISED_SHARE`), and if
    not ``reason``; ``summary``: ``{method: {"grid_pointing" | "grid_mass":
    {"mean", "lo", "hi", "n"}}}`` over the recognised grids; ``values`` the
    per-grid values; ``unsupported`` why a method did not run.
    """

    grids: int
    recognised: int
    grid: int
    scored: bool
    reason: str = ""
    values: Dict[str, Dict[str, Tensor]] = field(default_factory=dict)
    unsupported: Dict[str, str] = field(default_factory=dict)

    @property
    def chance(self) -> float:
        return 1.0 / (self.grid * self.grid)

    def summary(self, resamples: int = 1000, seed: int = 0) -> Dict[str, Dict[str, Dict[str, float]]]:
        return {m: {k: bootstrap_interval(v, resamples, seed=seed) for k, v in fields_.items()}
                for m, fields_ in self.values.items()}


def evaluate_grid_pointing(forward_func: Any, methods: Sequence[str], grids: PointingGrids, batch_size: int = 16,
                           progress: bool = True, method_options: Optional[Dict[str, Dict[str, Any]]] = None
                           ) -> GridPointingResult:
    """The grid pointing game for registry ``methods`` on the grids the model recognises.

    Returns a result with ``scored=False`` and the reason, and no values,
    when fewer than `MIN_RECOGNISED_GRIDS` grids or less than
    `MIN_RECOGNISED_SHARE` of them are recognised.
    """
    recognised = grids.recognised(forward_func)
    count, share = int(recognised.sum()), float(recognised.float().mean()) if len(grids) else 0.0
    result = GridPointingResult(len(grids), count, grids.grid, scored=False)
    if count < MIN_RECOGNISED_GRIDS or share < MIN_RECOGNISED_SHARE:
        result.reason = (f"the model recognises every cell's class (among its top {grids.grid ** 2}) on only {count} "
                         f"of {len(grids)} grids ({share:.0%}); maps of classes it does not see there would be "
                         "scored, so the grids are not scored.")
        return result
    kept = grids.subset(recognised)
    run = evaluate(forward_func, list(methods), kept.batches(batch_size), ["grid_pointing"], use_labels=True,
                   progress=progress, method_options=method_options)
    result.scored, result.values, result.unsupported = True, run.values, run.unsupported
    return result
