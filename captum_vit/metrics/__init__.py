"""Metrics for explanation maps.

- `evaluate`: every method x every metric of `METRICS` over a
  dataset or loader, streamed (memory bounded by the batch), with a progress
  bar, per-batch checkpoints that record which run wrote them, resume,
  ``torchrun`` sharding with an exact merge, per-image records and bootstrap
  intervals (`EvaluationResult`);
- `adcc` (Average Drop, Average Increase, Coherency, Complexity, ADCC)
  and `evaluate_adcc`, its evaluation over a loader;
- `pointing_game` on 2x2 mosaics (`make_mosaic`) and
  `box_localization` (pixel accuracy, IoU, Dice);
- `deletion_insertion` curves;
- the grid pointing game (Boehle et al. 2022): `build_pointing_grids`
  (confidently classified pictures of distinct classes, 2x2 or 3x3),
  `evaluate_grid_pointing` (scores only grids the model recognises), and the
  registry metric ``grid_pointing``;
- leave-one-model-out selection of a method or setting
  (`leave_one_model_out`);
- where the evidence is known (`captum_vit.evidence` canvases):
  `evidence_mass`, `top_pixel_inside`, the model-randomisation
  control (`cascading_randomization`, `rank_correlation`),
  `bootstrap_interval`, and `evaluate_known_evidence`, which runs
  them all for every method, in one process or under ``torchrun``;
- Captum interop: `expand_to_input` (a ``(B, 1, h, w)`` map to the
  input's shape for ``captum.metrics.infidelity``), `patch_perturbation`
  and `input_attribution`; Quantus interop: `quantus_explain_func`.
"""

from ._adcc import ADCCResult, adcc, adcc_score, pearson
from ._checkpoint import MANIFEST, CheckpointDirectory, CheckpointMismatchError
from ._deletion import deletion_insertion
from ._distributed import join_torchrun
from ._evaluate import evaluate_adcc
from ._evidence import bootstrap_interval, cascading_randomization, evidence_mass, rank_correlation, top_pixel_inside
from ._grid import (
    GridPointingResult,
    PointingGrids,
    build_pointing_grids,
    confident_indices,
    evaluate_grid_pointing,
    make_pointing_grids,
)
from ._holdout import HeldOutChoice, leave_one_model_out, rank_candidates
from ._known_evidence import (
    KNOWN_EVIDENCE_METRICS,
    KnownEvidenceCanvases,
    KnownEvidenceResult,
    evaluate_known_evidence,
)
from ._localization import box_localization, boxes_from_map, make_mosaic, mosaic_cell_boxes, pointing_game
from ._maps import (
    as_explain_func,
    expand_to_input,
    input_attribution,
    patch_perturbation,
    quantus_explain_func,
    upsample_maps,
)
from ._registry import (
    AGGREGATES,
    ALIASES,
    FIELDS,
    METRICS,
    AggregateSpec,
    ExplainedBatch,
    FieldSpec,
    MetricSpec,
    field_spec,
    grid_scores,
)
from ._runner import DatasetItems, EvaluationBatch, EvaluationConfig, EvaluationResult, evaluate

__all__ = [
    "ADCCResult",
    "ALIASES",
    "DatasetItems",
    "EvaluationBatch",
    "EvaluationConfig",
    "EvaluationResult",
    "ExplainedBatch",
    "AGGREGATES",
    "AggregateSpec",
    "FIELDS",
    "FieldSpec",
    "field_spec",
    "grid_scores",
    "METRICS",
    "MetricSpec",
    "evaluate",
    "GridPointingResult",
    "HeldOutChoice",
    "leave_one_model_out",
    "rank_candidates",
    "PointingGrids",
    "build_pointing_grids",
    "confident_indices",
    "evaluate_grid_pointing",
    "grid_scores",
    "make_pointing_grids",
    "adcc",
    "adcc_score",
    "bootstrap_interval",
    "cascading_randomization",
    "evaluate_known_evidence",
    "evidence_mass",
    "KNOWN_EVIDENCE_METRICS",
    "KnownEvidenceCanvases",
    "KnownEvidenceResult",
    "rank_correlation",
    "top_pixel_inside",
    "CheckpointDirectory",
    "CheckpointMismatchError",
    "MANIFEST",
    "as_explain_func",
    "box_localization",
    "boxes_from_map",
    "deletion_insertion",
    "evaluate_adcc",
    "expand_to_input",
    "input_attribution",
    "join_torchrun",
    "make_mosaic",
    "mosaic_cell_boxes",
    "patch_perturbation",
    "pearson",
    "pointing_game",
    "quantus_explain_func",
    "upsample_maps",
]
