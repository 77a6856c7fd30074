"""timm ``VisionTransformer`` (ViT, DeiT, distilled DeiT, registers) and ``NaFlexVit``.

Layout from timm's own attributes: ``num_prefix_tokens``, ``cls_token``,
``patch_embed.dynamic_feat_size`` (``embeds`` for NaFlexVit), ``blocks``,
``global_pool`` / ``attn_pool``, ``grad_checkpointing``. Blocks are timm's
pre-norm ``Block`` (``x + ls1(attn(norm1(x)))``, ``+ ls2(mlp(norm2(.)))``)
around ``timm.layers.Attention``.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from ._base import (
    HEAD_CLASS_AND_PATCHES,
    HEAD_PATCHES_ONLY,
    HEAD_PREFIX_ONLY,
    AttentionMath,
    BlockView,
    Call,
    LRPBlock,
    LRPHead,
    UnsupportedModelError,
    ViTAdapter,
)


class TimmAttentionMath(AttentionMath):
    """``timm.layers.Attention``: ``qkv`` -> q/k norm -> ``proj(norm(A v) * gate)``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module, module.num_heads, module.head_dim, module.scale)
        self.finish_reads_input = getattr(module, "gate", None) is not None

    def project(self, x: Tensor, call: Call) -> Tuple[Tensor, Tensor, Tensor]:
        m = self.module
        q, k, v = (self.split_heads(u) for u in m.qkv(x).chunk(3, dim=-1))
        return m.q_norm(q), m.k_norm(k), v

    def project_rows(self, x: Tensor, call: Call, rows: int) -> Tuple[Tensor, Tensor, Tensor]:
        m = self.module
        if type(self) is not TimmAttentionMath or type(m.qkv) is not nn.Linear:  # a LoRA qkv: call the module itself
            return super().project_rows(x, call, rows)
        width = m.qkv.out_features // 3
        weight, bias = m.qkv.weight, m.qkv.bias
        q = F.linear(x[:, :rows], weight[:width], None if bias is None else bias[:width])
        kv = F.linear(x, weight[width:], None if bias is None else bias[width:])
        k, v = (self.split_heads(u) for u in kv.chunk(2, dim=-1))
        return m.q_norm(self.split_heads(q)), m.k_norm(k), v

    def finish(self, merged: Tensor, x: Optional[Tensor]) -> Tensor:
        m = self.module
        out = m.norm(merged)
        if getattr(m, "gate", None) is not None:
            out = out * m.gate(x).sigmoid()
        return m.proj_drop(m.proj(out))

    def attention_dropout(self, weights: Tensor) -> Tensor:
        return self.module.attn_drop(weights)


def timm_attention_math(module: nn.Module) -> Optional[AttentionMath]:
    """The explicit form of a timm attention module, or ``None`` if unknown."""
    from timm.layers import Attention

    if type(module) is Attention:  # a subclass may compute something else
        return TimmAttentionMath(module)
    try:
        from timm.models.eva import EvaAttention
    except ImportError:  # pragma: no cover - older timm
        return None
    if type(module) is EvaAttention:
        from .timm_eva import EvaAttentionMath

        return EvaAttentionMath(module)
    return None


class TimmBlockView(BlockView):
    """timm ``Block``; also ``EvaBlock`` (layer scale as ``gamma_1``/``gamma_2``)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__(block, timm_attention_math(block.attn))
        self.norm1_module = block.norm1
        self.attention_module = block.attn
        self._passes_attention_args = _is_eva_block(block)

    def attention_call(self, call: Call) -> Call:
        if not self._passes_attention_args:
            return Call()
        return Call((), {k: v for k, v in call.kwargs.items() if k in ("rope", "attn_mask", "is_causal")})

    def attention(self, z: Tensor, call: Call) -> Tensor:
        return self.block.attn(z, *call.args, **call.kwargs)

    def layer_scale1(self, a: Tensor) -> Tensor:
        b = self.block
        if hasattr(b, "ls1"):
            return b.drop_path1(b.ls1(a))
        return b.drop_path1(a if b.gamma_1 is None else b.gamma_1 * a)

    def mlp_branch(self, y: Tensor) -> Tensor:
        b = self.block
        m = b.mlp(b.norm2(y))
        if hasattr(b, "ls2"):
            return b.drop_path2(b.ls2(m))
        return b.drop_path2(m if b.gamma_2 is None else b.gamma_2 * m)


    def lrp_block(self) -> Optional[LRPBlock]:
        from timm.layers import Mlp

        b, m = self.block, self.block.attn
        plain = (
            isinstance(self.math, TimmAttentionMath)
            and isinstance(m.q_norm, nn.Identity)
            and isinstance(m.k_norm, nn.Identity)
            and isinstance(m.norm, nn.Identity)
            and m.gate is None
            and all(isinstance(getattr(b, name, nn.Identity()), nn.Identity) for name in ("ls1", "ls2"))
            and type(b.mlp) is Mlp
            and isinstance(b.mlp.norm, nn.Identity)
            and isinstance(b.mlp.fc1, nn.Linear)
            and isinstance(b.mlp.fc2, nn.Linear)
        )
        if not plain:
            return None
        return LRPBlock(b.norm1, m.qkv, m.num_heads, float(m.scale), m.proj, b.norm2, b.mlp.fc1, b.mlp.act, b.mlp.fc2)


def _is_eva_block(block: nn.Module) -> bool:
    try:
        from timm.models.eva import EvaBlock
    except ImportError:  # pragma: no cover
        return False
    return type(block) is EvaBlock


def timm_block_view(block: nn.Module, family: str) -> BlockView:
    """A view of a timm pre-norm block, or a refusal naming what is supported."""
    from timm.models.vision_transformer import Block

    if type(block) is Block or _is_eva_block(block):
        return TimmBlockView(block)
    raise UnsupportedModelError(
        f"{family} block {type(block).__name__} is not one captum_vit knows (supported: timm Block, EvaBlock "
        "with pre-norm wiring). Use a model built from those blocks."
    )


def timm_head_reads(model: nn.Module, num_prefix_tokens: int) -> str:
    """What timm's ``forward_head`` reads, from ``global_pool`` / ``attn_pool``."""
    pool = getattr(model, "global_pool", None)
    if getattr(model, "attn_pool", None) is not None or pool == "map":
        return HEAD_CLASS_AND_PATCHES
    if pool == "token":
        return HEAD_PREFIX_ONLY
    if pool in ("avg", "max", "avgmax") and getattr(model, "pool_include_prefix", False):
        return HEAD_CLASS_AND_PATCHES
    return HEAD_PATCHES_ONLY


class TimmAdapter(ViTAdapter):
    """What timm's ViT-like models share: ``blocks``, ``num_prefix_tokens``,
    ``cls_token``, ``patch_embed`` (grid from ``dynamic_feat_size`` when the
    model takes any size), ``global_pool``, ``grad_checkpointing``."""

    library = "timm"

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
        pe = self.image_module
        if getattr(self.model, "dynamic_img_size", False) or not hasattr(pe, "grid_size"):
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
        return [(self.model, "grad_checkpointing")] if hasattr(self.model, "grad_checkpointing") else []


class TimmViTAdapter(TimmAdapter):
    """timm ``VisionTransformer`` and subclasses (``VisionTransformerDistilled``)."""

    family = "timm VisionTransformer"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(module, VisionTransformer)

    @property
    def head_reads(self) -> str:
        from timm.models.deit import VisionTransformerDistilled
        from timm.models.vision_transformer import VisionTransformer

        m = self.model
        own_heads = (VisionTransformer.forward_head, VisionTransformerDistilled.forward_head)
        if type(m).forward_head not in own_heads:
            return HEAD_CLASS_AND_PATCHES  # a custom head: assume it may read anything
        return timm_head_reads(m, self.num_prefix_tokens)

    def forward_to_block(self, images: Tensor, index: int) -> Tensor:
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))
        for block in list(m.blocks)[:index]:
            x = block(x)
        return x

    def forward_head_on_prefix(self, prefix: Tensor) -> Tensor:
        m = self.model
        return m.forward_head(m.norm(prefix))  # token pooling (and the distillation token) read prefix rows only

    def lrp_head(self) -> Optional[LRPHead]:
        from timm.models.vision_transformer import VisionTransformer

        m = self.model
        if type(m) is not VisionTransformer or m.global_pool != "token" or getattr(m, "attn_pool", None) is not None:
            return None  # distilled DeiT averages two heads; pooled heads read patch tokens
        if not isinstance(m.fc_norm, nn.Identity) or not isinstance(m.head, nn.Linear):
            return None
        return LRPHead(m.norm, m.head, 0)

    def unsupported_state(self) -> Optional[str]:
        m = self.model
        if getattr(m, "distilled_training", False) and m.training:
            return (
                "this distilled DeiT is in distilled-training mode and returns (class, distillation) logits "
                "separately; call model.eval() (or model.set_distilled_training(False)) so that it returns "
                "their average, which is what gets explained"
            )
        return None


class TimmNaFlexViTAdapter(TimmAdapter):
    """timm ``NaFlexVit`` on ``(B, C, H, W)`` images (patch embedding ``embeds``)."""

    family = "timm NaFlexVit"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        try:
            from timm.models.naflexvit import NaFlexVit
        except ImportError:  # pragma: no cover
            return False
        return isinstance(module, NaFlexVit)

    @property
    def has_class_token(self) -> bool:
        return bool(getattr(self.model, "has_class_token", False))

    @property
    def image_module(self) -> nn.Module:
        return self.model.embeds

    def grid_for(self, image_hw: Sequence[int]) -> Tuple[int, int]:
        h, w = self.model.embeds.dynamic_feat_size(tuple(int(s) for s in image_hw))
        return int(h), int(w)
