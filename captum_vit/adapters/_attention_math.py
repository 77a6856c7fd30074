"""`AttentionMath`: a family's self-attention written out, and the call it was made with."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Protocol, Tuple

import torch
from torch import Tensor, nn

from ._errors import UnsupportedModelError


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


def split_heads(u: Tensor, num_heads: int) -> Tensor:
    """``(B, T, H*d)`` -> ``(B, H, T, d)``."""
    B, T, width = u.shape
    return u.view(B, T, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(o: Tensor) -> Tensor:
    """``(B, H, T, d)`` -> ``(B, T, H*d)``."""
    B, H, T, d = o.shape
    return o.transpose(1, 2).reshape(B, T, H * d)


@dataclass(frozen=True)
class KeyValueMaps:
    """An attention's keys and values as affine maps of each input token ``z``, per head ``h``:
    ``k_h = key_weight[h] z + (a key bias)`` and ``v_h = value_weight[h] z + value_bias[h]``.

    Weights ``(H, d, D)``, ``value_bias`` ``(H, d)`` or ``None``. The key bias
    is left out: it adds ``q . b_k`` to every score of a query row, which the
    softmax cancels.
    """

    key_weight: Tensor
    value_weight: Tensor
    value_bias: Optional[Tensor]

    @classmethod
    def of_fused(cls, weight: Tensor, bias: Optional[Tensor], num_heads: int, head_dim: int) -> "KeyValueMaps":
        """From a fused ``(3 H d, D)`` query-key-value projection (timm's ``qkv``, ``nn.MultiheadAttention``'s
        ``in_proj``), its rows in the order queries, keys, values."""
        width = num_heads * head_dim
        return cls(weight[width : 2 * width].view(num_heads, head_dim, -1),
                   weight[2 * width :].view(num_heads, head_dim, -1),
                   None if bias is None else bias[2 * width :].view(num_heads, head_dim))


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

    def key_value_maps(self, call: Call) -> Optional[KeyValueMaps]:
        """The keys and values as affine maps of the input token, where that is all they are (no norm,
        rotary embedding or other transform after the linear layer); ``None`` (the default) otherwise."""
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

    def prefix_attention(self, z: Tensor, call: Call, rows: int) -> Tensor:
        """``(N, H, rows, d)``: ``A v`` at the first ``rows`` query rows of inputs ``z`` (``(N, T, D)``).

        Where the keys and values are affine maps of the tokens
        (`key_value_maps`), they are never projected: a query's scores are
        ``(W_k^T q) . z_t`` and its output ``W_v (sum_t A_t z_t) + b_v`` (the
        weights sum to one), ``2 H D`` multiplications per token instead of the
        ``2 D^2`` of projecting its key and value. The same sums in another
        order: equal up to rounding.
        """
        bias = self.score_bias(call)
        bias = None if bias is None else bias[..., :rows, :]
        maps = self.key_value_maps(call)
        if maps is None:
            q, k, v = self.project_rows(z, call, rows)
            return self.attend(q, k, v, bias)
        H = self.num_heads
        q = self.project(z[:, :rows], call)[0]  # (N, H, rows, d): the wanted rows' queries only
        reach = torch.einsum("nhrd,hdk->nhrk", q * self.scale, maps.key_weight)  # (N, H, rows, D)
        scores = (reach.flatten(1, 2) @ z.transpose(1, 2)).unflatten(1, (H, rows))  # (N, H, rows, T)
        if bias is not None:
            scores = scores + bias
        weights = self.attention_dropout(scores.softmax(dim=-1))
        mixed = (weights.flatten(1, 2) @ z).unflatten(1, (H, rows))  # (N, H, rows, D): sum_t A_t z_t
        out = torch.einsum("nhrk,hdk->nhrd", mixed, maps.value_weight)
        return out if maps.value_bias is None else out + maps.value_bias[:, None, :]

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
