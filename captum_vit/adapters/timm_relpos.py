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

from typing import Optional, Tuple

from torch import Tensor, nn

from ._base import AttentionMath, BlockView, Call, UnsupportedModelError
from ._timm import TimmAdapter


class RelPosAttentionMath(AttentionMath):
    """``RelPosAttention``: ``qkv``, q/k norms per head, scores plus the block's or the shared bias."""

    finish_reads_input = False

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module, module.num_heads, module.head_dim, module.scale)

    def project(self, x: Tensor, call: Call) -> Tuple[Tensor, Tensor, Tensor]:
        m = self.module
        q, k, v = (self.split_heads(u) for u in m.qkv(x).chunk(3, dim=-1))
        return m.q_norm(q), m.k_norm(k), v

    def score_bias(self, call: Call) -> Optional[Tensor]:
        # as RelPosAttention.forward: the block's own bias wins; the shared one applies only without it
        if self.module.rel_pos is not None:
            return self.module.rel_pos.get_bias()
        return call.kwargs.get("shared_rel_pos")

    def finish(self, merged: Tensor, x: Optional[Tensor]) -> Tensor:
        return self.module.proj_drop(self.module.proj(merged))

    def attention_dropout(self, weights: Tensor) -> Tensor:
        return self.module.attn_drop(weights)


class RelPosBlockView(BlockView):
    def __init__(self, block: nn.Module) -> None:
        super().__init__(block, RelPosAttentionMath(block.attn))
        self.norm1_module = block.norm1
        self.attention_module = block.attn

    def attention_call(self, call: Call) -> Call:
        return Call((), {"shared_rel_pos": call.kwargs.get("shared_rel_pos")})

    def attention(self, z: Tensor, call: Call) -> Tensor:
        return self.block.attn(z, **call.kwargs)

    def layer_scale1(self, a: Tensor) -> Tensor:
        return self.block.drop_path1(self.block.ls1(a))

    def mlp_branch(self, y: Tensor) -> Tensor:
        b = self.block
        return b.drop_path2(b.ls2(b.mlp(b.norm2(y))))


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
