"""Attention-Guided Grad-CAM (AGCAM) as a Captum gradient attribution."""

from __future__ import annotations

from typing import List, Optional

import torch
from captum.attr import GradientAttribution
from torch import Tensor

from ._attention import AttentionExplainer, AttentionGradients, Reading


class AttentionGuidedGradCAM(AttentionExplainer, GradientAttribution):
    r"""AGCAM: self-attention scores guiding attention gradients.

    Leem & Seo, "Attention Guided CAM: Visual Explanations of Vision
    Transformer Guided by Self-Attention", AAAI 2024 (arXiv 2402.04563).

    For every explained block \(k\) and head \(h\), with
    \(S = (q \cdot \text{scale})\,k^\top\) the pre-softmax scores and
    \(A = \mathrm{softmax}(S)\):

    \[
        \mathrm{cam} = \sum_k \sum_h \sigma(S_{k,h})_{0,P:}\;
        \mathrm{ReLU}\!\left(\frac{\partial y_c}{\partial A_{k,h}}\right)_{0,P:}
    \]

    where \(y_c\) is the raw logit of the target class, row 0 is the class
    token's query, the first \(P\) (prefix-token) columns are dropped, and
    the input of every attention module is detached, so the gradient reaches
    \(A\) only through skip connections and MLPs (as the reference code).
    The ``h*w`` result is reshaped to the patch grid and min-max scaled.

    Unlike the reference code (batch size 1), any batch works, with a target
    per example, and ``k`` targets per example cost one forward pass and
    ``k`` backward passes.

    ``AttentionGuidedGradCAM(forward_func, layers=None, vit=None)``: see
    `captum_vit._attention.AttentionExplainer`; ``layers`` selects the
    blocks summed over (all by default).
    """

    # sigma(S) and dy/dA of the class-token row only: (n, H, 1, T) per block, not (n, H, T, T)
    reading = Reading(detach_input=True, score_rows=1, gradient_rows=1)
    gradients = AttentionGradients()

    def combine(
        self, scores: List[Optional[Tensor]], weights: List[Tensor], grads: Optional[List[Tensor]], P: int
    ) -> Tensor:
        assert grads is not None
        cam = torch.zeros_like(grads[0][:, 0, 0, P:])
        for s, g in zip(scores, grads):
            assert s is not None
            cam = cam + (s[:, :, 0, P:].sigmoid() * g[:, :, 0, P:].relu()).sum(dim=1)
        return cam
