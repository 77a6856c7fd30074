"""timm ``Eva``: EVA-02 and the RoPE ViTs (``vit_*_rope*``).

Blocks are ``EvaBlock`` (pre-norm, layer scale as ``gamma_1``/``gamma_2``,
SwiGLU or plain MLP); the rotary embedding reaches each block as its ``rope``
argument and is passed on unchanged when a block is re-run. ``EvaAttention``
(fused or separate ``q/k/v`` projections, q/k norm, an output norm) applies
RoPE to the patch tokens' queries and keys only (not the
``num_prefix_tokens`` first).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ._attention_math import AttentionMath, Call
from ._block_view import BlockView, PreNormParts
from ._errors import UnsupportedModelError
from ._qkv import fused_qkv_with_biases
from ._timm import TimmAdapter


class EvaAttentionMath(AttentionMath):
    """``EvaAttention``: ``q/k/v`` (fused with separate biases, or three projections) -> q/k norm -> RoPE ->
    ``proj(norm(A v))``."""

    finish_reads_input = False

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module, module.num_heads, module.head_dim, module.scale)

    def project(self, x: Tensor, call: Call) -> Tuple[Tensor, Tensor, Tensor]:
        from timm.layers import apply_rot_embed_cat

        m = self.module
        if m.qkv is not None:
            q, k, v = (self.split_heads(u) for u in fused_qkv_with_biases(m, x).chunk(3, dim=-1))
        else:
            q, k, v = self.split_heads(m.q_proj(x)), self.split_heads(m.k_proj(x)), self.split_heads(m.v_proj(x))
        q, k = m.q_norm(q), m.k_norm(k)
        rope = call.kwargs.get("rope")
        if rope is not None:
            P, half = m.num_prefix_tokens, getattr(m, "rotate_half", False)
            q = torch.cat([q[:, :, :P], apply_rot_embed_cat(q[:, :, P:], rope, half=half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :P], apply_rot_embed_cat(k[:, :, P:], rope, half=half)], dim=2).type_as(v)
        return q, k, v

    def finish(self, merged: Tensor, x: Optional[Tensor]) -> Tensor:
        m = self.module
        return m.proj_drop(m.proj(m.norm(merged)))

    def attention_dropout(self, weights: Tensor) -> Tensor:
        return self.module.attn_drop(weights)


class EvaBlockView(BlockView):
    """``EvaBlock``: ``x + gamma_1 * attn(norm1(x), rope=...)``, then ``+ gamma_2 * mlp(norm2(.))``."""

    parts = PreNormParts(scale1="gamma_1", scale2="gamma_2", drop1="drop_path1", drop2="drop_path2")

    def __init__(self, block: nn.Module) -> None:
        from timm.models.eva import EvaAttention

        super().__init__(block, EvaAttentionMath(block.attn) if type(block.attn) is EvaAttention else None)

    def attention_call(self, call: Call) -> Call:
        return Call((), {k: v for k, v in call.kwargs.items() if k in ("rope", "attn_mask", "is_causal")})


class TimmEvaAdapter(TimmAdapter):
    """timm ``Eva`` (EVA-02, ``vit_*_rope*``) with pre-norm ``EvaBlock``s."""

    family = "timm Eva"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        from timm.models.eva import Eva

        return isinstance(module, Eva)

    def block_view(self, block: nn.Module) -> BlockView:
        from timm.models.eva import EvaBlock

        if type(block) is not EvaBlock:
            raise UnsupportedModelError(
                f"{self.family} block {type(block).__name__} is not one captum_vit knows (supported: timm EvaBlock "
                "with pre-norm wiring; not the post-norm EvaBlockPostNorm)."
            )
        return EvaBlockView(block)

    def unsupported_state(self) -> Optional[str]:
        if getattr(self.model, "rope_mixed", False):
            return "mixed-mode RoPE (a different rotary embedding per block) is not supported yet"
        return None
