"""Attention-Guided Grad-CAM (AGCAM) as a Captum gradient attribution."""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

import torch
from captum.attr import GradientAttribution
from captum.log import log_usage
from torch import Tensor, nn

from ._attention import AttentionExplainer
from ._utils import TensorOrTuple


class AttentionGuidedGradCAM(AttentionExplainer, GradientAttribution):
    r"""AGCAM: self-attention scores guiding attention gradients.

    Leem & Seo, "Attention Guided CAM: Visual Explanations of Vision
    Transformer Guided by Self-Attention", AAAI 2024 (arXiv 2402.04563).

    For every explained block :math:`k` and head :math:`h`, with
    :math:`S = (q \cdot \text{scale})\,k^\top` the pre-softmax scores and
    :math:`A = \mathrm{softmax}(S)`:

    .. math::
        \mathrm{cam} = \sum_k \sum_h \sigma(S_{k,h})_{0,P:}\;
        \mathrm{ReLU}\!\left(\frac{\partial y_c}{\partial A_{k,h}}\right)_{0,P:}

    where :math:`y_c` is the raw logit of the target class, row 0 is the class
    token's query, the first :math:`P` (prefix-token) columns are dropped, and
    the input of every attention module is detached, so the gradient reaches
    :math:`A` only through skip connections and MLPs (as the reference code).
    The ``h*w`` result is reshaped to the patch grid and min-max scaled.

    Unlike the reference code (batch size 1), any batch works, with a target
    per example, and several targets per example cost one forward pass and
    one backward pass each.
    """

    detach_attention_input = True
    uses_gradients = True
    score_rows = 1

    def __init__(
        self,
        forward_func: Callable[..., Any],
        layers: Optional[Sequence[Any]] = None,
        vit: Optional[nn.Module] = None,
    ) -> None:
        r"""
        Args:
            forward_func: the model, or a module/callable around it, mapping
                ``(B, C, H, W)`` inputs to ``(B, num_classes)`` logits.
            layers: blocks to sum over, as indices or modules of
                ``model.blocks``; ``None`` (default) uses every block.
            vit: the timm ``VisionTransformer``; needed only when
                ``forward_func`` is not a module containing it.
        """
        GradientAttribution.__init__(self, forward_func)
        self._setup(forward_func, layers, vit)

    @property
    def multiplies_by_inputs(self) -> bool:
        return False

    @log_usage(part_of_slo=True)
    def attribute(
        self,
        inputs: TensorOrTuple,
        target: Any = None,
        additional_forward_args: Any = None,
        normalize: bool = True,
        batch_size: Optional[int] = None,
    ) -> TensorOrTuple:
        r"""
        Args:
            inputs: ``(B, C, H, W)`` images, or a tuple whose first element
                is; the output is a tuple then too.
            target: ``None`` (predicted class), an ``int``, a list of ``B``
                ints or a ``(B,)`` tensor, or a ``(B, k)`` tensor for ``k``
                maps per example.
            additional_forward_args: extra arguments for ``forward_func``.
            normalize: min-max scale each map to ``[0, 1]`` (default);
                ``False`` returns the raw sums.
            batch_size: images per forward/backward pass (memory bound);
                ``None`` takes the whole batch at once.

        Returns:
            ``(B, 1, h, w)`` float32 maps on the patch grid (``(B, k, h, w)``
            for a 2-D target).
        """
        return self._attribute(inputs, target, additional_forward_args, normalize, batch_size)

    def combine(self, scores: List[Tensor], weights: List[Tensor], grads: Optional[List[Tensor]], P: int) -> Tensor:
        assert grads is not None
        cam = 0
        for s, g in zip(scores, grads):
            cam = cam + (s[:, :, 0, P:].sigmoid() * g[:, :, 0, P:].relu()).sum(dim=1)
        return torch.as_tensor(cam)
