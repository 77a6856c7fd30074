"""timm ``VisionTransformer`` (ViT, DeiT, distilled DeiT, registers) and ``NaFlexVit``.

Layout from timm's own attributes (`._timm`); blocks are timm's pre-norm
``Block`` (``x + ls1(attn(norm1(x)))``, ``+ ls2(mlp(norm2(.)))``) around
``timm.layers.Attention`` (fused ``qkv``, optional q/k norm, output norm and
gate).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

from torch import Tensor, nn

from ._base import HEAD_CLASS_AND_PATCHES
from ._block_view import BlockView
from ._capabilities import LRPBlock, LRPHead
from ._timm import TimmAdapter, TimmAttentionMath, timm_block_view, timm_head_reads


class TimmViTAdapter(TimmAdapter):
    """timm ``VisionTransformer`` and subclasses (``VisionTransformerDistilled``); supports LRP and export."""

    family = "timm VisionTransformer"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(module, VisionTransformer)

    @property
    def head_reads(self) -> str:
        from timm.models.deit import VisionTransformerDistilled
        from timm.models.vision_transformer import VisionTransformer

        own_heads = (VisionTransformer.forward_head, VisionTransformerDistilled.forward_head)
        if type(self.model).forward_head not in own_heads:
            return HEAD_CLASS_AND_PATCHES  # a custom head: assume it may read anything
        return timm_head_reads(self.model)

    def block_view(self, block: nn.Module) -> BlockView:
        return timm_block_view(block, self.family)

    def unsupported_state(self) -> Optional[str]:
        m = self.model
        if getattr(m, "distilled_training", False) and m.training:
            return (
                "this distilled DeiT is in distilled-training mode and returns (class, distillation) logits "
                "separately; call model.eval() (or model.set_distilled_training(False)) so that it returns "
                "their average, which is what gets explained"
            )
        return None

    # -- SupportsExport ----------------------------------------------------------
    def default_image_size(self) -> Optional[Tuple[int, int]]:
        size = getattr(self.model.patch_embed, "img_size", None)
        return None if size is None else (int(size[0]), int(size[1]))

    def forward_to_block(self, images: Tensor, index: int) -> Tensor:
        import torch

        m = self.model
        if index == 0:  # no public seam gives the tokens entering block 0 (forward_intermediates starts after it)
            return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))
        (spatial, prefix), = m.forward_intermediates(images, indices=[index - 1], output_fmt="NLC", norm=False,
                                                     return_prefix_tokens=True, intermediates_only=True,
                                                     stop_early=True)
        return torch.cat([prefix, spatial], dim=1)

    def forward_head_on_prefix(self, prefix: Tensor) -> Tensor:
        m = self.model
        return m.forward_head(m.norm(prefix))  # token pooling (and the distillation token) read prefix rows only

    # -- SupportsLRP ---------------------------------------------------------------
    def lrp_head(self) -> Optional[LRPHead]:
        from timm.models.vision_transformer import VisionTransformer

        m = self.model
        if type(m) is not VisionTransformer or m.global_pool != "token" or getattr(m, "attn_pool", None) is not None:
            return None  # distilled DeiT averages two heads; pooled heads read patch tokens
        if not isinstance(m.fc_norm, nn.Identity) or not isinstance(m.head, nn.Linear):
            return None
        return LRPHead(m.norm, m.head, 0)

    def lrp_block(self, view: BlockView) -> Optional[LRPBlock]:
        from timm.layers import Mlp

        b = view.block
        m = b.attn
        plain = (
            isinstance(view.math, TimmAttentionMath)
            and all(isinstance(part, nn.Identity) for part in (m.q_norm, m.k_norm, m.norm, b.ls1, b.ls2))
            and m.gate is None
            and type(b.mlp) is Mlp
            and isinstance(b.mlp.norm, nn.Identity)
            and isinstance(b.mlp.fc1, nn.Linear)
            and isinstance(b.mlp.fc2, nn.Linear)
        )
        if not plain:
            return None
        return LRPBlock(b.norm1, m.qkv, m.num_heads, float(m.scale), m.proj, b.norm2, b.mlp.fc1, b.mlp.act, b.mlp.fc2)


class TimmNaFlexViTAdapter(TimmAdapter):
    """timm ``NaFlexVit`` on ``(B, C, H, W)`` images (patch embedding ``embeds``); timm ``Block``s."""

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

    def block_view(self, block: nn.Module) -> BlockView:
        return timm_block_view(block, self.family)
