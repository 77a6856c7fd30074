"""Figures of explanations, drawn with Captum's ``visualize_image_attr``.

Importing this module imports matplotlib (with the non-interactive Agg
backend when no display is configured); ``import captum_vit`` does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ._utils import flat_threshold
from .metrics import upsample_maps


def pyplot():
    """matplotlib.pyplot, on the Agg backend unless a notebook's inline backend is active (no display is needed)."""
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


#: a map whose values differ by less than this fraction of their magnitude is flat: its
#: min-max stretched picture shows rounding noise, not evidence (the maps' float32 threshold,
#: the same that makes the explainers warn)
FLAT_RELATIVE_RANGE = flat_threshold(torch.float32)


def raw_range(map_: torch.Tensor) -> Tuple[float, float, bool]:
    """``(min, max, flat)`` of a raw map; ``flat`` when the range is below
    `FLAT_RELATIVE_RANGE` of the largest magnitude (or the map is constant)."""
    lo, hi = float(map_.min()), float(map_.max())
    scale = max(abs(lo), abs(hi))
    return lo, hi, (hi - lo) <= FLAT_RELATIVE_RANGE * scale


def range_caption(map_: torch.Tensor) -> str:
    """What the colours show: ``"shown scaled; values 0.844 .. 0.848"``, with a warning for a flat map.

    A map already min-max scaled (exactly 0 .. 1, as the methods return by
    default) says so: its raw range is not known here, and the caption does
    not call it raw.
    """
    lo, hi, flat = raw_range(map_)
    if (lo, hi) == (0.0, 1.0):
        text = "scaled 0 .. 1 before drawing\n(normalize=False maps give the raw range)"
    else:
        text = f"shown scaled; values {lo:.3g} .. {hi:.3g}"
    return text + "\nFLAT: differences are noise" if flat else text


def draw_overlay(ax, image: np.ndarray, map_: torch.Tensor, title: str) -> None:
    """One map over ``image`` on ``ax`` via Captum, with a colour bar and its raw range.

    The map is min-max scaled for display (colour bar 0..1 = the map's min..max,
    written under the title, see `range_caption`); a flat map (see
    `raw_range`) is hatched and captioned as such.
    """
    from captum.attr import visualization as viz

    heat = heat_for(map_, image.shape[:2])
    caption = f"{title}\n{range_caption(map_)}"
    lo, hi, flat = raw_range(map_)
    if hi == lo:
        ax.imshow(image)
        ax.set_title(caption, fontsize=8)
        ax.axis("off")
        return
    viz.visualize_image_attr(
        heat, image, method="blended_heat_map", sign="positive", cmap="jet", alpha_overlay=0.5,
        plt_fig_axis=(ax.figure, ax), use_pyplot=False, title=caption, fig_size=(3, 3), show_colorbar=True,
        outlier_perc=0,
    )
    ax.title.set_fontsize(8)
    if flat:
        ax.add_patch(_hatch(ax, image.shape))


def _hatch(ax, shape):
    from matplotlib.patches import Rectangle

    return Rectangle((0, 0), shape[1], shape[0], fill=False, hatch="//", edgecolor="white", linewidth=0)


def explanation_figure(
    pixels: torch.Tensor,
    maps: Dict[str, torch.Tensor],
    title: str,
    out: Optional[str | Path] = None,
    class_agnostic: Sequence[str] = (),
):
    """Image, then one overlay per method.

    Args:
        pixels: ``(3, H, W)`` image in ``[0, 1]``.
        maps: ``{method title: (1, h, w) map}``; each is min-max scaled
            for display, with its range in the caption (raw maps, from
            ``normalize=False``, show the raw range; already scaled maps say
            so).
        title: caption of the image (prediction, class).
        out: where to save the PNG (the figure is returned open if ``None``).
        class_agnostic: method titles whose map does not depend on the class
            (captioned "any class").
    """
    plt = pyplot()
    image = display_image(pixels)
    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(3.3 * (len(maps) + 1), 3.6))
    axes[0].imshow(image)
    axes[0].set_title(title, fontsize=9)
    axes[0].axis("off")
    for ax, (name, map_) in zip(axes[1:], maps.items()):
        draw_overlay(ax, image, map_, f"{name} (any class)" if name in class_agnostic else name)
    return _finish(plt, fig, out)


def _finish(plt, fig, out: Optional[str | Path]):
    fig.tight_layout()
    if out is not None:
        fig.savefig(out, dpi=100, bbox_inches="tight", pad_inches=0.05)  # no empty strips
        plt.close(fig)
    return fig


def class_grid_figure(
    pixels: torch.Tensor,
    maps: Dict[str, torch.Tensor],
    class_names: Sequence[str],
    title: str,
    out: Optional[str | Path] = None,
):
    """Rows: methods; columns: one class each. ``maps[method]`` is ``(k, h, w)`` raw maps."""
    plt = pyplot()
    image = display_image(pixels, size=256)
    rows, cols = len(maps), len(class_names)
    fig, axes = plt.subplots(rows, cols + 1, figsize=(3.0 * (cols + 1), 3.0 * rows), squeeze=False)
    for r, (method, class_maps) in enumerate(maps.items()):
        axes[r, 0].imshow(image)
        axes[r, 0].set_title(title if r == 0 else "", fontsize=9)
        axes[r, 0].set_ylabel(method)
        axes[r, 0].set_xticks([])
        axes[r, 0].set_yticks([])
        for c, name in enumerate(class_names):
            draw_overlay(axes[r, c + 1], image, class_maps[c : c + 1], f"{method}: {name}")
    return _finish(plt, fig, out)


def known_evidence_figure(
    pixels: torch.Tensor,
    boxes: Sequence[Tuple[int, int, int, int]],
    captions: Sequence[str],
    maps: Dict[str, torch.Tensor],
    masses: Dict[str, torch.Tensor],
    out: Optional[str | Path] = None,
    class_agnostic: Sequence[str] = (),
):
    """Rows: canvases with their decisive mark boxed; columns: the canvas, then one overlay per method.

    Args:
        pixels: ``(N, 3, H, W)`` canvases in ``[0, 1]``.
        boxes: per canvas, the ``(x0, y0, x1, y1)`` pixel box of the mark
            that decides the explained class (end exclusive), drawn on every
            panel of the row.
        captions: per canvas, what the model was asked about.
        maps: ``{method title: (N, 1, h, w) raw maps}``.
        masses: ``{method title: (N,) evidence mass}``, written in each caption.
        out: where to save the PNG (the figure is returned open if ``None``).
        class_agnostic: method titles whose map does not depend on the class.
    """
    from matplotlib.patches import Rectangle

    plt = pyplot()
    n = pixels.shape[0]
    fig, axes = plt.subplots(n, len(maps) + 1, figsize=(3.0 * (len(maps) + 1), 3.1 * n), squeeze=False)
    for i in range(n):
        image = display_image(pixels[i], size=192)
        scale = image.shape[0] / pixels.shape[-2]
        x0, y0, x1, y1 = (v * scale for v in boxes[i])
        axes[i, 0].imshow(image)
        axes[i, 0].set_title(captions[i], fontsize=8)
        axes[i, 0].axis("off")
        for ax, (name, method_maps) in zip(axes[i, 1:], maps.items()):
            label = f"{name} (any class)" if name in class_agnostic else name
            draw_overlay(ax, image, method_maps[i], f"{label}\nevidence mass {float(masses[name][i]):.2f}")
        for ax in axes[i]:
            # the box marks the mark's outer pixel edges (imshow centres pixels on integers)
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="lime",
                                   linewidth=1.5, linestyle="--"))
    return _finish(plt, fig, out)
