"""Captum's own methods set up for ViTs, for comparisons in the same loop.

Captum's ``LayerGradCam`` on a ViT block output averages gradients over the
embedding and sums over tokens, which is meaningless (docs/methods.md section 6).
`vit_layer_gradcam` exposes the patch tokens of a layer as a
``(B, D, h, w)`` feature map first, then hands them to Captum's own class.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from captum.attr import IntegratedGradients, LayerGradCam
from torch import Tensor, nn

from ._utils import HookSet
from .adapters import ViTAdapter, eager_forward_func, find_adapter


class TokenGridForward(nn.Module):
    """``forward_func`` with one layer's patch tokens routed through ``self.grid``.

    During each call a forward hook on ``layer`` reshapes its output's patch
    tokens (``(B, T, D)``, or the ``(B, h, w, D)`` grid of a Swin block) to
    ``(B, D, h, w)``, passes them through ``self.grid`` (an identity module
    Captum can hook), and puts them back. The grid is that of the block
    holding ``layer`` (hierarchical models have one per stage). The hook
    exists only while the call runs.
    """

    def __init__(self, forward_func: Callable[..., Any], layer: nn.Module, adapter: ViTAdapter) -> None:
        super().__init__()
        self.forward_func = forward_func
        self.layer = layer
        self.adapter = adapter
        self.grid = nn.Identity()
        self._image_hw: Any = None
        holding = [i for i, block in enumerate(adapter.blocks) if any(m is layer for m in block.modules())]
        self.block_index: Optional[int] = holding[0] if holding else None

    def forward(self, *args: Any) -> Tensor:
        with self.adapter.explaining(), self.adapter.recording_image_size() as size, HookSet() as hooks:
            self._image_hw = size
            hooks.forward_hook(self.layer, self._route)
            return self.forward_func(*args)

    def _route(self, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        tokens = self.adapter.layer_tokens(output)
        B, T, D = tokens.shape
        P, (h, w) = self.adapter.tokens_layout(T, self._image_hw.image_hw, self.block_index)
        patches = self.grid(tokens[:, P:].transpose(1, 2).reshape(B, D, h, w))
        routed = torch.cat([tokens[:, :P], patches.flatten(2).transpose(1, 2)], dim=1)
        return self.adapter.layer_output(routed, output)


def vit_layer_gradcam(
    forward_func: Callable[..., Any], layer: Optional[nn.Module] = None, vit: Optional[nn.Module] = None
) -> LayerGradCam:
    """Captum ``LayerGradCam`` on a ViT layer's patch tokens as a feature map.

    Args:
        forward_func: the model or a module/callable around it.
        layer: a module inside the ViT whose output is ``(B, T, D)`` tokens
            (``(B, h, w, D)`` in a Swin block); default the last block's first
            norm (``blocks[-1].norm1`` in timm, as pytorch-grad-cam's ViT example).
        vit: the ViT, if ``forward_func`` is not a module that contains it.

    Returns:
        a ``LayerGradCam`` whose ``attribute(inputs, target)`` gives
        ``(B, 1, h, w)`` maps (``relu_attributions=True`` is the usual choice).
    """
    adapter = find_adapter(forward_func, None, vit)
    layer = adapter.block_view(adapter.blocks[-1]).norm1_module if layer is None else layer
    wrapped = TokenGridForward(eager_forward_func(forward_func), layer, adapter)
    return LayerGradCam(wrapped, wrapped.grid)


def integrated_gradients_map(
    ig: IntegratedGradients, inputs: Tensor, target: Any, n_steps: int = 50, internal_batch_size: Optional[int] = None
) -> Tensor:
    """Captum IG summed over channels, absolute: ``(B, 1, H, W)`` (docs/methods.md section 4)."""
    attributions = ig.attribute(inputs, target=target, n_steps=n_steps, internal_batch_size=internal_batch_size)
    return attributions.sum(dim=1, keepdim=True).abs()
