"""What the hierarchical (Swin-style) families share: blocks on an ``(B, h, w, D)`` grid, seen as tokens.

ViT-ReciproCAM masks ``(B, T, D)`` tokens; a `GridBlockView` flattens a
block's grid to ``h*w`` tokens (no prefix tokens) and puts it back for the
block's own attention branch, so the masks of a stage's grid apply as in a
plain ViT. The families' files (``timm_swin``, ``torchvision_swin``) add their
blocks and stage layout.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

from torch import Tensor, nn

from ._attention_math import Call, split_call
from ._base import HEAD_PATCHES_ONLY
from ._block_view import BlockView

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


class StagedGrids:
    """Mixin of an adapter whose stages have grids of their own: `stage_grids` gives each block's."""

    def stage_grids(self, image_hw: Sequence[int]) -> List[Tuple[int, int]]:
        """The ``(h, w)`` grid of every block, in order, for an ``image_hw`` input."""
        raise NotImplementedError

    def grid_for(self, image_hw: Sequence[int]) -> Tuple[int, int]:
        return self.stage_grids(image_hw)[-1]

    def block_grid(self, index: int, image_hw: Sequence[int]) -> Tuple[int, int]:
        return self.stage_grids(image_hw)[index]


class WindowedStages(StagedGrids):
    """Mixin of a Swin-style adapter: staged grids, no prefix tokens, a head on the pooled patches, and
    attention within windows, which no method reading attention matrices applies to."""

    @property
    def num_prefix_tokens(self) -> int:
        return 0

    @property
    def has_class_token(self) -> bool:
        return False

    @property
    def head_reads(self) -> str:
        return HEAD_PATCHES_ONLY

    def attention_refusal(self) -> str:
        return WINDOW_REFUSAL


def halved(grid: Tuple[int, int]) -> Tuple[int, int]:
    """The grid after a 2x2 patch merging (odd sizes padded, as timm and torchvision do)."""
    return (grid[0] + 1) // 2, (grid[1] + 1) // 2


def grid_tokens(output: Tensor) -> Tensor:
    """``(B, h, w, D)`` -> ``(B, h*w, D)``; tokens already flat (a ``(B, T, D)`` output) as they are."""
    return output.flatten(1, 2) if output.dim() == 4 else output


def conv_output(size: int, conv: nn.Conv2d, axis: int) -> int:
    """A convolution's output length along ``axis`` (0: height, 1: width), as PyTorch computes it."""
    pad, kernel, stride, dilation = conv.padding[axis], conv.kernel_size[axis], conv.stride[axis], conv.dilation[axis]
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
