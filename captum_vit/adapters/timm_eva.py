"""timm ``Eva``: EVA-02 and the RoPE ViTs (``vit_*_rope*``).

Blocks are ``EvaBlock`` (pre-norm, layer scale as ``gamma_1``/``gamma_2``);
the rotary embedding reaches each block as its ``rope`` argument and is
passed on unchanged when a block is re-run. ``EvaAttention`` applies RoPE to
the patch tokens' queries and keys only (not the ``num_prefix_tokens`` first).
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import AttentionMath, BlockView, Call, ViTAdapter
from .timm_vit import timm_block_view, timm_head_reads


class EvaAttentionMath(AttentionMath):
    """``EvaAttention``: fused or separate ``q/k/v`` projections, q/k norm, RoPE, ``proj(norm(.) * gate)``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module, module.num_heads, module.head_dim, module.scale)
        self.affine = isinstance(module.q_norm, nn.Identity) and isinstance(module.k_norm, nn.Identity)

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

    def finish(self, merged: Tensor, x: Tensor) -> Tensor:
        m = self.module
        out = m.norm(merged)
        if m.gate is not None:
            out = out * m.gate(x).sigmoid()
        return m.proj_drop(m.proj(out))

    def attention_dropout(self, weights: Tensor) -> Tensor:
        return self.module.attn_drop(weights)


class TimmEvaAdapter(ViTAdapter):
    """timm ``Eva`` (EVA-02, ``vit_*_rope*``) with pre-norm ``EvaBlock``s."""

    family = "timm Eva"
    library = "timm"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        from timm.models.eva import Eva

        return isinstance(module, Eva)

    @property
    def blocks(self) -> List[nn.Module]:
        return list(self.model.blocks)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.model.num_prefix_tokens)

    @property
    def has_class_token(self) -> bool:
        return getattr(self.model, "cls_token", None) is not None

    @property
    def image_module(self) -> nn.Module:
        return self.model.patch_embed

    def grid_for(self, image_hw: Sequence[int]) -> Tuple[int, int]:
        pe = self.model.patch_embed
        if getattr(self.model, "dynamic_img_size", False):
            h, w = pe.dynamic_feat_size(tuple(int(s) for s in image_hw))
        else:
            h, w = pe.grid_size
        return int(h), int(w)

    @property
    def head_reads(self) -> str:
        return timm_head_reads(self.model, self.num_prefix_tokens)

    def block_view(self, block: nn.Module) -> BlockView:
        return timm_block_view(block, self.family)

    def checkpointing_flags(self) -> List[Tuple[Any, str]]:
        return [(self.model, "grad_checkpointing")]

    def unsupported_state(self) -> Optional[str]:
        if getattr(self.model, "rope_mixed", False):
            return "mixed-mode RoPE (a different rotary embedding per block) is not supported yet"
        return None
