"""ADCC and its components (Poppi et al., CVPR-W 2021; docs/methods.md section 3)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor

from .._utils import check_batch_size, forward_logits, prepare_inputs, prepare_targets, row_chunks
from ._maps import as_explain_func, check_baseline_tensor, check_number, checked_maps, upsample_maps


@dataclass
class ADCCResult:
    """Per-example ADCC components, as fractions in ``[0, 1]`` (``(N,)`` each).

    ``constant_map`` flags examples whose map (or the map of their
    explanation input) is constant: their coherency is reported as 0.
    """

    average_drop: Tensor
    average_increase: Tensor
    coherency: Tensor
    complexity: Tensor
    adcc: Tensor
    constant_map: Tensor

    def __len__(self) -> int:
        return int(self.adcc.shape[0])

    @staticmethod
    def cat(results: List["ADCCResult"]) -> "ADCCResult":
        return ADCCResult(**{f.name: torch.cat([getattr(r, f.name) for r in results]) for f in fields(ADCCResult)})

    def summary(self) -> Dict[str, float]:
        """Dataset means in percent, and both ADCC aggregates.

        ``adcc_of_means`` is the ViT-ReciproCAM paper's Table 1 number: the
        harmonic mean of the dataset means of the components; ``mean_adcc``
        is the mean of the per-example ADCC.
        """
        if len(self) == 0:
            raise ValueError("this ADCCResult holds no examples; its summary would be NaN.")
        drop = self.average_drop.mean().item()
        coh = self.coherency.mean().item()
        com = self.complexity.mean().item()
        return {
            "average_drop": 100 * drop,
            "average_increase": 100 * self.average_increase.float().mean().item(),
            "coherency": 100 * coh,
            "complexity": 100 * com,
            "adcc_of_means": 100 * adcc_score(torch.tensor(drop), torch.tensor(coh), torch.tensor(com)).item(),
            "mean_adcc": 100 * self.adcc.mean().item(),
            "constant_maps": int(self.constant_map.sum().item()),
            "n": len(self),
        }


def adcc_score(average_drop: Tensor, coherency: Tensor, complexity: Tensor) -> Tensor:
    """``3 / (1/Coh + 1/(1 - Com) + 1/(1 - AD))``; 0 where a term is 0, never NaN."""
    terms = (
        1.0 / coherency.double() + 1.0 / (1.0 - complexity.double()) + 1.0 / (1.0 - average_drop.double())
    )
    return (3.0 / terms).float()


def pearson(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise Pearson correlation of ``(N, ...)`` tensors, and a constant-row flag."""
    a = a.flatten(1).double()
    b = b.flatten(1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    denom = a.norm(dim=1) * b.norm(dim=1)
    constant = denom <= 1e-12
    r = (a * b).sum(1) / denom.clamp_min(1e-12)
    return torch.where(constant, torch.zeros_like(r), r).float(), constant


def _adcc_rows(forward_func: Callable[..., Any], explain: Callable[[Tensor, Tensor], Any], x: Tensor, targets: Any,
               rows: slice, baseline: Any) -> ADCCResult:
    """ADCC's parts for the images ``x`` (examples ``rows``): the map, the map-masked image, its map."""
    with torch.no_grad():
        probs = forward_logits(forward_func, (x,)).float().softmax(-1)
    t = targets.resolve(probs, rows)[:, 0]
    maps = upsample_maps(checked_maps(explain(x, t), x.shape[0], "adcc"), x.shape[-2:])
    explanation = baseline + maps.to(x.dtype) * (x - baseline)
    with torch.no_grad():
        probs_e = forward_logits(forward_func, (explanation,)).float().softmax(-1)
    y = probs.gather(1, t[:, None])[:, 0]
    o = probs_e.gather(1, t[:, None])[:, 0]
    maps_e = upsample_maps(checked_maps(explain(explanation, t), x.shape[0], "adcc"), x.shape[-2:])
    r, constant = pearson(maps, maps_e)
    drop = (y - o).clamp_min(0) / y.clamp_min(1e-12)
    coherency = torch.where(constant, torch.zeros_like(r), (r + 1) / 2)
    complexity = maps.flatten(1).abs().mean(1)
    return ADCCResult(average_drop=drop.cpu(), average_increase=(o > y).float().cpu(), coherency=coherency.cpu(),
                      complexity=complexity.cpu(), adcc=adcc_score(drop, coherency, complexity).cpu(),
                      constant_map=constant.cpu())


def adcc(
    forward_func: Callable[..., Any],
    explain_func: Any,
    inputs: Tensor,
    target: Any = None,
    baseline: float | Tensor = 0.0,
    batch_size: Optional[int] = None,
) -> ADCCResult:
    """Average Drop, Average Increase, Coherency, Complexity and ADCC.

    Args:
        forward_func: model (or callable) mapping ``(B, C, H, W)`` to logits.
        explain_func: a Captum ``Attribution`` (its ``attribute`` is used) or
            a callable ``(inputs, target) -> maps``; maps of any grid size are
            upsampled bilinearly to the input size and min-max scaled.
        inputs: ``(N, C, H, W)`` images in the model's input space.
        target: ``None`` (predicted class), an int, or ``N`` class indices.
        baseline: the value masked pixels take, ``E = baseline + A (x - baseline)``;
            0 in the model's input space (the reference code's ``x * A``).
        batch_size: images per batch; the explainer is called on the
            explanation inputs in the same batches.

    Returns:
        `ADCCResult` with ``(N,)`` tensors; ``.summary()`` aggregates.
    """
    prepared = prepare_inputs(inputs)
    targets = prepare_targets(target, prepared.batch_size)
    if not isinstance(baseline, Tensor):
        baseline = check_number(baseline, "baseline")
    else:
        baseline = check_baseline_tensor(baseline, prepared.images)
    if targets.several:
        raise ValueError("adcc takes one target per example.")
    check_batch_size(batch_size)
    explain = as_explain_func(explain_func)
    results = [_adcc_rows(forward_func, explain, prepared.images[rows], targets, rows, baseline)
               for rows in row_chunks(prepared.batch_size, batch_size)]
    result = ADCCResult.cat(results)
    if result.constant_map.any():
        warnings.warn(
            f"{int(result.constant_map.sum())} of {len(result)} examples have a constant map (or a constant map "
            "of their explanation input): coherency is undefined there and reported as 0.",
            stacklevel=2,
        )
    return result
