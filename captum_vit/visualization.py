"""Figures of explanations, drawn with Captum's ``visualize_image_attr``.

Importing this module imports matplotlib (with the non-interactive Agg
backend when no display is configured); ``import captum_vit`` does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import upsample_maps


def _pyplot():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        try:
            matplotlib.use("Agg")
        except Exception:  # noqa: BLE001 - keep whatever backend is active
            pass
    import matplotlib.pyplot as plt

    return plt


def display_image(pixels: torch.Tensor, size: int = 224) -> np.ndarray:
    """``(3, H, W)`` pixels in ``[0, 1]`` -> ``(size', size', 3)`` numpy, upscaled for display."""
    scale = max(1, size // max(pixels.shape[-2:]))
    if scale > 1:
        pixels = F.interpolate(pixels[None], scale_factor=scale, mode="bicubic", align_corners=False)[0]
    return pixels.clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def heat_for(map_: torch.Tensor, size: Sequence[int]) -> np.ndarray:
    """A ``(1, h, w)`` or ``(h, w)`` map -> ``(H, W, 1)`` numpy in ``[0, 1]`` for Captum."""
    m = map_.reshape(1, 1, *map_.shape[-2:]).float()
    return upsample_maps(m, size)[0].permute(1, 2, 0).cpu().numpy()


def draw_overlay(ax, image: np.ndarray, heat: np.ndarray, title: str) -> None:
    """One blended heat map on ``ax`` via Captum (an all-zero map is drawn plain)."""
    from captum.attr import visualization as viz

    if not np.any(heat):
        ax.imshow(image)
        ax.set_title(title + "\n(all-zero map)", fontsize=9)
        ax.axis("off")
        return
    viz.visualize_image_attr(
        heat, image, method="blended_heat_map", sign="positive", cmap="jet", alpha_overlay=0.5,
        plt_fig_axis=(ax.figure, ax), use_pyplot=False, title=title, fig_size=(3, 3),
    )
    ax.title.set_fontsize(9)


def explanation_figure(
    pixels: torch.Tensor,
    maps: Dict[str, torch.Tensor],
    title: str,
    out: Optional[str | Path] = None,
    timings: Optional[Dict[str, float]] = None,
):
    """Image, then one overlay per method: ``maps`` is ``{method title: (1, h, w) map}``."""
    plt = _pyplot()
    image = display_image(pixels)
    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(3 * (len(maps) + 1), 3.7))
    axes[0].imshow(image)
    axes[0].set_title(title, fontsize=9)
    axes[0].axis("off")
    for ax, (name, map_) in zip(axes[1:], maps.items()):
        label = name if not timings else f"{name} ({timings[name]:.0f} ms)"
        draw_overlay(ax, image, heat_for(map_, image.shape[:2]), label)
    fig.tight_layout(pad=1.5)
    if out is not None:
        fig.savefig(out, dpi=100)
        plt.close(fig)
    return fig


def class_grid_figure(
    pixels: torch.Tensor,
    maps: Dict[str, torch.Tensor],
    class_names: Sequence[str],
    title: str,
    out: Optional[str | Path] = None,
):
    """Rows: methods; columns: one class each. ``maps[method]`` is ``(k, h, w)``."""
    plt = _pyplot()
    image = display_image(pixels, size=256)
    rows, cols = len(maps), len(class_names)
    fig, axes = plt.subplots(rows, cols + 1, figsize=(2.6 * (cols + 1), 2.8 * rows), squeeze=False)
    for r, (method, class_maps) in enumerate(maps.items()):
        axes[r, 0].imshow(image)
        axes[r, 0].set_title(title if r == 0 else "", fontsize=9)
        axes[r, 0].set_ylabel(method)
        axes[r, 0].set_xticks([])
        axes[r, 0].set_yticks([])
        for c, name in enumerate(class_names):
            draw_overlay(axes[r, c + 1], image, heat_for(class_maps[c], image.shape[:2]), f"{method}: {name}")
    fig.tight_layout()
    if out is not None:
        fig.savefig(out, dpi=100)
        plt.close(fig)
    return fig
