"""Attention-based baselines: Attention Rollout and gradient-weighted rollout."""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

import torch
from captum.attr import Attribution, GradientAttribution
from captum.log import log_usage
from torch import Tensor, nn

from ._attention import AttentionExplainer
from ._utils import TensorOrTuple

_ATTRIBUTE_DOC = r"""
        Args:
            inputs: ``(B, C, H, W)`` images, or a tuple whose first element
                is; the output is a tuple then too.
            target: ``None`` (predicted class), an ``int``, a list of ``B``
                ints, a ``(B,)`` or ``(B, k)`` tensor.{target_note}
            additional_forward_args: extra arguments for ``forward_func``.
            normalize: min-max scale each map to ``[0, 1]`` (default).
            batch_size: images per pass (memory bound); ``None``: all at once.

        Returns:
            ``(B, 1, h, w)`` float32 maps on the patch grid (``(B, k, h, w)``
            for a 2-D target).
"""


class AttentionRollout(AttentionExplainer, Attribution):
    r"""Attention Rollout (Abnar & Zuidema, "Quantifying Attention Flow in
    Transformers", ACL 2020).

    Per block, :math:`\bar A = \mathrm{rownorm}(\mathrm{mean}_h A + I)`;
    the rollout is :math:`\bar A_L \cdots \bar A_1` (multiplied from the
    first block), read at the class-token row and the patch columns.
    Class-agnostic: every target gets the same map.
    """

    def __init__(
        self, forward_func: Callable[..., Any], layers: Optional[Sequence[Any]] = None, vit: Optional[nn.Module] = None
    ) -> None:
        Attribution.__init__(self, forward_func)
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
        return self._attribute(inputs, target, additional_forward_args, normalize, batch_size)

    attribute.__doc__ = _ATTRIBUTE_DOC.format(target_note=" Only the output shape depends on it.")

    def combine(self, scores: List[Tensor], weights: List[Tensor], grads: Optional[List[Tensor]], P: int) -> Tensor:
        rollout = None
        for a in weights:
            eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
            a_bar = a.mean(dim=1) + eye
            a_bar = a_bar / a_bar.sum(dim=-1, keepdim=True)
            rollout = a_bar if rollout is None else a_bar @ rollout
        assert rollout is not None
        return rollout[:, 0, P:]


class GradientRollout(AttentionExplainer, GradientAttribution):
    r"""Gradient-weighted attention rollout (Chefer, Gur & Wolf, "Generic
    Attention-model Explainability for Interpreting Bi-Modal and
    Encoder-Decoder Transformers", ICCV 2021).

    Per block, :math:`\bar A = \mathrm{ReLU}(\mathrm{mean}_h(\nabla_A y_c \odot A))`
    with :math:`y_c` the target logit; accumulated as
    :math:`R \leftarrow R + \bar A R` from :math:`R = I` in block order, read
    at the class-token row and the patch columns.
    """

    uses_gradients = True

    def __init__(
        self, forward_func: Callable[..., Any], layers: Optional[Sequence[Any]] = None, vit: Optional[nn.Module] = None
    ) -> None:
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
        return self._attribute(inputs, target, additional_forward_args, normalize, batch_size)

    attribute.__doc__ = _ATTRIBUTE_DOC.format(target_note="")

    def combine(self, scores: List[Tensor], weights: List[Tensor], grads: Optional[List[Tensor]], P: int) -> Tensor:
        assert grads is not None
        T = weights[0].shape[-1]
        relevance = torch.eye(T, dtype=weights[0].dtype, device=weights[0].device).expand(weights[0].shape[0], T, T)
        for a, g in zip(weights, grads):
            a_bar = (g * a).mean(dim=1).relu()
            relevance = relevance + a_bar @ relevance
        return relevance[:, 0, P:]
