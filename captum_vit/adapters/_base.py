"""The adapter seam: what every explainer may ask about a Vision Transformer.

An adapter is the only code that knows a model family's layout. It answers:

- the token layout for the input actually given: prefix tokens (class,
  distillation, register tokens) and the patch grid (``grid_for``; a
  hierarchical model such as Swin has one grid per stage, ``block_grid``),
  and how a layer's output inside the blocks reads as ``(B, T, D)`` tokens
  (``layer_tokens``; Swin's blocks act on ``(B, h, w, D)`` grids);
- the blocks, and for one block a `BlockView`: its first norm, its
  attention branch (called with the extra arguments of the real call, such as
  RoPE or a relative-position bias), its layer scales and MLP branch, so that
  ReciproCAM can re-run it on a masked input with the residual it asks for;
- the attention internals where known, as an `AttentionMath`: the
  per-token projections ``q, k, v`` and what follows ``A @ v``. The explicit
  attention (``S``, ``A``) used by AGCAM and the rollouts, and the exact
  prefix-row computation of the ReciproCAM fast path, are written once here
  on top of those two family-specific pieces;
- what the classifier head reads of the last block's output (prefix tokens
  only, the class token among others, or patch tokens only);
- the model's own switches that an explanation must turn off for its
  duration (gradient checkpointing), restored afterwards.

Everything here is read from explicit attributes of the family's classes,
never guessed from tensor shapes. The parts live beside this module:
`AttentionMath` in ``_attention_math``, `BlockView` in ``_block_view``, the
capability protocols that only some methods ask for (`SupportsLRP`,
`SupportsExport`) in ``_capabilities``, and what they all share in ``_errors``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Iterator, List, Optional, Sequence, Tuple

from torch import Tensor, nn

from .._scope import explanation, scoped
from ._block_view import BlockView
from ._errors import UnsupportedModelError

#: What the classifier head reads of the last block's output.
HEAD_PREFIX_ONLY = "prefix tokens only"
HEAD_CLASS_AND_PATCHES = "the class token and patch tokens"
HEAD_PATCHES_ONLY = "patch tokens only (average pooling)"
HEAD_UNKNOWN = "unknown (a head outside the model)"


class ViTAdapter:
    """The layout of one Vision Transformer family.

    Subclasses set ``family`` and implement `matches` and the abstract
    properties; see the module docstring for what each answers.
    """

    #: a short name, e.g. "timm VisionTransformer"
    family: ClassVar[str] = ""
    #: the library whose classes this adapter knows
    library: ClassVar[str] = ""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        raise NotImplementedError

    # -- layout --------------------------------------------------------------
    @property
    def blocks(self) -> List[nn.Module]:
        raise NotImplementedError

    @property
    def num_prefix_tokens(self) -> int:
        raise NotImplementedError

    @property
    def has_class_token(self) -> bool:
        return True

    @property
    def image_module(self) -> nn.Module:
        """The module that receives the image; its input size decides the grid."""
        raise NotImplementedError

    def grid_for(self, image_hw: Sequence[int]) -> Tuple[int, int]:
        """The ``(h, w)`` patch grid of an ``image_hw`` input (of the last block, where grids differ)."""
        raise NotImplementedError

    def block_grid(self, index: int, image_hw: Sequence[int]) -> Tuple[int, int]:
        """The ``(h, w)`` grid that block ``index`` acts on (one grid for every block unless hierarchical)."""
        return self.grid_for(image_hw)

    def layer_tokens(self, output: Tensor) -> Tensor:
        """A layer's output inside the blocks as ``(B, T, D)`` tokens (a view)."""
        return output

    def layer_output(self, tokens: Tensor, like: Tensor) -> Tensor:
        """``(B, T, D)`` tokens back in the layout of the layer output ``like`` (inverse of `layer_tokens`)."""
        return tokens

    @property
    def head_reads(self) -> str:
        """One of the ``HEAD_*`` constants of this module."""
        raise NotImplementedError

    def block_view(self, block: nn.Module) -> BlockView:
        raise NotImplementedError

    # -- switches an explanation turns off for its duration -----------------
    def checkpointing_flags(self) -> List[Tuple[Any, str]]:
        """``(object, attribute)`` pairs that switch gradient checkpointing on."""
        return []

    def unsupported_state(self) -> Optional[str]:
        """Why the model cannot be explained in its current state, or ``None``."""
        return None

    # -- shared helpers -----------------------------------------------------
    def block_index(self, layer: nn.Module) -> int:
        for i, b in enumerate(self.blocks):
            if b is layer:
                return i
        names = dict(self.model.named_modules())
        kind = type(self.blocks[0]).__name__
        if any(m is layer for m in names.values()):
            raise UnsupportedModelError(
                f"layer is a {type(layer).__name__} inside the model, not one of its {len(self.blocks)} "
                f"{kind} blocks; pass a block, e.g. the last: {self.blocks_expression()}[-1]."
            )
        raise UnsupportedModelError(
            f"layer ({type(layer).__name__}) is not part of this {type(self.model).__name__}; pass one of "
            f"its {kind} blocks, e.g. {self.blocks_expression()}[-1]."
        )

    def blocks_expression(self) -> str:
        """How a user reaches the blocks, for error messages (e.g. ``model.blocks``)."""
        blocks = self.blocks
        for name, module in self.model.named_modules():
            if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) == len(blocks) and module[0] is blocks[0]:
                return f"model.{name}"
        return "the model's blocks"

    def tokens_layout(
        self, num_tokens: int, image_hw: Sequence[int], block_index: Optional[int] = None
    ) -> Tuple[int, Tuple[int, int]]:
        """``(P, (h, w))`` for ``num_tokens`` tokens at block ``block_index`` (the last grid if ``None``); checked."""
        h, w = self.grid_for(image_hw) if block_index is None else self.block_grid(block_index, image_hw)
        P = self.num_prefix_tokens
        if P + h * w != num_tokens:
            raise RuntimeError(
                f"token layout mismatch: the block sees {num_tokens} tokens but the {self.family} declares "
                f"{P} prefix tokens and a {h}x{w} grid for a {tuple(image_hw)} image. Is forward_func "
                "running this model's blocks in the standard order, without token dropping?"
            )
        return P, (h, w)

    @contextlib.contextmanager
    def recording_image_size(self) -> Iterator["ImageSizeRecorder"]:
        """Record the spatial size of the image entering `image_module`.

        The explained inputs may be resized by ``forward_func`` (e.g. CIFAR
        32x32 images upsampled to 224x224), so the grid is taken from what the
        model actually receives.
        """
        recorder = ImageSizeRecorder()
        handle = self.image_module.register_forward_pre_hook(scoped(recorder), with_kwargs=True)
        try:
            yield recorder
        finally:
            handle.remove()

    @contextlib.contextmanager
    def explaining(self) -> Iterator[None]:
        """The scope of one explanation call (`captum_vit._scope.explanation`).

        Serialised with other explanations of this model (they share its hook
        lists and flags); hooks registered inside act only on this call's
        forward passes. Gradient checkpointing is off meanwhile and restored
        afterwards (it changes no forward value, so other threads' forwards
        are unaffected).
        """
        with explanation(self.model):
            flags = [(obj, name, getattr(obj, name)) for obj, name in self.checkpointing_flags()]
            try:
                for obj, name, _ in flags:
                    setattr(obj, name, False)
                yield
            finally:
                for obj, name, value in flags:
                    setattr(obj, name, value)


@dataclass
class ImageSizeRecorder:
    """Forward pre-hook that stores the ``(H, W)`` of the last image input."""

    image_hw: Optional[Tuple[int, int]] = None

    def __call__(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        image = args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor))
        self.image_hw = (int(image.shape[-2]), int(image.shape[-1]))


