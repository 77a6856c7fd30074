"""Attention-based baselines: Attention Rollout and gradient-weighted rollout."""

from __future__ import annotations

from typing import List, Optional

import torch
from captum.attr import Attribution, GradientAttribution
from torch import Tensor

from ._attention import AttentionExplainer, ReducedGradients


class AttentionRollout(AttentionExplainer, Attribution):
    r"""Attention Rollout (Abnar & Zuidema, "Quantifying Attention Flow in
    Transformers", ACL 2020).

    Per block, \(\bar A = \mathrm{rownorm}(\mathrm{mean}_h A + I)\);
    the rollout is \(\bar A_L \cdots \bar A_1\) (multiplied from the
    first block), read at the class-token row and the patch columns.
    Class-agnostic: every target gets the same map.
    """

    def keep_weights(self, weights: Tensor) -> Tensor:
        return weights.mean(dim=1)  # (n, T, T): the heads' mean is all the rollout reads

    def combine(
        self, scores: List[Optional[Tensor]], weights: List[Tensor], grads: Optional[List[Tensor]], P: int
    ) -> Tensor:
        eye = torch.eye(weights[0].shape[-1], dtype=weights[0].dtype, device=weights[0].device)
        rollout = eye
        for a in weights:
            a_bar = a + eye
            rollout = (a_bar / a_bar.sum(dim=-1, keepdim=True)) @ rollout
        return rollout[:, 0, P:]


class GradientRollout(AttentionExplainer, GradientAttribution):
    r"""Gradient-weighted attention rollout (Chefer, Gur & Wolf, "Generic
    Attention-model Explainability for Interpreting Bi-Modal and
    Encoder-Decoder Transformers", ICCV 2021).

    Per block, \(\bar A = \mathrm{mean}_h(\mathrm{ReLU}(\nabla_A y_c \odot A))\)
    (the paper's Eq. 5 and the authors' ``avg_heads``: the ReLU comes before
    the head mean; captum_vit 0.1 took it after, which gave different maps)
    with \(y_c\) the target logit; accumulated as
    \(R \leftarrow R + \bar A R\) from \(R = I\) in block order, read
    at the class-token row and the patch columns.
    """

    gradients = ReducedGradients()  # one (n, T, T) per block instead of a (n, H, T, T) gradient

    def reduce_gradient(self, slot: int, weights: Tensor, grad: Tensor) -> Tensor:
        return (grad * weights).relu().mean(dim=1)

    def combine(
        self, scores: List[Optional[Tensor]], weights: List[Tensor], grads: Optional[List[Tensor]], P: int
    ) -> Tensor:
        assert grads is not None  # the reduced mean_h(relu(dy/dA * A)) of each block
        eye = torch.eye(weights[0].shape[-1], dtype=weights[0].dtype, device=weights[0].device)
        relevance = eye.expand_as(grads[0])
        for a_bar in grads:
            relevance = relevance + a_bar @ relevance
        return relevance[:, 0, P:]
