"""What timm's ViT-like models share: ``blocks``, ``num_prefix_tokens``, ``cls_token``, ``patch_embed``,
``global_pool``/``attn_pool`` and ``grad_checkpointing``. The families' own files (``timm_vit``, ``timm_eva``,
``timm_beit``) add their blocks and attention."""

from __future__ import annotations

from typing import Any, List, Sequence, Tuple

from torch import nn

from ._base import HEAD_CLASS_AND_PATCHES, HEAD_PATCHES_ONLY, HEAD_PREFIX_ONLY, ViTAdapter


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
