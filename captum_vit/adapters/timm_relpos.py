"""timm ``VisionTransformerRelPos`` (``vit_relpos_*``, ``vit_srelpos_*``): relative-position bias on the scores.

Blocks are timm's pre-norm ``RelPosBlock`` (``norm1``, ``attn`` = ``RelPosAttention``
with a fused ``qkv``, optional q/k norms and a per-block ``rel_pos`` bias,
``ls1``, ``norm2``, ``mlp``, ``ls2``). With ``shared_rel_pos`` one bias reaches
every block as the ``shared_rel_pos`` argument and is passed on unchanged
when a block is re-run. The class token is optional (off by default, the head
then averages the patch tokens). The post-norm ``ResPostRelPosBlock``
(``vit_relpos_*_rpn``) normalises after attention, so its attention branch
reads the unnormalised block input: refused.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ._attention_math import Call
from ._block_view import BlockView
from ._errors import UnsupportedModelError
from ._timm import FusedQkvAttentionMath, LayerScaleBlockView, TimmAdapter


class RelPosAttentionMath(FusedQkvAttentionMath):
    """``RelPosAttention``: timm's fused ``qkv`` and q/k norms, scores plus the block's or the shared bias."""

    def score_bias(self, call: Call) -> Optional[Tensor]:
        # as RelPosAttention.forward: the block's own bias wins; the shared one applies only without it
        if self.module.rel_pos is not None:
            return self.module.rel_pos.get_bias()
        return call.kwargs.get("shared_rel_pos")


class RelPosBlockView(LayerScaleBlockView):
    def __init__(self, block: nn.Module) -> None:
        super().__init__(block, RelPosAttentionMath(block.attn))

    def attention_call(self, call: Call) -> Call:
        return Call((), {"shared_rel_pos": call.kwargs.get("shared_rel_pos")})


class TimmRelPosViTAdapter(TimmAdapter):
    """timm ``VisionTransformerRelPos``: its relative-position tables fix the grid to the model's image size."""

    family = "timm VisionTransformerRelPos"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        from timm.models.vision_transformer_relpos import VisionTransformerRelPos

        return isinstance(module, VisionTransformerRelPos)

    def block_view(self, block: nn.Module) -> BlockView:
        from timm.models.vision_transformer_relpos import RelPosBlock

        if type(block) is not RelPosBlock:
            raise UnsupportedModelError(
                f"relative-position ViT block {type(block).__name__} is not supported (supported: timm's pre-norm "
                "RelPosBlock; the post-norm ResPostRelPosBlock of vit_relpos_*_rpn models normalises after attention, "
                "so no masked normalised input feeds it). Use a vit_relpos_* model without _rpn, or Captum's "
                "LayerGradCam on a block's output."
            )
        return RelPosBlockView(block)
