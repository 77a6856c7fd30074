"""ViT-ReciproCAM: `LayerReciproCAM` over one engine (masks, copy plan, two exact strategies).

- `._masks`: the token masks and their levels;
- `._plan`: which copies of which images one forward pass carries;
- `._copies`: what a masked copy of a block computes (the three
  residuals; projections shared by all copies; prefix rows only);
- `._options`: the options of one explanation and the copies' scores;
- `._strategies`: the two exact ways to compute the copies;
- `._engine`: the choice of strategy, its proof by behaviour, the scores;
- `._layer`: Captum's contract (`LayerReciproCAM`).

`captum_vit.export.ExplainedViT` builds its hook-free forward from
the same pieces.
"""

from ._copies import (
    RESIDUALS,
    FoldedInput,
    SharedProjections,
    copy_block_rows,
    folded_mlp_branch,
    prefix_block_rows,
    residual_rows,
)
from ._engine import ReciproCAMEngine
from ._layer import LayerReciproCAM
from ._masks import GAUSSIAN_3X3, KERNELS, mask_levels, reciprocal_masks
from ._options import PATHS, SCORES, ReciproCAMOptions, score_copies
from ._plan import CopySelection, plan_copies

__all__ = [
    "CopySelection", "FoldedInput", "GAUSSIAN_3X3", "KERNELS", "LayerReciproCAM", "PATHS", "RESIDUALS",
    "ReciproCAMEngine",
    "ReciproCAMOptions", "SCORES", "SharedProjections", "mask_levels", "plan_copies", "reciprocal_masks",
    "copy_block_rows", "folded_mlp_branch", "prefix_block_rows", "residual_rows", "score_copies",
]
