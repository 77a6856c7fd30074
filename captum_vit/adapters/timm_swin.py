"""timm ``SwinTransformer`` (``swin_tiny_patch4_window7_224`` and friends): a grid of tokens per stage.

Stages (``model.layers``) each merge 2x2 patches (``downsample``, not in the
first) and run ``SwinTransformerBlock``s on an ``(B, h, w, D)`` grid:
``x + drop_path1(_attn(norm1(x)))``, then ``+ drop_path2(mlp(norm2(.)))``,
where ``_attn`` is the (shifted) window attention with its window
partition, attention mask and reverse shift. There are no prefix tokens and
the head averages the last stage's grid.

For ViT-ReciproCAM a block's grid is flattened to ``(B, h*w, D)`` tokens
(`layer_tokens`), so the masks of the stage's ``h x w`` grid apply as
everywhere else; the grid travels in the block's `Call` to put the tokens
back for ``_attn``. Window attention has no explicit form here, so only the
general path runs (the block's own ``_attn`` on every masked copy). Methods
that read attention matrices are refused: a window's attention is not a
class-token row over the image.
"""

from __future__ import annotations

from typing import Any, List, Sequence, Tuple

from torch import Tensor, nn

from ._block_view import BlockView, PreNormParts
from ._errors import UnsupportedModelError
from ._grid import GridBlockView, WindowedStages, grid_tokens, halved
from ._timm import TimmAdapter


class SwinBlockView(GridBlockView):
    """timm ``SwinTransformerBlock``: its own ``_attn`` (shift, window partition, masked attention, reverse)."""

    parts = PreNormParts(drop1="drop_path1", drop2="drop_path2")

    def grid_attention(self, z: Tensor) -> Tensor:
        return self.block._attn(z)


class TimmSwinAdapter(WindowedStages, TimmAdapter):
    """timm ``SwinTransformer``: the blocks of every stage, in order; each stage's grid from the image size."""

    family = "timm SwinTransformer"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        from timm.models.swin_transformer import SwinTransformer

        return isinstance(module, SwinTransformer)

    @property
    def blocks(self) -> List[nn.Module]:
        return [block for stage in self.model.layers for block in stage.blocks]

    def blocks_expression(self) -> str:
        return "[b for stage in model.layers for b in stage.blocks]"

    def stage_grids(self, image_hw: Sequence[int]) -> List[Tuple[int, int]]:
        grid = TimmAdapter.grid_for(self, image_hw)  # the patch embedding's grid (StagedGrids' is the last stage's)
        grids = []
        for stage in self.model.layers:
            grid = grid if isinstance(stage.downsample, nn.Identity) else halved(grid)
            grids += [grid] * len(stage.blocks)
        return grids

    def layer_tokens(self, output: Tensor) -> Tensor:
        return grid_tokens(output)

    def layer_output(self, tokens: Tensor, like: Tensor) -> Tensor:
        return tokens.view(like.shape)

    def block_view(self, block: nn.Module) -> BlockView:
        from timm.models.swin_transformer import SwinTransformerBlock

        if type(block) is not SwinTransformerBlock or not callable(getattr(block, "_attn", None)):
            raise UnsupportedModelError(
                f"Swin block {type(block).__name__} is not supported (supported: timm's SwinTransformerBlock, whose "
                "window attention branch is its _attn). Use vit_layer_gradcam on a block's output."
            )
        return SwinBlockView(block)

    def checkpointing_flags(self) -> List[Tuple[Any, str]]:
        return [(stage, "grad_checkpointing") for stage in self.model.layers if hasattr(stage, "grad_checkpointing")]
