"""PyTorch's ``nn.MultiheadAttention`` as batch-first self-attention (torchvision's and open_clip's ViTs)."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from ._attention_math import AttentionMath, Call, KeyValueMaps
from ._errors import UnsupportedModelError


class MultiheadAttentionMath(AttentionMath):
    """``nn.MultiheadAttention`` with one ``in_proj_weight``, batch first, no ``add_bias_kv``."""

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

    def key_value_maps(self, call: Call) -> Optional[KeyValueMaps]:
        m = self.module
        return KeyValueMaps.of_fused(m.in_proj_weight, m.in_proj_bias, self.num_heads, self.head_dim)

    def finish(self, merged: Tensor, x: Optional[Tensor]) -> Tensor:
        return self.module.out_proj(merged)

    def attention_dropout(self, weights: Tensor) -> Tensor:
        return F.dropout(weights, self.module.dropout, self.module.training)

    def wrap_output(self, original: Any, out: Tensor) -> Any:
        return (out, *original[1:])

    def unwrap_output(self, output: Any) -> Tensor:
        return output[0]
