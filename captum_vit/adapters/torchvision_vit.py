"""torchvision ``VisionTransformer`` (``vit_b_16`` and friends).

Blocks are ``EncoderBlock``: ``x = input + dropout(self_attention(ln_1(input)))``,
``x + mlp(ln_2(x))``, around PyTorch's ``nn.MultiheadAttention`` (batch first).
The class token is the only prefix token and the head reads it alone.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

from torch import Tensor, nn

from ._attention_math import Call
from ._base import HEAD_PREFIX_ONLY, ViTAdapter
from ._block_view import BlockView, PreNormParts
from ._errors import lazy_isinstance
from ._multihead import MultiheadAttentionMath


class EncoderBlockView(BlockView):
    parts = PreNormParts(norm1="ln_1", attention="self_attention", norm2="ln_2", drop1="dropout")

    def __init__(self, block: nn.Module) -> None:
        super().__init__(block, MultiheadAttentionMath(block.self_attention))

    def attention(self, z: Tensor, call: Call) -> Tensor:
        return self.block.self_attention(z, z, z, need_weights=False)[0]


class TorchvisionViTAdapter(ViTAdapter):
    """torchvision ``VisionTransformer``."""

    family = "torchvision VisionTransformer"
    library = "torchvision"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return lazy_isinstance(module, "torchvision.models.vision_transformer", ["VisionTransformer"])

    @property
    def blocks(self) -> List[nn.Module]:
        return list(self.model.encoder.layers)

    @property
    def num_prefix_tokens(self) -> int:
        return 1

    @property
    def image_module(self) -> nn.Module:
        return self.model.conv_proj

    def grid_for(self, image_hw: Sequence[int]) -> Tuple[int, int]:
        p = self.model.patch_size
        return int(image_hw[0]) // p, int(image_hw[1]) // p

    @property
    def head_reads(self) -> str:
        return HEAD_PREFIX_ONLY

    def block_view(self, block: nn.Module) -> BlockView:
        return EncoderBlockView(block)
