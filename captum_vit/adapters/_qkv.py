"""The fused ``qkv`` projection with separate q/k/v biases that timm's EVA and BEiT attentions share."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def fused_qkv_with_biases(module: nn.Module, x: Tensor) -> Tensor:
    """``(B, T, 3 * D)``: ``module.qkv(x)`` with ``q_bias``/``k_bias``/``v_bias`` as the module's forward adds them.

    With ``qkv_bias_separate`` the biases go around the module's own call
    (which keeps a LoRA-style ``qkv`` in the computation); otherwise they are
    the linear layer's bias.
    """
    if module.q_bias is None:
        return module.qkv(x)
    bias = torch.cat((module.q_bias, module.k_bias, module.v_bias))
    if getattr(module, "qkv_bias_separate", False):
        return module.qkv(x) + bias
    return F.linear(x, module.qkv.weight, bias)
