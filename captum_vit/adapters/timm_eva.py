"""timm ``Eva``: EVA-02 and the RoPE ViTs (``vit_*_rope*``).

Blocks are ``EvaBlock`` (pre-norm, layer scale as ``gamma_1``/``gamma_2``);
the rotary embedding reaches each block as its ``rope`` argument and is
passed on unchanged when a block is re-run. ``EvaAttention`` applies RoPE to
the patch tokens' queries and keys only (not the ``num_prefix_tokens`` first).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import Call
from .timm_vit import TimmAdapter, TimmAttentionMath


class EvaAttentionMath(TimmAttentionMath):
    """``EvaAttention``: fused or separate ``q/k/v`` projections, q/k norm, RoPE; then as timm's ``Attention``."""

    def project(self, x: Tensor, call: Call) -> Tuple[Tensor, Tensor, Tensor]:
        from timm.layers import apply_rot_embed_cat

        m = self.module
        if m.qkv is not None:
            if m.q_bias is None:
                qkv = m.qkv(x)
            else:  # as EvaAttention.forward: the bias goes around the module's own call
                bias = torch.cat((m.q_bias, m.k_bias, m.v_bias))
                qkv = m.qkv(x) + bias if m.qkv_bias_separate else F.linear(x, m.qkv.weight, bias)
            q, k, v = (self.split_heads(u) for u in qkv.chunk(3, dim=-1))
        else:
            q, k, v = self.split_heads(m.q_proj(x)), self.split_heads(m.k_proj(x)), self.split_heads(m.v_proj(x))
        q, k = m.q_norm(q), m.k_norm(k)
        rope = call.kwargs.get("rope")
        if rope is not None:
            P, half = m.num_prefix_tokens, getattr(m, "rotate_half", False)
            q = torch.cat([q[:, :, :P], apply_rot_embed_cat(q[:, :, P:], rope, half=half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :P], apply_rot_embed_cat(k[:, :, P:], rope, half=half)], dim=2).type_as(v)
        return q, k, v



class TimmEvaAdapter(TimmAdapter):
    """timm ``Eva`` (EVA-02, ``vit_*_rope*``) with pre-norm ``EvaBlock``s."""

    family = "timm Eva"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        from timm.models.eva import Eva

        return isinstance(module, Eva)

    def unsupported_state(self) -> Optional[str]:
        if getattr(self.model, "rope_mixed", False):
            return "mixed-mode RoPE (a different rotary embedding per block) is not supported yet"
        return None
