"""Deletion and insertion curves (Petsiuk et al., RISE, BMVC 2018)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch
from torch import Tensor

from .._utils import check_batch_size, forward_logits, prepare_inputs, prepare_targets
from ._maps import check_number, checked_maps, upsample_maps


def _curves(forward_func: Callable[..., Any], x: Tensor, order: Tensor, counts: Tensor, baseline: float,
            targets: Any, rows: slice) -> Tensor:
    """``(2, n, steps + 1)``: the target's probability as the top ``counts[k]`` pixels are deleted / inserted."""
    n, C, H, W = x.shape
    steps = len(counts) - 1
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(H * W, device=order.device).expand(n, -1).contiguous())
    revealed = ranks[:, None, :] < counts.to(ranks.device)[None, :, None]  # (n, steps+1, H*W): the top counts[k]
    revealed = revealed.view(n, steps + 1, 1, H, W).to(x.dtype)
    base = torch.full_like(x, baseline)[:, None]
    deleted = x[:, None] * (1 - revealed) + base * revealed
    inserted = base * (1 - revealed) + x[:, None] * revealed
    with torch.no_grad():
        logits = forward_logits(forward_func, (torch.cat([deleted, inserted], dim=1).reshape(-1, C, H, W),)).float()
    probs = logits.softmax(-1)
    first = probs.view(n, 2 * (steps + 1), -1)[:, 0]  # row 0 of each deletion curve is the image: it resolves the target
    t = targets.resolve(first, rows)[:, 0].repeat_interleave(2 * (steps + 1))
    return probs.gather(1, t[:, None]).view(n, 2, steps + 1).permute(1, 0, 2).cpu()


def deletion_insertion(
    forward_func: Callable[..., Any],
    inputs: Tensor,
    maps: Tensor,
    target: Any = None,
    steps: int = 16,
    baseline: float = 0.0,
    batch_size: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    """Areas under the deletion and insertion curves, per example.

    Pixels are ranked by the map (upsampled to the input, ties by position).
    Deletion replaces the top ``k/steps`` of them by ``baseline`` for
    ``k = 0..steps`` and records the target's softmax probability; insertion
    starts from the baseline image and reveals them. The area is the
    trapezoid mean over the ``steps + 1`` points: lower is better for
    deletion, higher for insertion.

    Args:
        forward_func: model mapping ``(B, C, H, W)`` to logits.
        inputs: ``(N, C, H, W)``.
        maps: ``(N, 1, h, w)`` explanations of ``target``.
        target: the explained classes: ``None`` (the predicted class), an
            ``int``, a list of ``N`` ints or an ``(N,)`` tensor.
        steps: number of equal pixel fractions (a positive integer).
        baseline: value of removed pixels (0 in the model's input space).
        batch_size: images per forward pass (each example needs
            ``2 * (steps + 1)`` of them).

    Returns:
        ``(deletion_auc, insertion_auc)``, each ``(N,)``.
    """
    check_batch_size(batch_size)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}.")
    baseline = check_number(baseline, "baseline")
    prepared = prepare_inputs(inputs)
    inputs = prepared.images
    N, C, H, W = inputs.shape
    targets = prepare_targets(target, N)
    if targets.several:
        raise ValueError("deletion_insertion takes one target per example; pass an int, N ints or an (N,) tensor.")
    maps = checked_maps(maps, N, "deletion_insertion")
    order = upsample_maps(maps, (H, W)).flatten(1).argsort(dim=1, descending=True, stable=True)
    fractions = torch.linspace(0, 1, steps + 1)
    counts = (fractions * H * W).round().long()
    curves = torch.zeros(2, N, steps + 1)
    per_call = max(1, (batch_size or 64) // (2 * (steps + 1)))
    for start in range(0, N, per_call):
        rows = slice(start, min(start + per_call, N))
        curves[:, rows] = _curves(forward_func, inputs[rows], order[rows], counts, baseline, targets, rows)
    area = torch.trapezoid(curves, dx=1.0 / steps, dim=-1)
    return area[0], area[1]
