"""Localisation metrics: grid pointing game and box metrics (docs/methods.md section 5)."""

from __future__ import annotations

import warnings
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .._utils import check_batch_size, prepare_inputs, row_chunks
from ._maps import as_explain_func, as_map_batch, check_number, checked_maps, upsample_maps

Box = Tuple[int, int, int, int]  # (x0, y0, x1, y1), pixel corners, end exclusive


def make_mosaic(images: Tensor) -> Tensor:
    """A 2x2 mosaic ``(C, 2H, 2W)`` of four ``(C, H, W)`` images.

    Cell order: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right.
    """
    if images.dim() != 4 or images.shape[0] != 4:
        raise ValueError(f"make_mosaic needs four images (4, C, H, W); got {tuple(images.shape)}.")
    top = torch.cat([images[0], images[1]], dim=2)
    bottom = torch.cat([images[2], images[3]], dim=2)
    return torch.cat([top, bottom], dim=1)


def mosaic_cell_boxes(height: int, width: int) -> Tuple[Box, Box, Box, Box]:
    """The four cells of a ``height x width`` mosaic, as boxes in cell order."""
    h, w = height // 2, width // 2
    return ((0, 0, w, h), (w, 0, width, h), (0, h, w, height), (w, h, width, height))


def pointing_game(
    explain_func: Any,
    mosaics: Tensor,
    cell_targets: Tensor,
    batch_size: Optional[int] = None,
) -> Tensor:
    """Grid pointing game: share of positive attribution inside the target's cell.

    Args:
        explain_func: Captum ``Attribution`` or callable ``(inputs, target) -> maps``.
        mosaics: ``(N, C, 2H, 2W)`` mosaics of four images of distinct classes.
        cell_targets: ``(N, 4)`` the class of each cell, in cell order.
        batch_size: mosaics per explainer call.

    Returns:
        ``(N, 4)`` scores: for each cell's class, the sum of the positive part
        of its map inside that cell over the sum everywhere, on the map's own
        grid when its sides are even (cell borders on patch borders), else on
        the map upsampled to the mosaic. 1.0 is perfect, 0.25 is chance; an
        all-zero map scores 0.
    """
    mosaics = prepare_inputs(mosaics).images
    cell_targets = _cell_targets(cell_targets, mosaics.shape[0])
    check_batch_size(batch_size)
    explain = as_explain_func(explain_func)
    scores = torch.zeros(mosaics.shape[0], 4)
    for rows in row_chunks(mosaics.shape[0], batch_size):
        x = mosaics[rows]
        for cell in range(4):
            maps = checked_maps(explain(x, cell_targets[rows, cell].to(x.device)), x.shape[0], "pointing_game")
            positive = _cell_resolution(maps, mosaics.shape[-2:]).clamp_min(0)[:, 0]
            x0, y0, x1, y1 = mosaic_cell_boxes(*positive.shape[-2:])[cell]
            inside = positive[:, y0:y1, x0:x1].flatten(1).sum(1)
            total = positive.flatten(1).sum(1)
            scores[rows, cell] = torch.where(total > 0, inside / total.clamp_min(1e-12), torch.zeros_like(total)).cpu()
    return scores


def _cell_targets(cell_targets: Any, n: int) -> Tensor:
    if isinstance(cell_targets, (list, tuple)) or hasattr(cell_targets, "__array__") and not isinstance(
        cell_targets, Tensor
    ):
        try:
            cell_targets = torch.as_tensor(np.asarray(cell_targets))
        except (TypeError, ValueError) as err:
            raise ValueError(f"cell_targets must be N rows of 4 class indices: {err}") from None
    if not isinstance(cell_targets, Tensor) or cell_targets.is_floating_point() or cell_targets.dtype == torch.bool:
        raise TypeError("cell_targets must hold integer class indices: an (N, 4) tensor or N lists of 4 ints.")
    if tuple(cell_targets.shape) != (n, 4):
        raise ValueError(
            f"cell_targets must be (N, 4), the class of each mosaic cell for each of the {n} mosaics; "
            f"got shape {tuple(cell_targets.shape)}."
        )
    return cell_targets.long()


def _cell_resolution(maps: Any, size: Sequence[int]) -> Tensor:
    """Maps on a grid whose cells split evenly in two are used as they are.

    A patch-grid map with even sides has the mosaic's cell borders on patch
    borders, so shares are exact there; bilinear upsampling would leak mass
    across the border. Other maps are upsampled to the mosaic.
    """
    raw = as_map_batch(maps)
    if raw.shape[-1] % 2 == 0 and raw.shape[-2] % 2 == 0:
        return raw
    return upsample_maps(raw, size, normalize=False)


def boxes_from_map(heatmap: np.ndarray, threshold: float = 0.5) -> list:
    """Bounding boxes of the 8-connected regions of ``heatmap > threshold``.

    A region's box equals the box of its external contour, so the union of
    these boxes is the AGCAM evaluation's "union of the bounding boxes of the
    external contours".
    """
    from scipy import ndimage

    labels, _ = ndimage.label(heatmap > threshold, structure=np.ones((3, 3), dtype=int))
    return [(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in ndimage.find_objects(labels) if s is not None]


def box_mask(boxes: Sequence[Box], height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        mask[max(0, y0) : min(height, y1), max(0, x0) : min(width, x1)] = True
    return mask


def _check_boxes(gt_boxes: Sequence[Sequence[Box]], size: Tuple[int, int]) -> None:
    """Every box is ``(x0, y0, x1, y1)`` with ``x0 < x1`` and ``y0 < y1``, and meets the ``(H, W)`` image."""
    H, W = size
    for i, boxes in enumerate(gt_boxes):
        for box in boxes:
            if len(box) != 4:
                raise ValueError(f"image {i}: box {box!r} must be (x0, y0, x1, y1), four pixel corners.")
            x0, y0, x1, y1 = box
            if not (x0 < x1 and y0 < y1):
                raise ValueError(
                    f"image {i}: box {tuple(box)} is empty or inverted; boxes are (x0, y0, x1, y1) with x0 < x1 and "
                    "y0 < y1, end exclusive (a (x, y, width, height) box is (x, y, x + width, y + height))."
                )
            if x1 <= 0 or y1 <= 0 or x0 >= W or y0 >= H:
                raise ValueError(f"image {i}: box {tuple(box)} lies outside the {H}x{W} image.")


def box_localization(
    maps: Tensor,
    gt_boxes: Sequence[Sequence[Box]],
    size: Optional[Tuple[int, int]] = None,
    correct: Optional[Tensor] = None,
    threshold: float = 0.5,
) -> Dict[str, Any]:
    """Pixel accuracy, IoU and Dice of the thresholded map's boxes vs ground truth.

    Args:
        maps: ``(N, 1, h, w)`` maps; upsampled to ``size`` (default: their own).
        gt_boxes: per image, a list of ``(x0, y0, x1, y1)`` boxes (end exclusive).
        size: ``(H, W)`` of the image the boxes refer to.
        correct: ``(N,)`` bool, correctly classified images; the averages are
            over those (all, if ``None``).
        threshold: the map is min-max scaled and thresholded strictly.

    Returns:
        ``{"pixel_accuracy", "iou", "dice"}`` as ``(N,)`` tensors, plus their
        means over ``correct`` under ``"mean"``.
    """
    maps = checked_maps(maps, len(gt_boxes), "box_localization (maps vs. lists of ground-truth boxes)")
    threshold = check_number(threshold, "threshold")
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold applies to maps scaled to [0, 1]; it must lie in [0, 1), got {threshold}.")
    if correct is not None:
        correct = torch.as_tensor(correct)
        if correct.shape != (len(gt_boxes),):
            raise ValueError(f"correct must be ({len(gt_boxes)},), one flag per map; got {tuple(correct.shape)}.")
    size = tuple(maps.shape[-2:]) if size is None else tuple(size)
    if len(size) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in size):
        raise ValueError(f"size must be the (H, W) of the images the boxes refer to, two positive integers; got {size}.")
    _check_boxes(gt_boxes, size)
    scaled = upsample_maps(maps, size)[:, 0].cpu().numpy()
    out = {k: torch.zeros(len(gt_boxes)) for k in ("pixel_accuracy", "iou", "dice")}
    for i, (heat, boxes) in enumerate(zip(scaled, gt_boxes)):
        pred = box_mask(boxes_from_map(heat, threshold), *size)
        gt = box_mask(boxes, *size)
        inter, union = np.logical_and(pred, gt).sum(), np.logical_or(pred, gt).sum()
        out["pixel_accuracy"][i] = float((pred == gt).mean())
        out["iou"][i] = float(inter / union) if union else 1.0
        out["dice"][i] = float(2 * inter / (pred.sum() + gt.sum())) if union else 1.0
    keep = torch.ones(len(gt_boxes), dtype=torch.bool) if correct is None else correct.bool().cpu()
    if not keep.any():
        warnings.warn(
            "box_localization: no image is marked correct, so the means over correct images are undefined (NaN); "
            "the per-image values are still returned.",
            stacklevel=2,
        )
    out["mean"] = {k: (v[keep].mean().item() if keep.any() else float("nan")) for k, v in list(out.items())}
    return out
