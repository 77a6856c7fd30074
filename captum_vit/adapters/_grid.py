"""What the hierarchical (Swin-style) families share: blocks on an ``(B, h, w, D)`` grid, seen as tokens.

ViT-ReciproCAM masks ``(B, T, D)`` tokens; a `GridBlockView` flattens a
block's grid to ``h*w`` tokens (no prefix tokens) and puts it back for the
block's own attention branch, so the masks of a stage's grid apply as in a
plain ViT. The families' files (``timm_swin``, ``torchvision_swin``) add their
blocks and stage layout.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

from torch import Tensor

from ._base import BlockView, Call, split_call

#: The key of the block grid in a `Call` of a grid block.
GRID = "captum_vit_grid"

WINDOW_REFUSAL = (
    "its blocks attend within (shifted) windows of the grid, so there is no class token and no attention row "
    "over the whole image to read. Use LayerReciproCAM (any block of any stage) or "
    "captum_vit.baselines.vit_layer_gradcam (Captum's LayerGradCam)"
)


class GridBlockView(BlockView):
    """A block on an ``(B, h, w, D)`` grid, seen as ``(B, h*w, D)`` tokens; ``attention`` puts the grid back."""

    def read_call(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[Tensor, Call]:
        x, call = split_call(args, kwargs)
        B, h, w, D = x.shape
        return x.reshape(B, h * w, D), Call(call.args, {**call.kwargs, GRID: (h, w)})

    def attention_call(self, call: Call) -> Call:
        return call

    def unwrap_output(self, output: Any) -> Tensor:
        return output.flatten(1, 2)

    def wrap_output(self, original: Any, y: Tensor) -> Any:
        return y.view(y.shape[0], *original.shape[1:])

    def attention(self, z: Tensor, call: Call) -> Tensor:
        h, w = call.kwargs[GRID]
        N, _, D = z.shape
        return self.grid_attention(z.reshape(N, h, w, D)).reshape(N, h * w, D)

    def grid_attention(self, z: Tensor) -> Tensor:
        """The block's attention branch on an ``(N, h, w, D)`` grid."""
        raise NotImplementedError


def halved(grid: Tuple[int, int]) -> Tuple[int, int]:
    """The grid after a 2x2 patch merging (odd sizes padded, as timm and torchvision do)."""
    return (grid[0] + 1) // 2, (grid[1] + 1) // 2


def grid_tokens(output: Tensor) -> Tensor:
    """``(B, h, w, D)`` -> ``(B, h*w, D)``; tokens already flat (a ``(B, T, D)`` output) as they are."""
    return output.flatten(1, 2) if output.dim() == 4 else output
