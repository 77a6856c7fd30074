"""torchvision ``SwinTransformer`` (``swin_t``, ``swin_s``, ``swin_b``): a grid of tokens per stage.

``model.features`` is the patch embedding (``Conv2d``, ``Permute`` to
``(B, h, w, D)``, norm), then stages of ``SwinTransformerBlock``s with a
``PatchMerging`` between them; ``norm``, ``permute``, ``avgpool`` and ``head``
follow. A block is ``x + stochastic_depth(attn(norm1(x)))``, then
``+ stochastic_depth(mlp(norm2(.)))``, with ``attn`` a
``ShiftedWindowAttention`` on the grid. Any image size works (windows and
merging pad). ``swin_v2_*`` blocks normalise after attention and are refused.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

from torch import Tensor, nn

from ._base import ViTAdapter
from ._block_view import BlockView, PreNormParts
from ._errors import UnsupportedModelError, lazy_isinstance
from ._grid import GridBlockView, WindowedStages, grid_tokens, halved


class ShiftedWindowBlockView(GridBlockView):
    """torchvision ``SwinTransformerBlock``: ``attn`` is the module's own shifted-window attention."""

    parts = PreNormParts(drop1="stochastic_depth", drop2="stochastic_depth")

    def grid_attention(self, z: Tensor) -> Tensor:
        return self.block.attn(z)


class TorchvisionSwinAdapter(WindowedStages, ViTAdapter):
    """torchvision ``SwinTransformer``: the blocks of every stage in ``features``, in order."""

    family = "torchvision SwinTransformer"
    library = "torchvision"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return lazy_isinstance(module, "torchvision.models.swin_transformer", ["SwinTransformer"])

    def _stages(self) -> List[Tuple[bool, List[nn.Module]]]:
        """``(merged before, blocks)`` per stage of ``features`` (after the patch embedding)."""
        from torchvision.models.swin_transformer import SwinTransformerBlock

        stages: List[Tuple[bool, List[nn.Module]]] = []
        merged = False
        for part in list(self.model.features)[1:]:
            blocks = [m for m in part.children() if isinstance(m, SwinTransformerBlock)]
            if blocks:
                stages.append((merged, blocks))
                merged = False
            else:  # a patch merging layer
                merged = True
        return stages

    @property
    def blocks(self) -> List[nn.Module]:
        return [block for _, blocks in self._stages() for block in blocks]

    def blocks_expression(self) -> str:
        return "[b for stage in model.features[1::2] for b in stage]"

    @property
    def image_module(self) -> nn.Module:
        return self.model.features[0]

    def stage_grids(self, image_hw: Sequence[int]) -> List[Tuple[int, int]]:
        stride = self.model.features[0][0].stride
        grid = (int(image_hw[0]) // stride[0], int(image_hw[1]) // stride[1])
        grids = []
        for merged, blocks in self._stages():
            grid = halved(grid) if merged else grid
            grids += [grid] * len(blocks)
        return grids

    def layer_tokens(self, output: Tensor) -> Tensor:
        return grid_tokens(output)

    def layer_output(self, tokens: Tensor, like: Tensor) -> Tensor:
        return tokens.view(like.shape)

    def block_view(self, block: nn.Module) -> BlockView:
        from torchvision.models.swin_transformer import SwinTransformerBlock

        if type(block) is not SwinTransformerBlock:
            raise UnsupportedModelError(
                f"Swin block {type(block).__name__} is not supported (supported: torchvision's SwinTransformerBlock "
                "of swin_t/s/b; the swin_v2 block normalises after attention, x + norm1(attn(x)), so no masked "
                "normalised input feeds it). Use vit_layer_gradcam on a block's output."
            )
        return ShiftedWindowBlockView(block)
