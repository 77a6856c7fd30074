"""What some families can do beyond the adapter seam: capability protocols a method checks for.

A method that needs more than `ViTAdapter` offers asks for a protocol here
(``isinstance(adapter, SupportsLRP)``), so a new method widens only the
families that support it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Tuple, runtime_checkable

from torch import Tensor, nn

if TYPE_CHECKING:
    from ._block_view import BlockView


@dataclass
class LRPBlock:
    """The parts of one pre-norm block that Chefer et al.'s LRP rules act on.

    ``y = x' + fc2(act(fc1(norm2(x'))))`` with ``x' = x + proj(A v)``,
    ``q, k, v = qkv(norm1(x))`` split into ``num_heads`` heads (timm's fused
    ``(3, heads, head_dim)`` layout) and ``A = softmax(q k^T * scale)``. Only
    blocks with nothing else on these paths (no layer scale, q/k norm, gate or
    extra norm) have this form; norms and the activation pass relevance through.
    """

    norm1: Callable[[Tensor], Tensor]
    qkv: nn.Linear
    num_heads: int
    scale: float
    proj: nn.Linear
    norm2: Callable[[Tensor], Tensor]
    fc1: nn.Linear
    act: Callable[[Tensor], Tensor]
    fc2: nn.Linear


@dataclass
class LRPHead:
    """The classifier after the last block: ``head(norm(x)[:, token])``."""

    norm: Callable[[Tensor], Tensor]
    head: nn.Linear
    token: int = 0


@runtime_checkable
class SupportsLRP(Protocol):
    """An adapter whose head and blocks have LRP parts (`captum_vit.TransformerAttribution`)."""

    def lrp_head(self) -> Optional[LRPHead]:
        """The head as `LRPHead` (a linear layer on one token), or ``None`` if it has other parts."""

    def lrp_block(self, view: "BlockView") -> Optional[LRPBlock]:
        """One block as `LRPBlock`, or ``None`` if it has parts the rules do not cover."""


@runtime_checkable
class SupportsExport(Protocol):
    """An adapter that computes its model without hooks (`captum_vit.export.ExplainedViT`)."""

    def default_image_size(self) -> Optional[Tuple[int, int]]:
        """The ``(H, W)`` the model is built for, or ``None`` when it does not say."""

    def forward_to_block(self, images: Tensor, index: int) -> Tensor:
        """The ``(B, T, D)`` input of block ``index``, computed without hooks."""

    def forward_head_on_prefix(self, prefix: Tensor) -> Tensor:
        """Logits from the ``(N, P, D)`` prefix rows of the last block's output (a head reading prefix tokens)."""


@runtime_checkable
class EntersCopiesEarly(Protocol):
    """A family whose stage reads the batch size before its blocks and reshapes their output with it (PiT):
    it passes on no more rows than it received, so ViT-ReciproCAM's copies enter at a module before the
    explained block (its input repeated once per copy) and the explained block masks each repeat."""

    def copies_enter_at(self, index: int) -> Optional[nn.Module]:
        """The module whose input must already hold every copy when block ``index`` is explained, or ``None``."""

    def repeat_for_copies(self, args: Tuple[Any, ...], count: int) -> Tuple[Any, ...]:
        """The positional input of `copies_enter_at`'s module with every example repeated ``count`` times."""


@runtime_checkable
class RefusesAttentionMethods(Protocol):
    """A family that no method reading attention matrices applies to (windows, class attention, pooled
    grids, cross-covariance attention)."""

    def attention_refusal(self) -> str:
        """Why, with what to use instead."""
