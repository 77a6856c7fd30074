"""The known-evidence evaluation: every method on canvases whose deciding pixels are known.

See ``docs/methods.md`` section 7 and ``benchmarks/evidence.py``. Runs in one
process, or under ``torchrun`` with an initialised ``torch.distributed``
group: rank ``r`` of ``W`` computes batches ``b`` with ``b % W == r`` (the
same batches a single process forms, so the per-image values are the same
numbers) and every rank receives the merged result.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._adcc import adcc
from ._checkpoint import CheckpointDirectory, model_fingerprint, tensor_digest
from ._deletion import deletion_insertion
from ._evaluate import distributed_rank_and_size, from_every_rank
from ._evidence import (
    bootstrap_interval,
    cascading_randomization,
    evidence_mass,
    rank_correlation,
    top_pixel_inside,
)
from ._localization import box_localization, box_mask

#: pointing counts a hit within this many pixels of the mark (half a patch of the 64x64 canvases)
POINTING_GROW = 4

#: metric -> (what it measures, True when higher is better)
KNOWN_EVIDENCE_METRICS: Dict[str, Tuple[str, bool]] = {
    "evidence_mass": ("single: share of positive map mass inside the decisive mark", True),
    "pointing": ("single: the map's maximum lies within 4 px of the decisive mark", True),
    "iou": ("single: IoU of the thresholded map's boxes with the mark (AGCAM protocol)", True),
    "dice": ("single: Dice of the thresholded map's boxes with the mark (AGCAM protocol)", True),
    "deletion": ("single: deletion AUC (pixels to grey in the map's order)", False),
    "insertion": ("single: insertion AUC", True),
    "adcc": ("single: ADCC", True),
    "pair_pointing": ("pair: each class's map points at its own mark and not at the other", True),
    "distractor_pointing": ("distractor: the maximum is on the decisive mark, not on the distractor", True),
    "distractor_mass": ("distractor: share of positive map mass inside the distractor", False),
    "constant": ("single: the map is constant (it carries no ordering at all)", False),
}


@dataclass
class KnownEvidenceResult:
    """Per-image values of every method and metric.

    ``values[method][metric]`` is ``(n,)``; metrics ``spearman/<stage>`` hold
    the rank correlation of the trained model's map with the map of the model
    randomised down to ``<stage>`` (lower: the map depends more on the
    weights). ``unsupported[method]`` says why a method did not run on this
    model. ``accuracy[variant]``: the model's accuracy on the canvases.
    """

    n: int
    accuracy: Dict[str, float]
    values: Dict[str, Dict[str, Tensor]] = field(default_factory=dict)
    unsupported: Dict[str, str] = field(default_factory=dict)
    stages: List[str] = field(default_factory=list)

    def summary(self, resamples: int = 1000, seed: int = 0) -> Dict[str, Dict[str, Dict[str, float]]]:
        """``{method: {metric: {"mean", "lo", "hi", "n"}}}``, 95 % percentile bootstrap over images."""
        return {m: {k: bootstrap_interval(v, resamples, seed=seed) for k, v in metrics.items()}
                for m, metrics in self.values.items()}


def _grown(box: Tuple[int, int, int, int], grow: int = POINTING_GROW) -> Tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    return x0 - grow, y0 - grow, x1 + grow, y1 + grow


def _box_masks(boxes: Sequence[Tuple[int, int, int, int]], size: int) -> Tensor:
    """``(N, size, size)`` bool, one box per image, clipped to the canvas."""
    return torch.from_numpy(np.stack([box_mask([box], size, size) for box in boxes]))


class KnownEvidenceCanvases:
    """One variant's canvases (:func:`captum_vit.evidence.make_canvases`) with the masks every metric needs.

    Attributes: ``images`` ``(N, 3, 64, 64)``; ``target`` ``(N,)`` the first
    decisive mark's class and ``boxes`` its boxes; ``mark`` ``(N, 64, 64)`` its
    pixels and ``near`` the same grown by :data:`POINTING_GROW`; for *pair*
    ``second_target``/``second_near``; for *distractor* ``distractor`` and
    ``distractor_near``. Slice them by batch.
    """

    def __init__(self, batch: Any, size: int) -> None:
        self.images = batch.images
        first = [marks[0] for marks in batch.boxes]
        self.target = torch.tensor([c for c, _ in first])
        self.boxes = [box for _, box in first]
        self.mark = _box_masks(self.boxes, size)
        self.near = _box_masks([_grown(b) for b in self.boxes], size)
        if all(len(marks) > 1 for marks in batch.boxes):
            self.second_target = torch.tensor([marks[1][0] for marks in batch.boxes])
            self.second_near = _box_masks([_grown(m[1][1]) for m in batch.boxes], size)
        if all(batch.distractors):
            self.distractor = _box_masks([d[0][1] for d in batch.distractors], size)
            self.distractor_near = _box_masks([_grown(d[0][1]) for d in batch.distractors], size)


def evaluate_known_evidence(
    model: nn.Module,
    methods: Sequence[str],
    backgrounds: Tensor,
    n: int = 200,
    batch_size: int = 50,
    seed: int = 2024,
    randomization: bool = True,
    deletion_steps: int = 16,
    device: Optional[torch.device | str] = None,
    progress: bool = True,
    checkpoint_dir: Optional[str | Path] = None,
    restart: bool = False,
) -> KnownEvidenceResult:
    """Score each registry method on ``n`` canvases of each variant (:mod:`captum_vit.evidence`).

    Args:
        model: a classifier of the canvases' six mark colours (e.g.
            :func:`captum_vit.evidence.load_evidence_model`), mapping
            ``(B, 3, 64, 64)`` to ``(B, 6)`` logits.
        methods: names from :data:`captum_vit.methods.METHODS`; each runs
            with the registry's defaults and explains the true class.
        backgrounds: ``(M, 3, h, w)`` pictures in ``[0, 1]`` behind the marks
            (held-out ones: :func:`captum_vit.evidence.evidence_backgrounds`).
        n: canvases per variant (*single*, *pair*, *distractor*).
        batch_size: canvases per batch, the unit of work shared out across
            ranks; the result does not depend on it except through the
            random control's draws.
        seed: canvases from ``seed``, ``seed + 1``, ``seed + 2``; the random
            control and the randomised model are seeded from it too.
        randomization: also run the cascading model-randomisation control.
        deletion_steps: points of the deletion and insertion curves.
        device: where the canvases go (default: the model's device; the
            model is not moved).
        progress: show a progress bar (rank 0 only).
        checkpoint_dir: if given, each method's finished batches are written
            to ``checkpoint_dir/<method>/batch_*.pt`` (with a manifest of the
            run, as :func:`captum_vit.metrics.evaluate_adcc` does) and reused
            by a later call of the same run; under ``torchrun`` each rank
            writes its own batches there.
        restart: delete ``checkpoint_dir``'s results of these methods first.

    Returns:
        :class:`KnownEvidenceResult`; ``.summary()`` gives means with 95 %
        bootstrap intervals.
    """
    from .. import __version__
    from ..adapters import UnsupportedModelError
    from ..evidence import CANVAS, make_canvases
    from ..methods import REGISTRY, explainer

    unknown = [m for m in methods if m not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(REGISTRY)}.")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer; got {n!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    variants = {name: KnownEvidenceCanvases(make_canvases(backgrounds, name, n, seed + k), CANVAS)
                for k, name in enumerate(("single", "pair", "distractor"))}
    rank, world = distributed_rank_and_size()
    batches = [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    mine = [b for b in range(len(batches)) if b % world == rank]

    accuracy = _accuracy(model, variants, device)
    result = KnownEvidenceResult(n=n, accuracy=accuracy)
    # the randomised models, built once: depth + 2 copies of a tiny canvas model
    cascade = ([(stage, copy.deepcopy(randomised)) for stage, randomised in cascading_randomization(model, seed=seed)]
               if randomization else [])
    result.stages = [stage for stage, _ in cascade]
    fields = list(KNOWN_EVIDENCE_METRICS) + [f"spearman/{stage}" for stage in result.stages]
    bar = tqdm(total=len(methods) * len(mine), desc="known evidence", disable=not progress or rank != 0)
    parts: Dict[Tuple[str, str, int], Tensor] = {}
    for method in methods:
        try:
            probe = explainer(method, model)  # a method that refuses this model does so here
        except UnsupportedModelError as error:
            result.unsupported[method] = str(error)
            bar.update(len(mine))
            continue
        checkpoints = None
        if checkpoint_dir is not None:
            identity = {"method": probe.identity, "model": model_fingerprint(model), "n": n,
                        "seed": seed, "randomization": bool(randomization), "deletion_steps": deletion_steps,
                        "captum_vit_version": __version__, "num_batches": len(batches)}
            checkpoints = CheckpointDirectory(Path(checkpoint_dir) / method, identity, restart=restart)
            checkpoints.check_manifest(batch_size)
        for b in mine:
            rows = batches[b]
            digest = tensor_digest(*(v.images[rows] for v in variants.values()))
            scores = checkpoints.load(b, digest, fields) if checkpoints is not None else None
            if scores is None:
                explain = explainer(method, model, seed=seed + b)
                scores, maps = _score_batch(model, explain, variants, rows, device, deletion_steps)
                single = variants["single"]
                for index, (stage, randomised) in enumerate(cascade):
                    explain = explainer(method, randomised, seed=seed + 10_000 * (index + 1) + b)
                    random_maps = explain(single.images[rows].to(device), single.target[rows].to(device))
                    scores[f"spearman/{stage}"] = rank_correlation(maps, random_maps.detach().cpu())
                if checkpoints is not None:
                    checkpoints.save(b, digest, scores)
            parts.update({(method, k, b): v for k, v in scores.items()})
            bar.update()
    bar.close()
    if world > 1:  # every rank gets every batch, keyed by batch index
        parts = {k: v for part in from_every_rank(parts) for k, v in part.items()}
        result.unsupported = {k: v for part in from_every_rank(result.unsupported) for k, v in part.items()}
    metrics: Dict[str, Dict[str, None]] = {}
    for method, metric, _ in parts:  # every method's metrics, in the order they were computed
        metrics.setdefault(method, {})[metric] = None
    result.values = {m: {k: torch.cat([parts[m, k, b] for b in range(len(batches))]) for k in metrics[m]}
                     for m in methods if m in metrics}
    return result


@torch.no_grad()
def _accuracy(model: nn.Module, variants: Dict[str, KnownEvidenceCanvases], device: torch.device) -> Dict[str, float]:
    out = {}
    for name, v in variants.items():
        logits = model(v.images.to(device)).float().cpu()
        if name == "pair":  # both marks are the two highest logits
            top2 = logits.topk(2, dim=1).indices.sort(1).values
            truth = torch.stack([v.target, v.second_target], 1).sort(1).values
            out[name] = (top2 == truth).all(1).float().mean().item()
        else:
            out[name] = (logits.argmax(1) == v.target).float().mean().item()
    return out


def _score_batch(
    model: nn.Module, explain: Any, variants: Dict[str, KnownEvidenceCanvases], rows: slice, device: torch.device, steps: int
) -> Tuple[Dict[str, Tensor], Tensor]:
    single, pair, distractor = variants["single"], variants["pair"], variants["distractor"]
    x, t = single.images[rows].to(device), single.target[rows].to(device)
    maps = explain(x, t).detach().cpu()
    scores = {"evidence_mass": evidence_mass(maps, single.mark[rows]),
              "pointing": top_pixel_inside(maps, single.near[rows])}
    boxes = box_localization(maps, [[box] for box in single.boxes[rows]], size=tuple(single.mark.shape[-2:]))
    scores["iou"], scores["dice"] = boxes["iou"], boxes["dice"]
    deletion, insertion = deletion_insertion(model, x, maps.to(device), t, steps=steps)
    scores["deletion"], scores["insertion"] = deletion.cpu(), insertion.cpu()
    scores["adcc"] = adcc(model, explain, x, t).adcc

    xp = pair.images[rows].to(device)
    first = explain(xp, pair.target[rows].to(device)).detach().cpu()
    second = explain(xp, pair.second_target[rows].to(device)).detach().cpu()
    own_first = top_pixel_inside(first, pair.near[rows]) * (1 - top_pixel_inside(first, pair.second_near[rows]))
    own_second = top_pixel_inside(second, pair.second_near[rows]) * (1 - top_pixel_inside(second, pair.near[rows]))
    scores["pair_pointing"] = (own_first + own_second) / 2

    xd = distractor.images[rows].to(device)
    dmaps = explain(xd, distractor.target[rows].to(device)).detach().cpu()
    on_mark = top_pixel_inside(dmaps, distractor.near[rows])
    scores["distractor_pointing"] = on_mark * (1 - top_pixel_inside(dmaps, distractor.distractor_near[rows]))
    scores["distractor_mass"] = evidence_mass(dmaps, distractor.distractor[rows])
    flat = maps.flatten(1)
    scores["constant"] = (flat.max(1).values - flat.min(1).values <= 0).float()
    return {k: v.float() for k, v in scores.items()}, maps
