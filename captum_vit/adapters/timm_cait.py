"""timm ``Cait`` (``cait_xxs24_224`` and friends): self-attention on patches, then class attention.

``model.blocks`` are ``LayerScaleBlock``s on the patch tokens alone:
``x + drop_path(gamma_1 * attn(norm1(x)))``, then
``+ drop_path(gamma_2 * mlp(norm2(.)))``, with talking-heads attention
(``TalkingHeadAttn``: the heads are mixed before and after the softmax). The
class token joins only in ``blocks_token_only`` (``LayerScaleBlockClassAttn``),
where it attends to every patch token, and the head reads it.

So the explained blocks (those ViT-ReciproCAM masks) are ``model.blocks``,
with no prefix token; the class-attention blocks read the masked copies'
patch tokens as the rest of the model. Talking-heads attention has no
explicit form here: the general path runs it as it is.
"""

from __future__ import annotations

from torch import nn

from ._base import HEAD_PATCHES_ONLY
from ._block_view import BlockView, PreNormParts
from ._errors import UnsupportedModelError
from ._timm import TimmAdapter

CLASS_ATTENTION_REFUSAL = (
    "its self-attention blocks see no class token: the class token joins only in the class-attention blocks at "
    "the end, so no class-token attention row runs through the blocks. Use LayerReciproCAM (any self-attention "
    "block)"
)


class GammaBlockView(BlockView):
    """A pre-norm block with layer scales ``gamma_1``/``gamma_2`` and one ``drop_path`` (CaiT's ``LayerScaleBlock``)."""

    parts = PreNormParts(scale1="gamma_1", scale2="gamma_2", drop1="drop_path", drop2="drop_path")


class TimmCaitAdapter(TimmAdapter):
    """timm ``Cait``: the self-attention blocks on the patch grid; the class token comes after them."""

    family = "timm Cait"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        from timm.models.cait import Cait

        return isinstance(module, Cait)

    @property
    def num_prefix_tokens(self) -> int:
        return 0  # in model.blocks; the class token is prepended after them

    @property
    def head_reads(self) -> str:
        return HEAD_PATCHES_ONLY  # of the last self-attention block's output: class attention reads every patch

    def attention_refusal(self) -> str:
        return CLASS_ATTENTION_REFUSAL

    def block_view(self, block: nn.Module) -> BlockView:
        from timm.models.cait import LayerScaleBlock

        if type(block) is not LayerScaleBlock:
            raise UnsupportedModelError(
                f"CaiT block {type(block).__name__} is not supported (supported: timm's LayerScaleBlock, the "
                "self-attention blocks in model.blocks). Explain one of model.blocks."
            )
        return GammaBlockView(block)
