"""torchvision ``VisionTransformer`` (``vit_b_16`` and friends).

Blocks are ``EncoderBlock``: ``x = input + dropout(self_attention(ln_1(input)))``,
``x + mlp(ln_2(x))``, around PyTorch's ``nn.MultiheadAttention`` (batch first).
The class token is the only prefix token and the head reads it alone.
"""

from __future__ import annotations

from typing import Optional, Any, Dict, List, Sequence, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from ._base import HEAD_PREFIX_ONLY, AttentionMath, BlockView, Call, UnsupportedModelError, ViTAdapter


class MultiheadAttentionMath(AttentionMath):
    """PyTorch ``nn.MultiheadAttention`` used as batch-first self-attention."""

    finish_reads_input = False

    def __init__(self, module: nn.MultiheadAttention) -> None:
        if not module.batch_first or not module._qkv_same_embed_dim or module.bias_k is not None:
            raise UnsupportedModelError(
                "nn.MultiheadAttention must be batch_first, with one in_proj_weight and no add_bias_kv, "
                "for captum_vit's explicit attention."
            )
        super().__init__(module, module.num_heads, module.head_dim, module.head_dim**-0.5)

    def read_call(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[Tensor, Call]:
        names = ("query", "key", "value")
        given = list(args[:3]) + [kwargs.get(n) for n in names[len(args[:3]) :]]
        query, key, value = given
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise UnsupportedModelError("nn.MultiheadAttention is used as cross-attention; only self-attention is supported.")
        rest = {k: v for k, v in kwargs.items() if k not in names}
        return query, Call(tuple(args[3:]), rest)

    def project(self, x: Tensor, call: Call) -> Tuple[Tensor, Tensor, Tensor]:
        m = self.module
        u = F.linear(x, m.in_proj_weight, m.in_proj_bias)
        q, k, v = (self.split_heads(t) for t in u.chunk(3, dim=-1))
        return q, k, v

    def finish(self, merged: Tensor, x: Optional[Tensor]) -> Tensor:
        return self.module.out_proj(merged)

    def attention_dropout(self, weights: Tensor) -> Tensor:
        return F.dropout(weights, self.module.dropout, self.module.training)

    def wrap_output(self, original: Any, out: Tensor) -> Any:
        return (out, *original[1:])

    def unwrap_output(self, output: Any) -> Tensor:
        return output[0]


class EncoderBlockView(BlockView):
    def __init__(self, block: nn.Module) -> None:
        super().__init__(block, MultiheadAttentionMath(block.self_attention))
        self.norm1_module = block.ln_1
        self.attention_module = block.self_attention

    def attention(self, z: Tensor, call: Call) -> Tensor:
        return self.block.self_attention(z, z, z, need_weights=False)[0]

    def layer_scale1(self, a: Tensor) -> Tensor:
        return self.block.dropout(a)

    def mlp_branch(self, y: Tensor) -> Tensor:
        return self.block.mlp(self.block.ln_2(y))


class TorchvisionViTAdapter(ViTAdapter):
    """torchvision ``VisionTransformer``."""

    family = "torchvision VisionTransformer"
    library = "torchvision"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        from ._base import lazy_isinstance

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
