"""ViT-ReciproCAM's options, checked together, and how a masked copy's logits become its map value."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Tuple

from torch import Tensor

from .._utils import check_batch_size, check_choice
from ._copies import RESIDUALS
from ._masks import KERNELS, reciprocal_masks

SCORES = ("softmax", "logits")
PATHS = ("auto", "fast", "general")


@dataclass(frozen=True)
class ReciproCAMOptions:
    """The options of one explanation, checked together (see `LayerReciproCAM.attribute`)."""

    kernel: str = "gaussian"
    keep_prefix_tokens: bool = True
    scores: str = "softmax"
    residual: str = "unmasked"
    batch_size: Optional[int] = None
    path: str = "auto"

    @classmethod
    def names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def check(self) -> None:
        check_choice(self.kernel, "kernel", KERNELS)
        check_choice(self.scores, "scores", SCORES)
        check_choice(self.path, "path", PATHS)
        check_choice(self.residual, "residual", RESIDUALS)
        check_batch_size(self.batch_size)
        if not isinstance(self.keep_prefix_tokens, bool):
            raise TypeError(f"keep_prefix_tokens must be True or False; got {self.keep_prefix_tokens!r}.")

    def masks(self, grid: Tuple[int, int], num_prefix: int, like: Tensor) -> Tensor:
        return reciprocal_masks(grid, num_prefix, self.kernel, self.keep_prefix_tokens, like.device, like.dtype)

    @property
    def proof_key(self) -> Tuple[str, bool, str]:
        """What a strategy's proof depends on besides the modules: the masks and the residual."""
        return self.kernel, self.keep_prefix_tokens, self.residual


def score_copies(logits: Tensor, scores: str) -> Tensor:
    """The map values of copies' logits: class probabilities (``"softmax"``) or the logits themselves."""
    return logits.softmax(-1) if scores == "softmax" else logits
