"""timm ``Xcit`` (``xcit_tiny_12_p16_224`` and friends): cross-covariance blocks on patches, then class attention.

``model.blocks`` are ``XCABlock``s called as ``block(x, H, W)`` on the patch
tokens alone, with three branches:
``x + drop_path1(gamma1 * attn(norm1(x)))`` (cross-covariance attention: a
``D/H x D/H`` attention over channels), then
``+ drop_path3(gamma3 * local_mp(norm3(.), H, W))`` (a depthwise convolution
over the grid), then ``+ drop_path2(gamma2 * mlp(norm2(.)))``. The class
token joins in ``cls_attn_blocks`` at the end and the head reads it. The
patch embedding is a stack of stride-2 convolutions.

ViT-ReciproCAM masks the input of an ``XCABlock`` (its attention branch
reads the masked copy; the local and MLP branches follow as the block does)
on the general path; the class-attention blocks read the masked copies.
"""

from __future__ import annotations

from typing import Sequence, Tuple

from torch import Tensor, nn

from ._attention_math import Call
from ._base import HEAD_PATCHES_ONLY
from ._block_view import BlockView, PreNormParts
from ._errors import UnsupportedModelError
from ._grid import conv_output
from ._timm import TimmAdapter

CROSS_COVARIANCE_REFUSAL = (
    "its blocks attend across channels (cross-covariance attention: D/H x D/H matrices), not across tokens, and "
    "the class token joins only in the class-attention blocks at the end. Use LayerReciproCAM (any XCA block)"
)


class XcaBlockView(BlockView):
    """timm ``XCABlock``: attention, then local patch interaction on the ``(H, W)`` grid of its call, then MLP."""

    parts = PreNormParts(scale1="gamma1", scale2="gamma2", drop1="drop_path1", drop2="drop_path2")

    def attention_call(self, call: Call) -> Call:
        return call  # the grid (H, W) for the local branch

    def attention(self, z: Tensor, call: Call) -> Tensor:
        return self.block.attn(z)

    def forward(self, z: Tensor, residual: Tensor, call: Call) -> Tensor:
        b = self.block
        H, W = call.args if call.args else (call.kwargs["H"], call.kwargs["W"])
        y = residual + self.layer_scale1(self.attention(z, call))
        y = y + b.drop_path3(b.gamma3 * b.local_mp(b.norm3(y), H, W))
        return y + self.mlp_branch(y)


class TimmXcitAdapter(TimmAdapter):
    """timm ``Xcit``: the XCA blocks on the patch grid of its convolutional patch embedding."""

    family = "timm Xcit"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        from timm.models.xcit import Xcit

        return isinstance(module, Xcit)

    @property
    def num_prefix_tokens(self) -> int:
        return 0  # in model.blocks; the class token is prepended after them

    def grid_for(self, image_hw: Sequence[int]) -> Tuple[int, int]:
        h, w = int(image_hw[0]), int(image_hw[1])
        for conv in (m for m in self.image_module.modules() if isinstance(m, nn.Conv2d)):  # applied in this order
            h, w = conv_output(h, conv, 0), conv_output(w, conv, 1)
        return h, w

    @property
    def head_reads(self) -> str:
        return HEAD_PATCHES_ONLY  # of the last XCA block's output: class attention reads every patch

    def attention_refusal(self) -> str:
        return CROSS_COVARIANCE_REFUSAL

    def block_view(self, block: nn.Module) -> BlockView:
        from timm.models.xcit import XCABlock

        if type(block) is not XCABlock:
            raise UnsupportedModelError(
                f"XCiT block {type(block).__name__} is not supported (supported: timm's XCABlock, the "
                "cross-covariance blocks in model.blocks). Explain one of model.blocks."
            )
        return XcaBlockView(block)
