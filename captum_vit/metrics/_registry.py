"""Every metric by name: what it measures, which way is better, what it needs, how one batch is scored.

The evaluation runner (`captum_vit.metrics.evaluate`) takes metrics from
this one registry. A metric reads an `ExplainedBatch` (the images, the
explained classes, their maps, and what the data provides) and returns
per-image values, one ``(N,)`` tensor per field. ``needs`` says what the data
must provide: ``"boxes"`` (ground-truth boxes), ``"evidence"`` (known-evidence
canvases: marks, pairs, distractors), ``"grid"`` (pointing-game grids,
`captum_vit.metrics.PointingGrids.batches`) or ``"randomized"`` (the cascade
of randomised models the runner builds when asked).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ._adcc import ADCCResult, adcc, adcc_score
from ._deletion import deletion_insertion
from ._evidence import evidence_mass, rank_correlation, top_pixel_inside
from ._localization import box_localization, box_mask


@dataclass
class ExplainedBatch:
    """One batch of one method, as metrics read it.

    ``images`` ``(N, C, H, W)`` on the device, ``target`` ``(N,)`` the explained
    classes, ``maps`` ``(N, 1, h, w)`` their explanations (made on first read,
    detached, on the CPU); ``boxes``: per image a list of ``(x0, y0, x1, y1)``;
    ``extra``: what else the data carries (known-evidence canvases: 4-D
    tensors and ``*_target`` tensors on the device); ``explain(inputs,
    target)`` the method; ``forward_func`` the model; ``randomized`` the
    ``(stage, explain)`` pairs of the cascading randomisation; ``options``
    the runner's metric options (``deletion_steps``, ``baseline``,
    ``pointing_margin``).
    """

    images: Tensor
    target: Tensor
    explain: Callable[[Tensor, Tensor], Tensor]
    forward_func: Callable[..., Any]
    boxes: Optional[List[List[Tuple[int, int, int, int]]]] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    randomized: Sequence[Tuple[str, Callable[[Tensor, Tensor], Tensor]]] = ()
    options: Dict[str, Any] = field(default_factory=dict)

    @functools.cached_property
    def maps(self) -> Tensor:
        """The method's maps of ``target``, made when a metric first reads them (ADCC makes its own)."""
        return self.explain(self.images, self.target).detach().cpu()

    def box_masks(self, grow: int = 0) -> Tensor:
        """``(N, H, W)`` bool: each image's boxes, grown by ``grow`` pixels, clipped to the image."""
        if self.boxes is None:
            raise ValueError("this metric needs ground-truth boxes: give (image, label, boxes) items or a boxes file "
                             "(CLI: --boxes).")
        H, W = self.images.shape[-2:]
        grown = [[(x0 - grow, y0 - grow, x1 + grow, y1 + grow) for x0, y0, x1, y1 in boxes] for boxes in self.boxes]
        return torch.from_numpy(np.stack([box_mask(b, H, W) for b in grown]))


@dataclass(frozen=True)
class FieldSpec:
    """One per-image value a metric returns: its name, what it measures and which way is better.

    A name with ``{stage}`` is one field per randomisation stage (``spearman/{stage}``).
    """

    name: str
    description: str
    higher_is_better: bool = True
    #: a figure of tables and plots (``False``: a per-image flag, kept in the records only)
    shown: bool = True

    def describe(self, field_name: str) -> str:
        """The description of ``field_name`` (a stage field names its stage)."""
        if "{stage}" not in self.name:
            return self.description
        return f"{self.description} ({field_name[len(self.name.split('{stage}')[0]):]})"

    def named(self, stages: Sequence[str] = ()) -> Tuple[str, ...]:
        return tuple(self.name.format(stage=s) for s in stages) if "{stage}" in self.name else (self.name,)

    def matches(self, field_name: str) -> bool:
        if "{stage}" not in self.name:
            return field_name == self.name
        prefix = self.name.split("{stage}")[0]
        return field_name.startswith(prefix) and len(field_name) > len(prefix)


@dataclass(frozen=True)
class AggregateSpec:
    """A figure of the whole dataset computed from the per-image means of some fields (no interval)."""

    name: str
    description: str
    inputs: Tuple[str, ...]
    compute: Callable[..., Tensor] = field(repr=False)
    higher_is_better: bool = True


@dataclass(frozen=True)
class MetricSpec:
    """One registry entry: ``compute(batch) -> {field: (N,) values}``, every field described in ``fields``.

    ``needs``: what the data must provide (see the module docstring); ``"randomized"`` makes the runner
    build the cascade of randomised models.
    """

    name: str
    description: str
    compute: Callable[[ExplainedBatch], Dict[str, Tensor]] = field(repr=False)
    fields: Tuple[FieldSpec, ...] = ()
    needs: FrozenSet[str] = frozenset()
    #: figures of the whole dataset the reports add (the ADCC of the means of its parts)
    aggregates: Tuple[AggregateSpec, ...] = ()

    def output_fields(self, stages: Sequence[str] = ()) -> Tuple[str, ...]:
        return tuple(name for f in self.fields for name in f.named(stages))


def _adcc(batch: ExplainedBatch) -> Dict[str, Tensor]:
    result = adcc(batch.forward_func, batch.explain, batch.images, batch.target,
                  baseline=batch.options.get("baseline", 0.0))
    return {k: v.float() for k, v in vars(result).items()}


def _deletion_insertion(batch: ExplainedBatch) -> Dict[str, Tensor]:
    deletion, insertion = deletion_insertion(batch.forward_func, batch.images, batch.maps.to(batch.images.device),
                                             batch.target, steps=batch.options.get("deletion_steps", 16),
                                             baseline=batch.options.get("baseline", 0.0))
    return {"deletion": deletion.cpu(), "insertion": insertion.cpu()}


def _pointing(batch: ExplainedBatch) -> Dict[str, Tensor]:
    return {"pointing": top_pixel_inside(batch.maps, batch.box_masks(batch.options.get("pointing_margin", 0)))}


def _mass(batch: ExplainedBatch) -> Dict[str, Tensor]:
    return {"evidence_mass": evidence_mass(batch.maps, batch.box_masks())}


def _boxes(batch: ExplainedBatch) -> Dict[str, Tensor]:
    scores = box_localization(batch.maps, batch.boxes, size=tuple(batch.images.shape[-2:]))  # type: ignore[arg-type]
    return {k: scores[k] for k in ("iou", "dice", "pixel_accuracy")}


def _constant(batch: ExplainedBatch) -> Dict[str, Tensor]:
    flat = batch.maps.flatten(1)
    return {"constant": (flat.max(1).values - flat.min(1).values <= 0).float()}


def _pair(batch: ExplainedBatch) -> Dict[str, Tensor]:
    pair = batch.extra
    first = batch.explain(pair["pair_images"], pair["pair_target"]).detach().cpu()
    second = batch.explain(pair["pair_images"], pair["pair_second_target"]).detach().cpu()
    near, second_near = pair["pair_near"], pair["pair_second_near"]
    own_first = top_pixel_inside(first, near) * (1 - top_pixel_inside(first, second_near))
    own_second = top_pixel_inside(second, second_near) * (1 - top_pixel_inside(second, near))
    return {"pair_pointing": (own_first + own_second) / 2}


def _distractor(batch: ExplainedBatch) -> Dict[str, Tensor]:
    extra = batch.extra
    maps = batch.explain(extra["distractor_images"], extra["distractor_target"]).detach().cpu()
    on_mark = top_pixel_inside(maps, extra["distractor_mark_near"])
    return {"distractor_pointing": on_mark * (1 - top_pixel_inside(maps, extra["distractor_near"])),
            "distractor_mass": evidence_mass(maps, extra["distractor_mask"])}


def grid_scores(explain: Any, images: Tensor, cell_targets: Tensor, cells: Tensor) -> Dict[str, Tensor]:
    """Pointing and mass of each grid, ``(N,)`` each: the means over its cells.

    Args:
        explain: ``(inputs, target) -> (N, 1, h, w)`` maps.
        images: ``(N, C, H, W)`` grids; ``cell_targets``: ``(N, K)`` classes;
        cells: ``(N, K, H, W)`` bool, each cell's pixels.
    """
    pointing, mass = [], []
    for k in range(cell_targets.shape[1]):
        maps = explain(images, cell_targets[:, k]).detach().cpu()
        pointing.append(top_pixel_inside(maps, cells[:, k]))
        mass.append(evidence_mass(maps, cells[:, k]))
    return {"grid_pointing": torch.stack(pointing, 1).mean(1), "grid_mass": torch.stack(mass, 1).mean(1)}


def _grid_pointing(batch: ExplainedBatch) -> Dict[str, Tensor]:
    return grid_scores(batch.explain, batch.images, batch.extra["grid_target"], batch.extra["grid_cells"])


def _randomization(batch: ExplainedBatch) -> Dict[str, Tensor]:
    return {f"spearman/{stage}": rank_correlation(batch.maps, explain(batch.images, batch.target).detach().cpu())
            for stage, explain in batch.randomized}


_ADCC_FIELDS = {
    "average_drop": FieldSpec("average_drop", "ADCC's Average Drop: the probability lost on the map-masked image",
                              higher_is_better=False),
    "average_increase": FieldSpec("average_increase", "ADCC's Average Increase: the masked image scores higher"),
    "coherency": FieldSpec("coherency", "ADCC's Coherency: the map of the masked image correlates with the map"),
    "complexity": FieldSpec("complexity", "ADCC's Complexity: the map's mean value", higher_is_better=False),
    "adcc": FieldSpec("adcc", "mean of each image's ADCC (harmonic mean of coherency, 1 - complexity, 1 - average "
                      "drop)"),
    "constant_map": FieldSpec("constant_map", "ADCC's flag: the map (or the masked image's) is constant",
                              higher_is_better=False, shown=False),
}
_ADCC_OF_MEANS = AggregateSpec(
    "adcc_of_means", "ADCC of the dataset means of its parts (the ViT-ReciproCAM paper's Table 1 figure)",
    ("average_drop", "coherency", "complexity"), lambda drop, coherency, complexity: adcc_score(drop, coherency,
                                                                                              complexity))

_SPECS = (
    MetricSpec("evidence_mass", "share of the map's positive mass inside the boxes (or the decisive mark)", _mass,
               (FieldSpec("evidence_mass", "share of the map's positive mass inside the boxes (or the decisive "
                          "mark)"),), needs=frozenset({"boxes"})),
    MetricSpec("pointing", "the map's maximum lies in a box (within pointing_margin pixels)", _pointing,
               (FieldSpec("pointing", "the map's maximum lies in a box (within pointing_margin pixels)"),),
               needs=frozenset({"boxes"})),
    MetricSpec("boxes", "IoU, Dice and pixel accuracy of the thresholded map's boxes (AGCAM protocol)", _boxes,
               (FieldSpec("iou", "IoU of the thresholded map's boxes with the ground truth"),
                FieldSpec("dice", "Dice of the thresholded map's boxes with the ground truth"),
                FieldSpec("pixel_accuracy", "pixel accuracy of the thresholded map's boxes")),
               needs=frozenset({"boxes"})),
    MetricSpec("deletion", "deletion and insertion AUC (pixels to the baseline in the map's order)",
               _deletion_insertion,
               (FieldSpec("deletion", "deletion AUC: the target's probability as the map's pixels are removed",
                          higher_is_better=False),
                FieldSpec("insertion", "insertion AUC: the target's probability as the map's pixels are revealed"))),
    MetricSpec("adcc", "Average Drop, Average Increase, Coherency, Complexity and ADCC (Poppi et al.)", _adcc,
               tuple(_ADCC_FIELDS[f.name] for f in fields(ADCCResult)), aggregates=(_ADCC_OF_MEANS,)),
    MetricSpec("pair", "class-specific pointing on two-mark canvases (known evidence)", _pair,
               (FieldSpec("pair_pointing", "class-specific pointing on two-mark canvases (known evidence)"),),
               needs=frozenset({"evidence"})),
    MetricSpec("distractor", "pointing past, and mass on, a distractor (known evidence)", _distractor,
               (FieldSpec("distractor_pointing", "the maximum is on the decisive mark, not on the distractor"),
                FieldSpec("distractor_mass", "share of positive map mass inside the distractor",
                          higher_is_better=False)), needs=frozenset({"evidence"})),
    MetricSpec("grid_pointing", "grid pointing game: each cell's class's map peaks in (and puts its mass on) that "
               "cell", _grid_pointing,
               (FieldSpec("grid_pointing", "grid pointing game: share of cells whose class's map peaks inside the "
                          "cell"),
                FieldSpec("grid_mass", "grid pointing game: share of each cell's class's positive map mass inside "
                          "the cell")), needs=frozenset({"grid"})),
    MetricSpec("constant", "the map is constant: it carries no ordering at all", _constant,
               (FieldSpec("constant", "the map is constant: it carries no ordering at all", higher_is_better=False),)),
    MetricSpec("randomization", "Spearman of the map with the map of the model randomised from the head down",
               _randomization,
               (FieldSpec("spearman/{stage}", "Spearman of the map with the map of the model randomised down to "
                          "the stage (lower: the map depends on the weights)", higher_is_better=False),),
               needs=frozenset({"randomized"})),
)

#: name -> entry
METRICS: Dict[str, MetricSpec] = {spec.name: spec for spec in _SPECS}
#: per-image field -> (what it measures, True when higher is better), from the entries' `FieldSpec`s
FIELDS: Dict[str, Tuple[str, bool]] = {f.name: (f.description, f.higher_is_better)
                                       for spec in _SPECS for f in spec.fields}


#: every aggregate any registry metric adds, by name
AGGREGATES: Dict[str, AggregateSpec] = {a.name: a for spec in _SPECS for a in spec.aggregates}


def field_spec(field_name: str) -> FieldSpec:
    """The `FieldSpec` of a per-image field any registry metric returns (``spearman/<stage>`` too)."""
    for spec in _SPECS:
        for f in spec.fields:
            if f.matches(field_name):
                return f
    raise KeyError(f"no registry metric returns a field {field_name!r}.")


def higher_is_better(field_name: str) -> bool:
    """Which way ``field_name`` is better, as its metric's `FieldSpec` says."""
    return field_spec(field_name).higher_is_better


#: names that select an entry by one of its fields, or a group of entries
ALIASES: Dict[str, Tuple[str, ...]] = {
    "insertion": ("deletion",), "iou": ("boxes",), "dice": ("boxes",),
    "known_evidence": ("evidence_mass", "pointing", "boxes", "deletion", "adcc", "pair", "distractor", "constant"),
}


def resolve_metrics(names: Sequence[str]) -> List[MetricSpec]:
    """Registry entries for ``names`` (entry names, or `ALIASES`), in order, each once; checked."""
    specs: List[MetricSpec] = []
    for name in names:
        keys = ALIASES.get(name, (name,))
        for key in keys:
            if key not in METRICS:
                raise ValueError(f"unknown metric {name!r}; choose from {', '.join([*METRICS, *ALIASES])}.")
            if METRICS[key] not in specs:
                specs.append(METRICS[key])
    if not specs:
        raise ValueError("give at least one metric.")
    return specs
