"""Turning explainer output into input-sized maps, shared by every metric."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from captum.attr import Attribution
from torch import Tensor

from .._utils import minmax_normalize

ExplainFunc = Callable[[Tensor, Tensor], Tensor]


def as_explain_func(explain: Any) -> ExplainFunc:
    """``(inputs, target) -> maps`` from a Captum ``Attribution`` or such a callable."""
    if isinstance(explain, Attribution):
        return lambda x, t: explain.attribute(x, target=t)
    if callable(explain):
        return explain
    raise TypeError(f"explain_func must be a Captum Attribution or a callable (inputs, target); got {type(explain).__name__}.")


def as_map_batch(maps: Any) -> Tensor:
    """Explainer output (tensor or 1-tuple; ``(B, 1, h, w)`` or ``(B, h, w)``) as ``(B, 1, h, w)`` float32."""
    if isinstance(maps, tuple):
        maps = maps[0]
    if not isinstance(maps, Tensor):
        raise TypeError(f"the explainer must return a tensor of maps; got {type(maps).__name__}.")
    if maps.dim() == 3:
        maps = maps[:, None]
    if maps.dim() != 4 or maps.shape[1] != 1:
        raise ValueError(
            f"expected one map per example, (B, 1, h, w); got {tuple(maps.shape)}. "
            "Sum input attributions over channels first (e.g. attr.sum(1, keepdim=True).abs())."
        )
    return maps.detach().float()


def checked_maps(maps: Any, batch: int, who: str) -> Tensor:
    """Explainer output as ``(B, 1, h, w)``, refused unless it has one finite map per image."""
    maps = as_map_batch(maps)
    if maps.shape[0] != batch:
        raise ValueError(
            f"{who}: {maps.shape[0]} maps for {batch} images; the explainer must return one (1, h, w) map per image."
        )
    bad = ~torch.isfinite(maps)
    if bad.any():
        rows = sorted(set(bad.flatten(1).any(1).nonzero()[:, 0].tolist()))
        raise ValueError(
            f"{who}: the maps of image(s) {rows[:10]} hold NaN or infinite values; a metric of them would be NaN. "
            "Check the model's outputs on those images (or the explainer) first."
        )
    return maps


def check_number(value: Any, name: str) -> float:
    """A finite real number (not a bool), for baselines and thresholds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value!r}.")
    return float(value)


def check_baseline_tensor(baseline: Tensor, images: Tensor) -> Tensor:
    """A baseline tensor that broadcasts to ``images`` without changing their shape, finite, on their device."""
    try:
        shape = torch.broadcast_shapes(tuple(baseline.shape), tuple(images.shape))
    except RuntimeError:
        shape = None
    if shape != tuple(images.shape):
        raise ValueError(
            f"baseline of shape {tuple(baseline.shape)} does not broadcast to the images' {tuple(images.shape)}: give "
            "a number, a (C, 1, 1) tensor (one value per channel) or a tensor of the images' shape."
        )
    if baseline.is_meta or not torch.isfinite(baseline).all():
        raise ValueError("baseline must hold finite values (not NaN, infinity or a meta tensor).")
    return baseline.to(device=images.device, dtype=images.dtype)


def upsample_maps(maps: Any, size: Sequence[int], normalize: bool = True) -> Tensor:
    """``(B, 1, h, w)`` (or ``(B, h, w)``) maps -> ``(B, 1, H, W)``, bilinear, in ``[0, 1]``.

    Bilinear without ``align_corners``, as ``captum.attr.LayerAttribution.interpolate``.
    With ``normalize`` each map is min-max scaled, except a constant map,
    which has no range to scale: it keeps its value, clipped to ``[0, 1]``
    (so an all-ones map stays all ones).
    """
    maps = as_map_batch(maps)
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
    if not normalize:
        return maps
    flat = maps.flatten(1)
    constant = (flat.max(1).values - flat.min(1).values) <= 1e-12
    return torch.where(constant.view(-1, 1, 1, 1), maps.clamp(0, 1), minmax_normalize(maps))


def expand_to_input(maps: Any, inputs: Tensor) -> Tensor:
    """A ``(B, 1, h, w)`` map upsampled and expanded to ``inputs.shape``.

    Captum's ``infidelity`` asserts that attributions have the input's shape;
    this is the one line that makes a patch-grid map fit.
    """
    if not isinstance(inputs, Tensor) or inputs.dim() != 4:
        raise ValueError("expand_to_input needs (B, C, H, W) inputs.")
    maps = checked_maps(maps, inputs.shape[0], "expand_to_input")
    # contiguous: Captum views attributions with .view(B, -1)
    return upsample_maps(maps, inputs.shape[-2:], normalize=False).expand_as(inputs).to(inputs.dtype).contiguous()


def patch_perturbation(patch_size: int, std: float = 0.1, generator: torch.Generator | None = None):
    """A perturbation for ``captum.metrics.infidelity`` constant on each patch.

    Noise is drawn per ``patch_size x patch_size`` patch (and channel), so it
    moves whole ViT tokens, and returned as Captum expects:
    ``(perturbation, inputs - perturbation)``.
    """

    def perturb(inputs: Tensor):
        B, C, H, W = inputs.shape
        h, w = -(-H // patch_size), -(-W // patch_size)
        noise = torch.randn(B, C, h, w, generator=generator).to(inputs) * std
        noise = noise.repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)[:, :, :H, :W]
        return noise, inputs - noise

    return perturb


def input_attribution(explain: Any) -> Callable[..., Tensor]:
    """Wrap an explainer so it returns input-shaped attributions.

    ``captum.metrics.infidelity`` and ``sensitivity_max`` then take it
    directly: ``sensitivity_max(input_attribution(cam), images, target=t)``.
    """
    fn = as_explain_func(explain)

    def attribute(inputs: Any, target: Any = None, **kwargs: Any) -> Any:
        x = inputs[0] if isinstance(inputs, tuple) else inputs
        out = expand_to_input(fn(x, target), x)
        return (out,) if isinstance(inputs, tuple) else out

    return attribute


def quantus_explain_func(explain: Any) -> Callable[..., Any]:
    """An ``explain_func`` for Quantus metrics, from a captum_vit explainer.

    Quantus calls ``explain_func(model, inputs, targets, **kwargs)`` with numpy
    ``(N, C, H, W)`` inputs and ``(N,)`` targets and expects numpy
    attributions; this returns ``(N, 1, H, W)`` float32 maps, the patch-grid
    maps upsampled bilinearly (not normalised). Inputs go to the device of the
    model's parameters.

    Example::

        import quantus
        metric = quantus.FaithfulnessCorrelation(nr_runs=10, subset_size=56)
        scores = metric(model=model, x_batch=x, y_batch=y, a_batch=None,
                        explain_func=quantus_explain_func(LayerReciproCAM(model, model.blocks[-1])))
    """
    import numpy as np

    fn = as_explain_func(explain)

    def explain_func(model: Any, inputs: Any, targets: Any, **kwargs: Any) -> Any:
        device = next((p.device for p in getattr(model, "parameters", lambda: iter(()))()), torch.device("cpu"))
        x = torch.as_tensor(np.asarray(inputs), dtype=torch.float32, device=device)
        if x.dim() != 4:
            raise ValueError(f"quantus_explain_func needs (N, C, H, W) inputs; got shape {tuple(x.shape)}.")
        t = torch.as_tensor(np.asarray(targets).reshape(-1), dtype=torch.long, device=device)
        maps = checked_maps(fn(x, t), x.shape[0], "quantus_explain_func")
        return upsample_maps(maps, x.shape[-2:], normalize=False).cpu().numpy().astype(np.float32)

    return explain_func
