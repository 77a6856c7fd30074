"""What timm's ViT-like models share: ``blocks``, ``num_prefix_tokens``, ``cls_token``, ``patch_embed``,
``global_pool``/``attn_pool`` and ``grad_checkpointing``; the fused-``qkv`` attention and the pre-norm block with
layer scales ``ls1``/``ls2`` that ``timm.layers.Attention``/``Block`` and ``RelPosAttention``/``RelPosBlock`` share;
the view of timm's ``Block`` itself, which several families build on (ViT, DeiT, NaFlexViT, PiT). The families' own
files (``timm_vit``, ``timm_eva``, ``timm_beit``, ``timm_relpos``, ``timm_pit``, ...) add their blocks and attention."""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from ._attention_math import AttentionMath, Call, KeyValueMaps
from ._base import HEAD_CLASS_AND_PATCHES, HEAD_PATCHES_ONLY, HEAD_PREFIX_ONLY, ViTAdapter
from ._block_view import BlockView, MlpEntry, PreNormParts
from ._errors import UnsupportedModelError


class FusedQkvAttentionMath(AttentionMath):
    """timm's fused ``qkv`` attention: ``qkv`` -> per-head ``q_norm``/``k_norm``; ``proj_drop(proj(A v))`` after."""

    finish_reads_input = False

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module, module.num_heads, module.head_dim, module.scale)

    def project(self, x: Tensor, call: Call) -> Tuple[Tensor, Tensor, Tensor]:
        m = self.module
        q, k, v = (self.split_heads(u) for u in m.qkv(x).chunk(3, dim=-1))
        return m.q_norm(q), m.k_norm(k), v

    def project_rows(self, x: Tensor, call: Call, rows: int) -> Tuple[Tensor, Tensor, Tensor]:
        m = self.module
        if type(m.qkv) is not nn.Linear:  # a LoRA-style qkv: call the module itself
            return super().project_rows(x, call, rows)
        width = m.qkv.out_features // 3
        weight, bias = m.qkv.weight, m.qkv.bias
        q = F.linear(x[:, :rows], weight[:width], None if bias is None else bias[:width])
        kv = F.linear(x, weight[width:], None if bias is None else bias[width:])
        k, v = (self.split_heads(u) for u in kv.chunk(2, dim=-1))
        return m.q_norm(self.split_heads(q)), m.k_norm(k), v

    def key_value_maps(self, call: Call) -> Optional[KeyValueMaps]:
        m = self.module
        plain = type(m.qkv) is nn.Linear and isinstance(m.k_norm, nn.Identity)
        if not plain or type(self).project is not FusedQkvAttentionMath.project:  # a subclass's own projection
            return None
        return KeyValueMaps.of_fused(m.qkv.weight, m.qkv.bias, self.num_heads, self.head_dim)

    def finish(self, merged: Tensor, x: Optional[Tensor]) -> Tensor:
        return self.module.proj_drop(self.module.proj(merged))

    def attention_dropout(self, weights: Tensor) -> Tensor:
        return self.module.attn_drop(weights)


class LayerScaleBlockView(BlockView):
    """timm's pre-norm block: ``x + drop_path1(ls1(attn(norm1(x))))``, then ``+ drop_path2(ls2(mlp(norm2(.))))``."""

    parts = PreNormParts(scale1="ls1", scale2="ls2", drop1="drop_path1", drop2="drop_path2")

    def mlp_entry(self) -> Optional[MlpEntry]:
        from timm.layers import Mlp

        b = self.block
        mlp = b.mlp
        plain = type(mlp) is Mlp and type(mlp.fc1) is nn.Linear and isinstance(b.norm2, nn.LayerNorm)
        if not plain or len(b.norm2.normalized_shape) != 1:
            return None
        rest = lambda h: mlp.drop2(mlp.fc2(mlp.norm(mlp.drop1(mlp.act(h)))))  # noqa: E731 - timm Mlp after fc1
        return MlpEntry(b.norm2, mlp.fc1, lambda h: self._branch(rest(h), self.parts.scale2, self.parts.drop2))


class TimmAttentionMath(FusedQkvAttentionMath):
    """``timm.layers.Attention``: ``qkv`` -> q/k norm -> ``proj(norm(A v) * gate)``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self.finish_reads_input = module.gate is not None

    def finish(self, merged: Tensor, x: Optional[Tensor]) -> Tensor:
        m = self.module
        out = m.norm(merged)
        if m.gate is not None:
            out = out * m.gate(x).sigmoid()
        return m.proj_drop(m.proj(out))


class TimmBlockView(LayerScaleBlockView):
    """timm ``Block`` (layer scales ``ls1``/``ls2``)."""

    def __init__(self, block: nn.Module) -> None:
        from timm.layers import Attention

        # a subclass of Attention may compute something else: only the class itself has an explicit form
        super().__init__(block, TimmAttentionMath(block.attn) if type(block.attn) is Attention else None)


def timm_block_view(block: nn.Module, family: str) -> TimmBlockView:
    """A view of timm's ``Block``, or a refusal naming what is supported."""
    from timm.models.vision_transformer import Block

    if type(block) is not Block:
        raise UnsupportedModelError(
            f"{family} block {type(block).__name__} is not one captum_vit knows (supported: timm Block with "
            "pre-norm wiring). Use a model built from those blocks."
        )
    return TimmBlockView(block)


def timm_head_reads(model: nn.Module) -> str:
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
    """The layout timm's ViT-like models share; the grid comes from ``dynamic_feat_size`` when any size is taken."""

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
        return timm_head_reads(self.model)

    def checkpointing_flags(self) -> List[Tuple[Any, str]]:
        return [(self.model, "grad_checkpointing")] if hasattr(self.model, "grad_checkpointing") else []
