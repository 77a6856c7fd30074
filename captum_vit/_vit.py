"""What a timm Vision Transformer looks like.

This is the one module of ``captum_vit`` that knows the layout of a ViT: its
prefix tokens (class, distillation, register tokens), its patch grid for the
input actually given, its blocks and the internals of their attention. Every
explainer asks this module; none of them guesses (in particular nobody derives
the grid from ``sqrt(T - 1)``, which breaks distilled DeiT, register tokens
and non-square inputs).

Only explicit timm attributes are read: ``num_prefix_tokens``,
``patch_embed.dynamic_feat_size`` / ``patch_embed.grid_size``, ``blocks``,
``global_pool``, ``attn_pool``, and the sub-modules of ``Block`` and
``Attention``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Sub-modules of a timm pre-norm ``Block`` (``x + ls1(attn(norm1(x)))``,
#: then ``x + ls2(mlp(norm2(x)))``) that ReciproCAM re-runs on masked copies.
BLOCK_PARTS = ("norm1", "attn", "ls1", "norm2", "mlp", "ls2")

#: Attributes that identify a timm ``VisionTransformer`` (or a subclass such as
#: ``VisionTransformerDistilled``).
VIT_PARTS = ("patch_embed", "blocks", "num_prefix_tokens")


def _timm_attention_types() -> Tuple[type, ...]:
    from timm.layers import Attention

    return (Attention,)


def is_vit(module: Any) -> bool:
    """Whether ``module`` exposes the token layout of a timm ViT."""
    return isinstance(module, nn.Module) and all(hasattr(module, a) for a in VIT_PARTS)


def is_vit_block(module: Any) -> bool:
    """Whether ``module`` is a timm-style pre-norm ViT block."""
    return isinstance(module, nn.Module) and all(hasattr(module, a) for a in BLOCK_PARTS)


def check_vit_block(layer: Any) -> None:
    """Raise a ``TypeError`` naming the problem if ``layer`` is no ViT block."""
    if not is_vit_block(layer):
        missing = [a for a in BLOCK_PARTS if not hasattr(layer, a)]
        raise TypeError(
            f"layer must be a timm ViT block with sub-modules {', '.join(BLOCK_PARTS)}; "
            f"got {type(layer).__name__} (missing: {', '.join(missing)}). "
            "Pass one of model.blocks, e.g. model.blocks[-1]."
        )


class AttentionView:
    """The internals of one timm ``Attention`` module, read without changing it.

    timm's ``Attention.forward`` computes, per head,
    ``S = (q * scale) @ k^T``, ``A = softmax(S)``, ``o = A @ v`` and returns
    ``proj(norm(o) * gate)``; with ``fused_attn`` (the default) ``S`` and ``A``
    never exist. This view re-computes those steps explicitly from the same
    parameters, so explainers can read or differentiate ``S`` and ``A``
    without editing timm or flipping the module's ``fused_attn`` flag.
    """

    def __init__(self, module: nn.Module) -> None:
        attention_types = _timm_attention_types()
        if not isinstance(module, attention_types) or type(module).forward is not attention_types[0].forward:
            raise TypeError(
                f"{type(module).__name__} is not timm's standard Attention module "
                "(timm.layers.Attention); attention-based explainers and the ReciproCAM fast path "
                "need it to read the attention matrix. Use a model built from timm "
                "VisionTransformer blocks, or LayerReciproCAM with path='general'."
            )
        self.module = module
        self.num_heads: int = module.num_heads
        self.head_dim: int = module.head_dim
        self.attn_dim: int = module.attn_dim
        self.scale: float = module.scale

    def qkv_without_bias(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """``x @ W_qkv^T`` split into ``(B, H, T, d)`` query, key and value parts."""
        u = F.linear(x, self.module.qkv.weight)
        return self.split_heads(u)

    def qkv_bias(self, like: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """The ``qkv`` bias as three ``(H, 1, d)`` tensors (zeros if there is none)."""
        bias = self.module.qkv.bias
        if bias is None:
            bias = like.new_zeros(3 * self.attn_dim)
        b = bias.view(3, self.num_heads, 1, self.head_dim)
        return b[0], b[1], b[2]

    def split_heads(self, qkv: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """``(B, T, 3*H*d)`` -> three ``(B, H, T, d)`` tensors."""
        B, T, _ = qkv.shape
        q, k, v = qkv.reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def merge_heads(self, o: Tensor) -> Tensor:
        """``(B, H, T, d)`` -> ``(B, T, H*d)``."""
        B, H, T, d = o.shape
        return o.transpose(1, 2).reshape(B, T, H * d)

    def output(self, merged: Tensor, gate_input: Tensor) -> Tensor:
        """timm's steps after ``A @ v``: ``proj(norm(o) * sigmoid(gate(x)))``."""
        m = self.module
        out = m.norm(merged)
        if m.gate is not None:
            out = out * m.gate(gate_input).sigmoid()
        return m.proj_drop(m.proj(out))

    def explicit(
        self, x: Tensor, detach_weights: bool = False
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Attention with explicit matrices.

        Args:
            x: ``(B, T, D)`` input of the attention module.
            detach_weights: make ``A`` a leaf that requires grad, so that
                ``d y / d A`` can be taken even when nothing upstream requires
                grad (used when the input is detached anyway).

        Returns:
            ``(out, S, A)``: the module output ``(B, T, D)``, the pre-softmax
            scores and the attention weights, both ``(B, H, T, T)``.
        """
        m = self.module
        q, k, v = self.split_heads(m.qkv(x))
        q, k = m.q_norm(q), m.k_norm(k)
        scores = (q * self.scale) @ k.transpose(-2, -1)
        weights = scores.softmax(dim=-1)
        if detach_weights:
            weights = weights.detach().requires_grad_(True)
        out = m.attn_drop(weights) @ v
        return self.output(self.merge_heads(out), x), scores, weights


class ViTStructure:
    """Token layout and parts of a timm ``VisionTransformer``.

    Args:
        model: a timm ``VisionTransformer`` (or subclass, e.g.
            ``VisionTransformerDistilled``), or any module exposing
            ``patch_embed``, ``blocks`` and ``num_prefix_tokens``.
    """

    def __init__(self, model: nn.Module) -> None:
        if not is_vit(model):
            raise TypeError(
                f"{type(model).__name__} is not a timm Vision Transformer: it needs "
                f"{', '.join(VIT_PARTS)}. captum_vit supports timm VisionTransformer models "
                "(ViT, DeiT, distilled DeiT, register tokens)."
            )
        self.model = model
        self.blocks: List[nn.Module] = list(model.blocks)
        if not self.blocks or not all(is_vit_block(b) for b in self.blocks):
            raise TypeError(
                f"{type(model).__name__}.blocks must hold timm pre-norm ViT blocks "
                f"({', '.join(BLOCK_PARTS)})."
            )

    # -- discovery --------------------------------------------------------
    @classmethod
    def find(
        cls,
        forward_func: Callable[..., Any],
        layer: Optional[nn.Module] = None,
        vit: Optional[nn.Module] = None,
    ) -> "ViTStructure":
        """Find the ViT behind ``forward_func`` (and holding ``layer``).

        ``forward_func`` may be the model, a module that contains it (e.g. a
        wrapper that normalises or resizes), or a bound method of either. For
        any other callable pass the model as ``vit``.
        """
        if vit is not None:
            structure = cls(vit)
        else:
            owner = forward_func
            if not isinstance(owner, nn.Module):
                owner = getattr(forward_func, "__self__", None)
            if not isinstance(owner, nn.Module):
                raise TypeError(
                    "forward_func is not a torch module, so the Vision Transformer inside it cannot "
                    "be found; pass the model explicitly, e.g. LayerReciproCAM(fn, layer, vit=model)."
                )
            candidates = [m for m in owner.modules() if is_vit(m)]
            if layer is not None:
                candidates = [m for m in candidates if any(b is layer for b in m.blocks)]
            if not candidates:
                what = "holding the given layer " if layer is not None else ""
                raise TypeError(
                    f"no timm Vision Transformer {what}was found in {type(owner).__name__}: "
                    f"captum_vit needs a module with {', '.join(VIT_PARTS)} (timm VisionTransformer, "
                    "DeiT, distilled DeiT). Pass vit=model if it is hidden from module traversal."
                )
            structure = cls(candidates[0])
        if layer is not None:
            structure.block_index(layer)
        return structure

    # -- layout -----------------------------------------------------------
    @property
    def num_prefix_tokens(self) -> int:
        return int(self.model.num_prefix_tokens)

    @property
    def has_class_token(self) -> bool:
        return getattr(self.model, "cls_token", None) is not None

    @property
    def static_grid(self) -> Tuple[int, int]:
        h, w = self.model.patch_embed.grid_size
        return int(h), int(w)

    def grid_for(self, image_hw: Sequence[int]) -> Tuple[int, int]:
        """The patch grid the model uses for an image of size ``image_hw``."""
        pe = self.model.patch_embed
        if hasattr(pe, "dynamic_feat_size"):
            h, w = pe.dynamic_feat_size(tuple(int(s) for s in image_hw))
            return int(h), int(w)
        return self.static_grid

    def block_index(self, layer: nn.Module) -> int:
        for i, b in enumerate(self.blocks):
            if b is layer:
                return i
        check_vit_block(layer)
        raise ValueError(
            f"layer is a ViT block but not one of {type(self.model).__name__}.blocks; "
            "pass a block of the model that forward_func runs."
        )

    def head_reads_prefix_only(self) -> bool:
        """True when the head sees the last block only through its prefix rows.

        That holds for timm's class-token pooling (``global_pool="token"``,
        no attention pool) and distilled DeiT's two token heads, with timm's
        own ``forward_head`` (a per-token final norm, then pooling).
        """
        from timm.models.deit import VisionTransformerDistilled
        from timm.models.vision_transformer import VisionTransformer

        m = self.model
        if getattr(m, "attn_pool", None) is not None or getattr(m, "global_pool", None) != "token":
            return False
        if type(m).forward_head not in (VisionTransformer.forward_head, VisionTransformerDistilled.forward_head):
            return False
        return self.num_prefix_tokens >= (2 if isinstance(m, VisionTransformerDistilled) else 1)

    def tokens_layout(self, num_tokens: int, image_hw: Sequence[int]) -> Tuple[int, Tuple[int, int]]:
        """``(P, (h, w))`` for a block input of ``num_tokens`` tokens; checked."""
        h, w = self.grid_for(image_hw)
        P = self.num_prefix_tokens
        if P + h * w != num_tokens:
            raise RuntimeError(
                f"token layout mismatch: the block sees {num_tokens} tokens but the model declares "
                f"{P} prefix tokens and a {h}x{w} grid for a {tuple(image_hw)} image. Is forward_func "
                "running this model's blocks in the standard order?"
            )
        return P, (h, w)

    @contextlib.contextmanager
    def recording_image_size(self) -> Iterator["ImageSizeRecorder"]:
        """Record the spatial size of the image entering ``patch_embed``.

        The explained inputs may be resized by ``forward_func`` (e.g. CIFAR
        32x32 images upsampled to 224x224), so the grid is taken from what the
        patch embedding actually receives.
        """
        recorder = ImageSizeRecorder()
        handle = self.model.patch_embed.register_forward_pre_hook(recorder)
        try:
            yield recorder
        finally:
            handle.remove()


@dataclass
class ImageSizeRecorder:
    """Forward pre-hook that stores the ``(H, W)`` of the last patch-embed input."""

    image_hw: Optional[Tuple[int, int]] = None

    def __call__(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        self.image_hw = (int(args[0].shape[-2]), int(args[0].shape[-1]))


def prenorm_block_forward(block: nn.Module, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
    """``y = r + ls1(attn(x)); y + ls2(mlp(norm2(y)))`` with the block's own parts.

    With ``residual=None`` the residual is ``x`` itself. ReciproCAM feeds the
    masked LayerNorm output as both ``x`` and residual (methods.md section 1).
    """
    r = x if residual is None else residual
    y = r + block.ls1(block.attn(x))
    return y + block.ls2(block.mlp(block.norm2(y)))


def block_forward(block: nn.Module, x: Tensor) -> Tensor:
    """The standard pre-norm block, used to check that a hooked block is one."""
    return prenorm_block_forward(block, block.norm1(x), residual=x)
