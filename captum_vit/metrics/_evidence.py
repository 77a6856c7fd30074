"""Scores for maps where the evidence is known, and the model-randomisation control.

Used by the known-evidence benchmark (`evaluate_known_evidence`,
``benchmarks/evidence.py``) and the demo; every function is per image so a
figure can carry a bootstrap interval over images (`bootstrap_interval`).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ._maps import as_map_batch, checked_maps, upsample_maps


def _masks(masks: Any, n: int, who: str) -> Tensor:
    if not isinstance(masks, Tensor) or masks.dim() != 3 or masks.shape[0] != n:
        shape = tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
        raise ValueError(f"{who}: masks must be a (N, H, W) bool tensor with one mask per map (N={n}); got {shape}.")
    return masks.bool()


def evidence_mass(maps: Any, masks: Tensor) -> Tensor:
    """Share of each map's positive mass that lies inside its evidence mask.

    Args:
        maps: ``(N, 1, h, w)`` maps (any grid; upsampled bilinearly to the
            masks' size, not rescaled); negative values count as zero.
        masks: ``(N, H, W)`` bool, the pixels of the evidence.

    Returns:
        ``(N,)`` in ``[0, 1]``; a map with no positive mass scores 0. A map
        that spreads its mass evenly scores the mask's share of the image.
    """
    masks = _masks(masks, as_map_batch(maps).shape[0], "evidence_mass")
    maps = checked_maps(maps, len(masks), "evidence_mass")
    positive = upsample_maps(maps, masks.shape[-2:], normalize=False)[:, 0].float().clamp_min(0).cpu()
    total = positive.flatten(1).sum(1)
    inside = (positive * masks.cpu()).flatten(1).sum(1)
    return torch.where(total > 0, inside / total.clamp_min(1e-30), torch.zeros_like(total))


def top_pixel_inside(maps: Any, masks: Tensor) -> Tensor:
    """``(N,)`` float, 1 where the map's maximum (upsampled to the masks' size) lies inside the mask.

    Ties go to the first pixel in row-major order, so a constant map points
    at the top-left corner.
    """
    masks = _masks(masks, as_map_batch(maps).shape[0], "top_pixel_inside")
    maps = checked_maps(maps, len(masks), "top_pixel_inside")
    up = upsample_maps(maps, masks.shape[-2:], normalize=False)[:, 0].float().cpu()
    top = up.flatten(1).argmax(1)
    return masks.cpu().flatten(1).gather(1, top[:, None])[:, 0].float()


def rank_correlation(a: Any, b: Any) -> Tensor:
    """Spearman's rank correlation of two maps of each image, ``(N,)``.

    Ties take their average rank. Where either map is constant the
    correlation is undefined; it counts as 0 (the maps share no ordering).
    Both batches must have the same shape.
    """
    a = checked_maps(a, len(a), "rank_correlation").flatten(1).float().cpu()
    b = checked_maps(b, len(b), "rank_correlation").flatten(1).float().cpu()
    if a.shape != b.shape:
        raise ValueError(f"rank_correlation compares maps of one shape; got {tuple(a.shape)} and {tuple(b.shape)}.")
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    norm = ra.norm(dim=1) * rb.norm(dim=1)
    return torch.where(norm > 0, (ra * rb).sum(1) / norm.clamp_min(1e-30), torch.zeros_like(norm))


def _average_ranks(x: Tensor) -> Tensor:
    from scipy.stats import rankdata

    return torch.from_numpy(rankdata(x.double().numpy(), axis=1)).double()


def bootstrap_interval(values: Any, resamples: int = 1000, level: float = 0.95, seed: int = 0) -> Dict[str, float]:
    """Mean and percentile bootstrap interval of per-image values.

    Returns ``{"mean", "lo", "hi", "n"}``; ``lo``/``hi`` bound the central
    ``level`` of the means of ``resamples`` resamples (with replacement).
    """
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    if values.numel() == 0:
        raise ValueError("bootstrap_interval needs at least one value.")
    if not torch.isfinite(values).all():
        raise ValueError("bootstrap_interval: the values contain NaN or infinity; drop undefined values first.")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1); got {level}.")
    g = torch.Generator().manual_seed(seed)
    means = values[torch.randint(0, len(values), (resamples, len(values)), generator=g)].mean(1)
    tail = (1 - level) / 2
    return {"mean": values.mean().item(), "lo": means.quantile(tail).item(), "hi": means.quantile(1 - tail).item(),
            "n": len(values)}


def cascading_randomization(
    model: nn.Module, vit: Optional[nn.Module] = None, seed: int = 0
) -> Iterator[Tuple[str, nn.Module]]:
    """A copy of ``model`` re-initialised stage by stage from the output down (Adebayo et al., NeurIPS 2018).

    Yields ``(stage, randomised copy)`` with the stages ``"head"`` (every
    layer after the last block: final norm and classifier), then
    ``"block L-1"`` down to ``"block 0"``, then ``"patch embedding"``; each
    stage keeps the earlier stages' randomisation (cascading). A layer is
    re-initialised by its own ``reset_parameters()`` (PyTorch's default
    initialisation, as Quantus' model-parameter randomisation test does),
    under ``torch.manual_seed(seed)``; parameters that belong to no layer
    (class token, positional embedding) keep their trained values. The
    copy is one object, changed in place between stages; ``model`` is never
    touched.
    """
    from ..adapters import find_adapter

    randomised = copy.deepcopy(model)
    blocks = find_adapter(randomised, None, vit and _same_module_in(model, randomised, vit)).blocks
    owner = {}
    for index, block in enumerate(blocks):
        for module in block.modules():
            owner[module] = index
    resettable = [m for m in randomised.modules()
                  if callable(getattr(m, "reset_parameters", None)) and any(True for _ in m.parameters(recurse=False))]
    stages: List[Tuple[str, List[nn.Module]]] = [("head", [])]
    stages += [(f"block {i}", []) for i in reversed(range(len(blocks)))]
    stages.append(("patch embedding", []))
    seen_block = False
    for module in resettable:
        if module in owner:
            seen_block = True
            stages[len(blocks) - owner[module]][1].append(module)
        else:
            stages[0 if seen_block else -1][1].append(module)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, modules in stages:
            with torch.no_grad():
                for module in reversed(modules):
                    module.reset_parameters()
            yield name, randomised


def _same_module_in(original: nn.Module, duplicate: nn.Module, part: nn.Module) -> nn.Module:
    """The module of ``duplicate`` at ``part``'s place in ``original``."""
    for name, module in original.named_modules():
        if module is part:
            return duplicate.get_submodule(name)
    raise ValueError("vit must be a module inside model.")
