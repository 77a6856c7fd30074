"""What some families can do beyond the adapter seam: capability protocols a method checks for.

A method that needs more than `ViTAdapter` offers asks for a protocol here
(``isinstance(adapter, SupportsLRP)``), so a new method widens only the
families that support it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Protocol, Tuple, runtime_checkable

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
