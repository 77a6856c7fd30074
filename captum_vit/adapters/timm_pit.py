"""timm ``PoolingVisionTransformer`` (PiT: ``pit_ti_224``, ``pit_s_distilled_224`` and friends): the grid shrinks.

``model.transformers`` are stages (``Transformer``) called on a
``(grid, class tokens)`` pair: the first pools nothing, each later one first
pools the ``(B, D, h, w)`` grid with a strided convolution (``pool.conv``)
and the class tokens with ``pool.fc``; then it flattens the grid after the
class tokens (one, or two when distilled), runs timm ``Block``s and reshapes
the patch rows back to ``(B, D, h, w)`` with the batch size it read before
its blocks. The head reads the class tokens after the last stage.

ViT-ReciproCAM explains any block of any stage on that stage's grid. Since a
stage passes on only as many rows as it received, the masked copies enter
at the stage (`copies_enter_at`: its input repeated once per copy) and the
explained block masks each repeat. The attention methods are refused: the
grid changes between stages, so attention matrices of different stages do
not compose.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

from torch import nn

from ._base import HEAD_CLASS_AND_PATCHES
from ._block_view import BlockView
from ._grid import StagedGrids, conv_output
from ._timm import TimmAdapter, timm_block_view

POOLING_REFUSAL = (
    "its stages pool the grid to a smaller one, so the attention matrices of different stages do not compose into "
    "one map. Use LayerReciproCAM (any block of any stage) or captum_vit.baselines.vit_layer_gradcam"
)


class TimmPitAdapter(StagedGrids, TimmAdapter):
    """timm ``PoolingVisionTransformer``: the blocks of every stage, in order; each stage's grid from its convolutions."""

    family = "timm PoolingVisionTransformer (PiT)"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        from timm.models.pit import PoolingVisionTransformer

        return isinstance(module, PoolingVisionTransformer)

    def _stage_of_blocks(self) -> List[nn.Module]:
        return [stage for stage in self.model.transformers for _ in stage.blocks]

    @property
    def blocks(self) -> List[nn.Module]:
        return [block for stage in self.model.transformers for block in stage.blocks]

    def blocks_expression(self) -> str:
        return "[b for stage in model.transformers for b in stage.blocks]"

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.model.cls_token.shape[1])

    def stage_grids(self, image_hw: Sequence[int]) -> List[Tuple[int, int]]:
        embed = self.image_module.conv
        grid = conv_output(int(image_hw[0]), embed, 0), conv_output(int(image_hw[1]), embed, 1)
        grids = []
        for stage in self.model.transformers:
            if stage.pool is not None:
                grid = conv_output(grid[0], stage.pool.conv, 0), conv_output(grid[1], stage.pool.conv, 1)
            grids += [grid] * len(stage.blocks)
        return grids

    @property
    def head_reads(self) -> str:
        # the head reads the class tokens, but the last stage reshapes its last block's patch rows: all must pass
        return HEAD_CLASS_AND_PATCHES

    def copies_enter_at(self, index: int) -> Optional[nn.Module]:
        return self._stage_of_blocks()[index]

    def repeat_for_copies(self, args: Tuple[Any, ...], count: int) -> Tuple[Any, ...]:
        grid, class_tokens = args[0]
        repeat = lambda t: t.repeat_interleave(count, dim=0)  # noqa: E731
        return ((repeat(grid), repeat(class_tokens)), *args[1:])

    def attention_refusal(self) -> str:
        return POOLING_REFUSAL

    def block_view(self, block: nn.Module) -> BlockView:
        return timm_block_view(block, self.family)
