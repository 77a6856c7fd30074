"""The token masks of ViT-ReciproCAM and the few values they take (docs/methods.md 1.2)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .._utils import check_choice

KERNELS = ("gaussian", "dirac")

#: The paper's 3x3 spatial kernel: binomial weights / 16, centre weight 0.25.
GAUSSIAN_3X3 = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16.0


def reciprocal_masks(
    grid: Tuple[int, int],
    num_prefix_tokens: int,
    kernel: str = "gaussian",
    keep_prefix_tokens: bool = True,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The ``(h*w, P + h*w)`` token masks of ViT-ReciproCAM (docs/methods.md 1.2).

    Row ``k = i*w + j`` is the mask of grid cell ``(i, j)``: the 3x3 binomial
    kernel centred there, cropped at the border and not renormalised
    (``"gaussian"``), or a one at the cell (``"dirac"``); prefix tokens get 1
    (``keep_prefix_tokens``) or 0.
    """
    check_choice(kernel, "kernel", KERNELS)
    h, w = grid
    K = h * w
    spatial = torch.eye(K, device=device, dtype=torch.float32).view(K, 1, h, w)
    if kernel == "gaussian":
        weight = GAUSSIAN_3X3.to(device=device).view(1, 1, 3, 3)
        spatial = F.conv2d(spatial, weight, padding=1)  # zero padding crops at the border
    prefix = torch.full((K, num_prefix_tokens), 1.0 if keep_prefix_tokens else 0.0, device=device)
    return torch.cat([prefix, spatial.view(K, K)], dim=1).to(dtype)


def mask_levels(masks: Tensor) -> Tuple[Tensor, Tensor]:
    """The distinct values of ``masks`` and, for every entry, the index of its value.

    Returns ``(levels, level_index)``: ``(V,)`` sorted values (0, 1/16, 1/8,
    1/4 and 1 for the gaussian kernel; 0 and 1 for dirac) and a ``(c, T)``
    long tensor with ``levels[level_index] == masks``. A per-token projection
    of ``m * z_t`` then needs only the ``V`` projections of ``level * z``.
    """
    levels = torch.unique(masks)
    return levels, torch.searchsorted(levels, masks)  # exact: every entry is one of the levels
