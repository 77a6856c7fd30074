"""`BlockView`: one pre-norm block of a family, by its parts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from torch import Tensor, nn

from ._attention_math import AttentionMath, Call, split_call


@dataclass(frozen=True)
class PreNormParts:
    """A pre-norm block by the names of its sub-modules:
    ``y = x + drop1(scale1(attention(norm1(x))))``, then ``y + drop2(scale2(mlp(norm2(y))))``.

    A layer scale names a module (timm's ``ls1``) or a tensor that multiplies
    (BEiT's ``gamma_1``, ``None`` on a block built without); a part the
    block does not have is ``None``.
    """

    norm1: str = "norm1"
    attention: str = "attn"
    norm2: str = "norm2"
    mlp: str = "mlp"
    scale1: Optional[str] = None
    scale2: Optional[str] = None
    drop1: Optional[str] = None
    drop2: Optional[str] = None


@dataclass(frozen=True)
class MlpEntry:
    """``mlp_branch(y) = rest(linear(norm(y)))`` where ``norm`` is a layer norm over the last dimension and
    ``linear`` an ``nn.Linear``: the part of the branch ViT-ReciproCAM's fast path folds (docs/methods.md 1.4)."""

    norm: nn.LayerNorm
    linear: nn.Linear
    rest: Callable[[Tensor], Tensor]


class BlockView:
    """One pre-norm block: ``y = r + ls1(attn(norm1(x))); y + ls2(mlp(norm2(y)))``.

    A family's view names the block's parts (`PreNormParts`: the class's
    ``parts``, or ``parts=`` for one block) and says how its attention is
    called; `layer_scale1` and `mlp_branch` read the parts, and `finish`
    is their fixed composition, which ReciproCAM's fast path also applies row
    by row. The standard call uses ``r = x``; ReciproCAM re-runs the block on a
    masked normalised input with the residual it chooses (`forward`).
    """

    #: the block's parts by name
    parts: PreNormParts = PreNormParts()

    def __init__(
        self, block: nn.Module, math: Optional[AttentionMath] = None, parts: Optional[PreNormParts] = None
    ) -> None:
        self.block = block
        self.math = math
        if parts is not None:
            self.parts = parts
        #: sub-module whose output is the normalised block input (Captum LayerGradCam reads it)
        self.norm1_module: nn.Module = getattr(block, self.parts.norm1)
        #: the attention module, hooked by the attention capture
        self.attention_module: nn.Module = getattr(block, self.parts.attention)

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
        """The module's own attention forward (hooks and patches included), with `attention_call`'s arguments."""
        return self.attention_module(z, *call.args, **call.kwargs)

    def layer_scale1(self, a: Tensor) -> Tensor:
        return self._branch(a, self.parts.scale1, self.parts.drop1)

    def mlp_branch(self, y: Tensor) -> Tensor:
        """``drop2(scale2(mlp(norm2(y))))``."""
        b, parts = self.block, self.parts
        return self._branch(getattr(b, parts.mlp)(getattr(b, parts.norm2)(y)), parts.scale2, parts.drop2)

    def mlp_entry(self) -> Optional[MlpEntry]:
        """The MLP branch as a layer norm, a linear layer and the rest, where it is exactly that; ``None``
        (the default) otherwise."""
        return None

    def _branch(self, a: Tensor, scale: Optional[str], drop: Optional[str]) -> Tensor:
        factor = None if scale is None else getattr(self.block, scale)
        if isinstance(factor, nn.Module):
            a = factor(a)
        elif factor is not None:
            a = factor * a
        return a if drop is None else getattr(self.block, drop)(a)

    def finish(self, residual: Tensor, attention_out: Tensor) -> Tensor:
        y = residual + self.layer_scale1(attention_out)
        return y + self.mlp_branch(y)

    def forward(self, z: Tensor, residual: Tensor, call: Call) -> Tensor:
        """The block on attention input ``z`` with ``residual`` (``r = x`` normally)."""
        return self.finish(residual, self.attention(z, self.attention_call(call)))
