"""open_clip ``VisionTransformer`` (the image tower of CLIP models), under a user's head.

Blocks are ``ResidualAttentionBlock`` (``ln_1``, ``attn`` = batch-first
``nn.MultiheadAttention``, ``ls_1``, ``ln_2``, ``mlp``, ``ls_2``); the class
embedding is the only prefix token. The tower returns an embedding, so a
classifier is the user's head on top; with ``pool_type="tok"`` everything it
reads comes from the class token.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

from torch import Tensor, nn

from ._attention_math import Call
from ._base import HEAD_CLASS_AND_PATCHES, HEAD_PATCHES_ONLY, HEAD_PREFIX_ONLY, ViTAdapter
from ._block_view import BlockView, PreNormParts
from ._errors import UnsupportedModelError, lazy_isinstance
from ._multihead import MultiheadAttentionMath


class ResidualAttentionBlockView(BlockView):
    parts = PreNormParts(norm1="ln_1", norm2="ln_2", scale1="ls_1", scale2="ls_2")

    def __init__(self, block: nn.Module) -> None:
        super().__init__(block, MultiheadAttentionMath(block.attn))

    def read_call(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[Tensor, Call]:
        x, call = super().read_call(args, kwargs)
        if call.args or any(v is not None for v in call.kwargs.values()):
            raise UnsupportedModelError("open_clip block called with k_x/v_x/attn_mask: only plain self-attention is supported.")
        return x, call

    def attention(self, z: Tensor, call: Call) -> Tensor:
        return self.block.attention(q_x=z)



class OpenClipViTAdapter(ViTAdapter):
    """open_clip ``VisionTransformer``."""

    family = "open_clip VisionTransformer"
    library = "open_clip"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return lazy_isinstance(module, "open_clip.transformer", ["VisionTransformer"])

    @property
    def blocks(self) -> List[nn.Module]:
        return list(self.model.transformer.resblocks)

    @property
    def num_prefix_tokens(self) -> int:
        return 1

    @property
    def image_module(self) -> nn.Module:
        return self.model.conv1

    def grid_for(self, image_hw: Sequence[int]) -> Tuple[int, int]:
        sh, sw = self.model.conv1.stride
        return int(image_hw[0]) // sh, int(image_hw[1]) // sw

    @property
    def head_reads(self) -> str:
        m = self.model
        if getattr(m, "attn_pool", None) is not None:
            return HEAD_CLASS_AND_PATCHES
        if m.pool_type == "tok" and not getattr(m, "output_tokens", False):
            return HEAD_PREFIX_ONLY
        return HEAD_PATCHES_ONLY if m.pool_type == "avg" else HEAD_CLASS_AND_PATCHES

    def block_view(self, block: nn.Module) -> BlockView:
        from open_clip.transformer import ResidualAttentionBlock

        if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
            raise UnsupportedModelError(
                f"open_clip block {type(block).__name__} is not supported (supported: ResidualAttentionBlock "
                "self-attention, block_type='default')."
            )
        return ResidualAttentionBlockView(block)

    def checkpointing_flags(self) -> List[Tuple[Any, str]]:
        return [(self.model.transformer, "grad_checkpointing")]
