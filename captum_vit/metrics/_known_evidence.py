"""The known-evidence evaluation: every method on canvases whose deciding pixels are known.

See ``docs/methods.md`` section 7 and ``benchmarks/evidence.py``. Runs in one
process, or under ``torchrun`` with an initialised ``torch.distributed``
group: rank ``r`` of ``W`` computes batches ``b`` with ``b % W == r`` (the
same batches a single process forms, so the per-image values are the same
numbers) and every rank receives the merged result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ._evidence import (
    bootstrap_interval,
)
from ._localization import box_mask
from ._registry import FIELDS

#: pointing counts a hit within this many pixels of the mark (half a patch of the 64x64 canvases)
POINTING_GROW = 4

#: the fields the known-evidence evaluation keeps -> (what it measures, True when higher is better), as the
#: metric registry describes them (*pair*/*distractor* fields on those canvases, the rest on *single*)
KNOWN_EVIDENCE_METRICS: Dict[str, Tuple[str, bool]] = {
    name: FIELDS[name] for name in ("evidence_mass", "pointing", "iou", "dice", "deletion", "insertion", "adcc",
                                    "pair_pointing", "distractor_pointing", "distractor_mass", "constant")}


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
    """One variant's canvases (`captum_vit.evidence.make_canvases`) with the masks every metric needs.

    Attributes: ``images`` ``(N, 3, 64, 64)``; ``target`` ``(N,)`` the first
    decisive mark's class and ``boxes`` its boxes; ``mark`` ``(N, 64, 64)`` its
    pixels and ``near`` the same grown by `POINTING_GROW`; for *pair*
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
    """Score each registry method on ``n`` canvases of each variant (`captum_vit.evidence`).

    The known-evidence metrics of `captum_vit.metrics.evaluate` on canvases it makes.

    Args:
        model: a classifier of the canvases' six mark colours (e.g.
            `captum_vit.evidence.load_evidence_model`), mapping
            ``(B, 3, 64, 64)`` to ``(B, 6)`` logits.
        methods: names from `captum_vit.methods.METHODS`; each runs
            with the registry's defaults and explains the true class.
        backgrounds: ``(M, 3, h, w)`` pictures in ``[0, 1]`` behind the marks
            (held-out ones: `captum_vit.evidence.evidence_backgrounds`).
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
            run) and reused by a later call of the same run; under
            ``torchrun`` each rank writes its own batches there.
        restart: delete ``checkpoint_dir``'s results of these methods first.

    Returns:
        `KnownEvidenceResult`; ``.summary()`` gives means with 95 %
        bootstrap intervals.
    """
    from .. import __version__
    from ..evidence import CANVAS, make_canvases
    from ..methods import REGISTRY
    from ._runner import evaluate

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
    batches = [_evidence_batch(variants, slice(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    metrics = ["evidence_mass", "pointing", "boxes", "deletion", "adcc", "pair", "distractor", "constant"]
    identity = {"n": n, "seed": seed, "randomization": bool(randomization), "deletion_steps": deletion_steps,
                "captum_vit_version": __version__}
    result = evaluate(model, list(methods), batches, metrics + (["randomization"] if randomization else []),
                      use_labels=True, checkpoint_dir=checkpoint_dir, restart=restart, device=device,
                      progress=progress, seed=seed, deletion_steps=deletion_steps, pointing_margin=POINTING_GROW,
                      identity=identity)
    keep = [*KNOWN_EVIDENCE_METRICS, *(f"spearman/{stage}" for stage in result.stages)]
    return KnownEvidenceResult(
        n=n, accuracy=_accuracy(model, variants, device), unsupported=result.unsupported, stages=result.stages,
        values={m: {k: v[k] for k in keep if k in v} for m, v in result.values.items()},
    )


def _evidence_batch(variants: Dict[str, KnownEvidenceCanvases], rows: slice) -> Any:
    """One batch of the three variants, as the runner reads it (the *single* canvases are the images)."""
    from ._runner import EvaluationBatch

    single, pair, distractor = variants["single"], variants["pair"], variants["distractor"]
    extra = {
        "pair_images": pair.images[rows], "pair_target": pair.target[rows],
        "pair_second_target": pair.second_target[rows], "pair_near": pair.near[rows],
        "pair_second_near": pair.second_near[rows],
        "distractor_images": distractor.images[rows], "distractor_target": distractor.target[rows],
        "distractor_mark_near": distractor.near[rows], "distractor_near": distractor.distractor_near[rows],
        "distractor_mask": distractor.distractor[rows],
    }
    return EvaluationBatch(single.images[rows], single.target[rows], [[box] for box in single.boxes[rows]],
                           torch.arange(rows.start, rows.stop), extra)


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
