"""timm ``Beit`` (BEiT, BEiT v2): relative-position bias added to the scores.

Blocks are timm's BEiT ``Block`` (pre-norm, layer scale ``gamma_1``/``gamma_2``);
a shared relative-position bias reaches each block as ``shared_rel_pos_bias``
and is passed on unchanged when a block is re-run.
"""

from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor, nn

from ._attention_math import AttentionMath, Call
from ._block_view import BlockView, PreNormParts
from ._errors import UnsupportedModelError
from ._qkv import fused_qkv_with_biases
from ._timm import TimmAdapter


class BeitAttentionMath(AttentionMath):
    """BEiT ``Attention``: ``qkv`` with q/v biases, scores plus (shared) relative-position bias."""

    finish_reads_input = False

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module, module.num_heads, module.qkv.weight.shape[0] // (3 * module.num_heads), module.scale)

    def project(self, x: Tensor, call: Call) -> Tuple[Tensor, Tensor, Tensor]:
        q, k, v = (self.split_heads(u) for u in fused_qkv_with_biases(self.module, x).chunk(3, dim=-1))
        return q, k, v

    def score_bias(self, call: Call) -> Optional[Tensor]:
        m = self.module
        bias = m._get_rel_pos_bias() if m.relative_position_bias_table is not None else None
        shared = call.kwargs.get("shared_rel_pos_bias")
        if shared is not None:
            bias = shared if bias is None else bias + shared
        return bias

    def finish(self, merged: Tensor, x: Optional[Tensor]) -> Tensor:
        return self.module.proj_drop(self.module.proj(merged))

    def attention_dropout(self, weights: Tensor) -> Tensor:
        return self.module.attn_drop(weights)


class BeitBlockView(BlockView):
    parts = PreNormParts(scale1="gamma_1", scale2="gamma_2", drop1="drop_path1", drop2="drop_path2")

    def __init__(self, block: nn.Module) -> None:
        super().__init__(block, BeitAttentionMath(block.attn))

    def attention_call(self, call: Call) -> Call:
        return Call((), {"shared_rel_pos_bias": call.kwargs.get("shared_rel_pos_bias")})


class TimmBeitAdapter(TimmAdapter):
    """timm ``Beit``: no dynamic size (its relative-position tables fix the grid)."""

    family = "timm Beit"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        from timm.models.beit import Beit

        return isinstance(module, Beit)

    def block_view(self, block: nn.Module) -> BlockView:
        from timm.models.beit import Block

        if type(block) is not Block:
            raise UnsupportedModelError(f"BEiT block {type(block).__name__} is not timm's beit.Block.")
        return BeitBlockView(block)
