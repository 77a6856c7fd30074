"""`BlockView`: one pre-norm block of a family, by its parts."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from torch import Tensor, nn

from ._attention_math import AttentionMath, Call, split_call


class BlockView:
    """One pre-norm block: ``y = r + ls1(attn(norm1(x))); y + ls2(mlp(norm2(y)))``.

    A family subclass maps these parts to the block's own sub-modules
    (`layer_scale1`, `mlp_branch`; `finish` is their fixed
    composition, which ReciproCAM's fast path also applies row by row). The
    standard call uses ``r = x``; ReciproCAM re-runs the block on a masked
    normalised input with the residual it chooses (`forward`).
    """

    def __init__(self, block: nn.Module, math: Optional[AttentionMath]) -> None:
        self.block = block
        self.math = math

    #: sub-module whose output is the normalised block input (Captum LayerGradCam reads it)
    norm1_module: nn.Module
    #: the attention module, hooked by the attention capture
    attention_module: nn.Module

    def read_call(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[Tensor, Call]:
        """Split the block's call into its ``(B, T, D)`` input and the rest."""
        return split_call(args, kwargs)

    def attention_call(self, call: Call) -> Call:
        """The attention module's extra arguments, given the block's."""
        return Call()

    def wrap_output(self, original: Any, y: Tensor) -> Any:
        return y

    def unwrap_output(self, output: Any) -> Tensor:
        return output

    def norm1(self, x: Tensor) -> Tensor:
        return self.norm1_module(x)

    def attention(self, z: Tensor, call: Call) -> Tensor:
        """The module's own attention forward (hooks and patches included)."""
        raise NotImplementedError

    def layer_scale1(self, a: Tensor) -> Tensor:
        return a

    def mlp_branch(self, y: Tensor) -> Tensor:
        """``ls2(mlp(norm2(y)))``."""
        raise NotImplementedError

    def finish(self, residual: Tensor, attention_out: Tensor) -> Tensor:
        y = residual + self.layer_scale1(attention_out)
        return y + self.mlp_branch(y)

    def forward(self, z: Tensor, residual: Tensor, call: Call) -> Tensor:
        """The block on attention input ``z`` with ``residual`` (``r = x`` normally)."""
        return self.finish(residual, self.attention(z, self.attention_call(call)))
