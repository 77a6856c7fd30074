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
never guessed from tensor shapes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch
from torch import Tensor, nn

from .._scope import explanation, scoped

#: What the classifier head reads of the last block's output.
HEAD_PREFIX_ONLY = "prefix tokens only"
HEAD_CLASS_AND_PATCHES = "the class token and patch tokens"
HEAD_PATCHES_ONLY = "patch tokens only (average pooling)"
HEAD_UNKNOWN = "unknown (a head outside the model)"


@dataclass
class Call:
    """Extra arguments of a real module call, passed on when it is re-run."""

    args: Tuple[Any, ...] = ()
    kwargs: Dict[str, Any] = field(default_factory=dict)


def split_call(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[Tensor, Call]:
    """A module call as its first argument (the ``(B, T, D)`` tokens) and the rest."""
    if args:
        return args[0], Call(args[1:], dict(kwargs))
    kwargs = dict(kwargs)
    return kwargs.pop(next(iter(kwargs))), Call((), kwargs)


class UnsupportedModelError(TypeError, ValueError):
    """A model, block or attention module that captum_vit cannot explain exactly.

    A ``TypeError``; also a ``ValueError``, which captum_vit 0.1 raised for
    some of these refusals (e.g. a model without a class token).
    """


def split_heads(u: Tensor, num_heads: int) -> Tensor:
    """``(B, T, H*d)`` -> ``(B, H, T, d)``."""
    B, T, width = u.shape
    return u.view(B, T, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(o: Tensor) -> Tensor:
    """``(B, H, T, d)`` -> ``(B, T, H*d)``."""
    B, H, T, d = o.shape
    return o.transpose(1, 2).reshape(B, T, H * d)


class AttentionMath:
    r"""Explicit self-attention of one module, from the family's own parts.

    A family supplies `project` (the per-token ``q, k, v`` after any
    per-token transform: biases, q/k norms, rotary embeddings) and
    `finish` (everything after ``A @ v``: output norm, gate, output
    projection); `score_bias` adds a relative-position bias where the
    family has one. Everything else is written once here:

    \[
        S = (q \cdot \text{scale})\,k^\top + \text{bias},\quad A = \mathrm{softmax}(S),\quad
        \text{out} = \mathrm{finish}(A v).
    \]

    ``project`` and ``finish`` must act on each token on its own (no mixing
    across tokens): the ReciproCAM fast paths rely on that and their
    behavioural check verifies it.
    """

    #: `finish` reads the module input ``x`` (a gate does); ``False`` lets callers pass ``None``
    finish_reads_input: bool = True

    def __init__(self, module: nn.Module, num_heads: int, head_dim: int, scale: float) -> None:
        self.module = module
        self.num_heads = int(num_heads)
        self.head_dim = int(head_dim)
        self.scale = float(scale)

    # -- the family's parts -----------------------------------------------
    def read_call(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[Tensor, Call]:
        """Split the module's call into its ``(B, T, D)`` input and the rest."""
        return split_call(args, kwargs)

    def check_call(self, call: Call) -> None:
        """Refuse calls the explicit form does not reproduce (attention masks)."""
        for name in ("attn_mask", "attention_mask", "key_padding_mask"):
            if call.kwargs.get(name) is not None:
                raise UnsupportedModelError(
                    f"{type(self.module).__name__} was called with {name}; captum_vit explains unmasked "
                    "self-attention only. Explain images without padding or masks."
                )
        if call.kwargs.get("is_causal"):
            raise UnsupportedModelError("causal attention is not a ViT's self-attention; it is not supported.")

    def project(self, x: Tensor, call: Call) -> Tuple[Tensor, Tensor, Tensor]:
        """``(B, T, D)`` -> query, key, value, each ``(B, H, T, d)``."""
        raise NotImplementedError

    def project_rows(self, x: Tensor, call: Call, rows: int) -> Tuple[Tensor, Tensor, Tensor]:
        """The queries of the first ``rows`` tokens, ``(B, H, rows, d)``, and every key and value.

        The default projects every token and keeps the wanted queries; a
        family whose projections can be cut (e.g. a fused ``qkv``) saves the rest.
        """
        q, k, v = self.project(x, call)
        return q[:, :, :rows], k, v

    def score_bias(self, call: Call) -> Optional[Tensor]:
        """An additive ``(..., H, T, T)`` bias of the scores, or ``None``."""
        return None

    def finish(self, merged: Tensor, x: Optional[Tensor]) -> Tensor:
        """``(B, T, H*d)`` head outputs (and the module input ``x``, ``None`` unless `finish_reads_input`)
        -> module output."""
        raise NotImplementedError

    def attention_dropout(self, weights: Tensor) -> Tensor:
        return weights

    def wrap_output(self, original: Any, out: Tensor) -> Any:
        """The module's output structure with ``out`` in place of its tensor."""
        return out

    def unwrap_output(self, output: Any) -> Tensor:
        return output

    # -- written once -------------------------------------------------------
    def split_heads(self, u: Tensor) -> Tensor:
        """``(B, T, H*d)`` -> ``(B, H, T, d)``."""
        return split_heads(u, self.num_heads)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        """``softmax(q k^T * scale + bias) v``: ``(B, H, R, d)`` from ``R`` queries and ``T`` keys.

        In eval mode PyTorch's fused ``scaled_dot_product_attention`` computes
        it without materialising the ``(B, H, R, T)`` weights; in training mode
        the weights are explicit so the module's attention dropout applies.
        """
        if not self.module.training:
            mask = None if bias is None else bias.to(q.dtype)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        scores = (q * self.scale) @ k.transpose(-2, -1)
        if bias is not None:
            scores = scores + bias
        return self.attention_dropout(scores.softmax(dim=-1)) @ v

    def explicit(
        self, x: Tensor, call: Call, leaf_rows: Optional[int] = None, rule: Optional["GradientRule"] = None
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Attention with explicit matrices.

        Args:
            x: ``(B, T, D)`` input of the attention module.
            call: the rest of the module's call (e.g. rotary embeddings).
            leaf_rows: if given, ``A`` is cut from the graph and its first
                ``leaf_rows`` query rows become a leaf that requires grad,
                so that ``d y / d A`` of those rows exists even when nothing
                upstream requires grad, and only they are kept for it (AGCAM
                reads the class-token row alone: ``T`` times less memory
                than a gradient of the whole ``A``).
            rule: how the backward pass goes through the attention (LRP
                rules in the gradient x input form): applied to ``v``, to
                ``S`` before the softmax and to ``A`` before ``A v``; the
                values are unchanged.

        Returns:
            ``(out, S, A)``: the module output ``(B, T, D)``, the pre-softmax
            scores ``(B, H, T, T)`` and the attention weights ``(B, H, T, T)``,
            or with ``leaf_rows`` their leaf rows ``(B, H, leaf_rows, T)``.
        """
        # with leaf_rows nothing before A is differentiated: no graph (the projections' parameters
        # would otherwise keep S and A of every block alive for a gradient nobody asks for)
        with torch.no_grad() if leaf_rows is not None else contextlib.nullcontext():
            q, k, v = self.project(x, call)
            scores = (q * self.scale) @ k.transpose(-2, -1)
            bias = self.score_bias(call)
            if bias is not None:
                scores = scores + bias
            if rule is not None:
                v, scores = rule.values(v), rule.scores(scores)
            weights = scores.softmax(dim=-1)
            if rule is not None:
                weights = rule.weights(weights)
        if leaf_rows is None:
            out = self.attention_dropout(weights) @ v
            return self.finish(merge_heads(out), x), scores, weights
        # the leaf rows' product separately: d out / d leaf then costs (B, H, leaf_rows, T), not a
        # full (B, H, T, T) gradient of which the leaf's would be a view
        leaf = weights[:, :, :leaf_rows].detach().clone().requires_grad_(True)  # a copy: a view would keep all of A
        with torch.no_grad():
            rest = self.attention_dropout(weights[:, :, leaf_rows:]) @ v
        out = torch.cat([self.attention_dropout(leaf) @ v, rest], dim=2)
        return self.finish(merge_heads(out), x), scores, leaf


class GradientRule(Protocol):
    """What the backward pass sees of an attention's ``v``, ``S`` and ``A`` (their values pass unchanged)."""

    def values(self, v: Tensor) -> Tensor: ...

    def scores(self, scores: Tensor) -> Tensor: ...

    def weights(self, weights: Tensor) -> Tensor: ...


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

    def copies_enter_at(self, index: int) -> Optional[nn.Module]:
        """The module whose input must already hold every masked copy when block ``index`` is explained, or ``None``.

        A stage that reads the batch size before its blocks and reshapes their
        output with it (PiT) passes on no more rows than it received; ViT-ReciproCAM
        then repeats that module's input once per copy (`repeat_for_copies`)
        and the explained block masks each repeat.
        """
        return None

    def repeat_for_copies(self, args: Tuple[Any, ...], count: int) -> Tuple[Any, ...]:
        """The positional input of `copies_enter_at`'s module with every example repeated ``count`` times."""
        raise NotImplementedError

    def attention_refusal(self) -> Optional[str]:
        """Why no method reading attention matrices applies to this family, with what to use instead, or ``None``."""
        return None

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


def lazy_isinstance(module: Any, import_path: str, names: Sequence[str]) -> bool:
    """``isinstance(module, path.name)`` for any of ``names``, without importing an absent library."""
    import importlib
    import sys

    top = import_path.split(".")[0]
    if top not in sys.modules:  # a model of that library exists only if it was imported
        return False
    try:
        lib = importlib.import_module(import_path)
    except Exception:  # noqa: BLE001 - a broken optional library is simply not a match
        return False
    classes = tuple(c for c in (getattr(lib, n, None) for n in names) if isinstance(c, type))
    return bool(classes) and isinstance(module, classes)

