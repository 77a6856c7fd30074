"""Chefer, Gur & Wolf's Transformer Attribution ("Relevance"): LRP relevance of attention x its gradient.

The rules follow the authors' code (``ViT_LRP.py`` / ``layers_ours.py`` of
hila-chefer/Transformer-Explainability), written as closed forms of their
``gradprop`` so that a batch is one pass; every sum their code takes over the
whole tensor is taken per example here, so a batch gives the maps of the
examples run one by one.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from captum.attr import GradientAttribution
from torch import Tensor, nn

from ._attention import AttentionExplainer, AttentionRecorder, Reading, ReducedGradients
from ._utils import (
    agreement_tolerance,
    check_choice,
    relative_error,
)
from .adapters import LRPBlock, LRPHead, SupportsLRP, UnsupportedModelError, merge_heads, split_heads


def safe_divide(a: Tensor, b: Tensor) -> Tensor:
    """The authors' ``safe_divide``: ``a / (b + 1e-9)`` where ``b != 0``, else 0."""
    den = b.clamp(min=1e-9) + b.clamp(max=1e-9)
    den = den + den.eq(0).to(den.dtype) * 1e-9
    return a / den * b.ne(0).to(b.dtype)


def _per_example_sum(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).sum(1).view(-1, *([1] * (t.dim() - 1)))


def linear_relevance(x: Tensor, weight: Tensor, relevance: Tensor) -> Tensor:
    r"""LRP-\(\alpha\beta\) with \(\alpha=1, \beta=0\) through ``x @ weight.T`` (bias ignored).

    With \(x^\pm, w^\pm\) the positive and negative parts,
    \(Z = x^+ w^{+\top} + x^- w^{-\top}\) (the positive contributions) and
    \(S = R / Z\): \(R_x = x^+ (S w^+) + x^- (S w^-)\). Conserves
    \(\sum R\) wherever \(Z \neq 0\).
    """
    px, nx = x.clamp(min=0), x.clamp(max=0)
    pw, nw = weight.clamp(min=0), weight.clamp(max=0)
    s = safe_divide(relevance, px @ pw.T + nx @ nw.T)
    return px * (s @ pw) + nx * (s @ nw)


def product_relevance(a: Tensor, b: Tensor, relevance: Tensor) -> Tuple[Tensor, Tensor]:
    r"""Gradient x input through ``a @ b`` (the authors' ``einsum`` rule), each half of it.

    \(S = R / (a b)\): \(R_a = a \odot (S b^\top) / 2\),
    \(R_b = b \odot (a^\top S) / 2\); together they conserve \(\sum R\).
    """
    s = safe_divide(relevance, a @ b)
    return a * (s @ b.transpose(-2, -1)) / 2, b * (a.transpose(-2, -1) @ s) / 2


def add_relevance(a: Tensor, b: Tensor, relevance: Tensor) -> Tuple[Tensor, Tensor]:
    r"""The authors' residual rule for ``a + b``, per example.

    \(R_a = a \odot R / (a + b)\) and likewise \(R_b\), then each is
    rescaled so the two totals split \(\sum R\) in proportion to
    \(|\sum R_a|\) and \(|\sum R_b|\): conservation is exact.
    """
    s = safe_divide(relevance, a + b)
    ra, rb = a * s, b * s
    sa, sb, total = _per_example_sum(ra), _per_example_sum(rb), _per_example_sum(relevance)
    share_a = safe_divide(sa.abs(), sa.abs() + sb.abs()) * total
    share_b = safe_divide(sb.abs(), sa.abs() + sb.abs()) * total
    return ra * safe_divide(share_a, sa), rb * safe_divide(share_b, sb)


def clone_relevance(x: Tensor, r1: Tensor, r2: Tensor) -> Tensor:
    """Relevance of a tensor used twice: the sum of both uses' (zero where ``x`` is zero)."""
    return x * (safe_divide(r1, x) + safe_divide(r2, x))


def block_forward(block: LRPBlock, x: Tensor) -> Dict[str, Tensor]:
    """The block's activations that its LRP rules read, from its ``(n, T, D)`` input ``x``."""
    H = block.num_heads
    z1 = block.norm1(x)
    q, k, v = (split_heads(u, H) for u in block.qkv(z1).chunk(3, dim=-1))
    weights = ((q * block.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    merged = merge_heads(weights @ v)
    attention_out = block.proj(merged)
    x_mid = x + attention_out
    z2 = block.norm2(x_mid)
    hidden = block.act(block.fc1(z2))
    mlp_out = block.fc2(hidden)
    return dict(x=x, z1=z1, q=q, k=k, v=v, weights=weights, merged=merged, attention_out=attention_out,
                x_mid=x_mid, z2=z2, hidden=hidden, mlp_out=mlp_out, y=x_mid + mlp_out)


def block_relevance(block: LRPBlock, x: Tensor, relevance: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Relevance through one block, from its output back to its input.

    Args:
        block: the block's parts.
        x: ``(n, T, D)`` the block's input.
        relevance: ``(n, T, D)`` relevance of the block's output.

    Returns:
        ``(R_x, R_A, y)``: ``(n, T, D)`` relevance of the input, ``(n, H, T, T)``
        relevance of the attention weights (after the product rule's halving,
        as the authors save it), and the recomputed block output (to check the
        parts against the real block).
    """
    H = block.num_heads
    a = block_forward(block, x)
    r_mid, r_mlp = add_relevance(a["x_mid"], a["mlp_out"], relevance)
    r_z2 = linear_relevance(a["z2"], block.fc1.weight, linear_relevance(a["hidden"], block.fc2.weight, r_mlp))
    r_mid = clone_relevance(a["x_mid"], r_mid, r_z2)  # act, norm2: through
    r_x, r_attention = add_relevance(x, a["attention_out"], r_mid)
    r_merged = split_heads(linear_relevance(a["merged"], block.proj.weight, r_attention), H)
    r_weights, r_v = product_relevance(a["weights"], a["v"], r_merged)
    r_q, r_k_t = product_relevance(a["q"], a["k"].transpose(-2, -1), r_weights)  # softmax: through; the scale cancels
    r_qkv = torch.cat([merge_heads(r) for r in (r_q, r_k_t.transpose(-2, -1), r_v)], dim=-1)
    r_z1 = linear_relevance(a["z1"], block.qkv.weight, r_qkv)  # norm1: through
    return clone_relevance(x, r_x, r_z1), r_weights, a["y"]


def head_relevance(head: LRPHead, tokens: Tensor, target: Tensor) -> Tensor:
    """Relevance of the last block's ``(n, T, D)`` output for the one-hot ``(n,)`` targets."""
    normed = head.norm(tokens)
    pooled = normed[:, head.token]
    one_hot = torch.zeros(tokens.shape[0], head.head.out_features, dtype=tokens.dtype, device=tokens.device)
    one_hot[torch.arange(tokens.shape[0]), target] = 1.0
    r_pooled = linear_relevance(pooled, head.head.weight, one_hot)
    relevance = torch.zeros_like(tokens)
    relevance[:, head.token] = pooled * safe_divide(r_pooled, pooled)  # index selection; the norm: through
    return relevance


class TransformerAttribution(AttentionExplainer, GradientAttribution):
    r"""Transformer Attribution (Chefer, Gur & Wolf, "Transformer Interpretability
    Beyond Attention Visualization", CVPR 2021): the "Relevance" baseline of
    both ViT-ReciproCAM and AGCAM.

    For the target class \(c\), LRP relevance starts from the one-hot
    \(c\) at the head and is propagated down through every block; for
    each block \(b\), \(R(A_b)\) is the relevance that reaches its
    attention weights, and with \(\nabla A_b = \partial y_c / \partial A_b\):

    \[
        \bar A_b = \mathrm{mean}_h\big(\max(0,\ \nabla A_b \odot R(A_b))\big),\qquad
        C = (\bar A_L + I) \cdots (\bar A_1 + I)
    \]

    read at the class-token row and the patch columns. The LRP rules are the
    authors': linear layers \(\alpha=1, \beta=0\) (`linear_relevance`),
    both attention products gradient x input with the relevance split between
    the operands (`product_relevance`), residual additions rescaled to
    conserve relevance (`add_relevance`), a tensor used twice summing
    its uses' relevance (`clone_relevance`), LayerNorm, GELU, softmax and
    dropout passing relevance through, and class-token pooling as an index
    selection (`head_relevance`). The authors' patch-embedding rule
    (\(z^\mathcal{B}\)) acts below the first block and never reaches this
    map, so it is not run.

    Their code takes one image at a time; here a batch is one forward pass,
    one relevance pass and one backward pass per target column, with every
    rule's sums taken per example (so the maps equal single-image runs).
    Relevance needs the block's parts (`~captum_vit.adapters.LRPBlock`):
    timm ``VisionTransformer``/DeiT with token pooling and plain blocks;
    other families and blocks with layer scale or q/k norms are refused.

    Precision: the authors' rules divide by sums that nearly cancel (the
    residual rule), so the map is an ill-conditioned function of its input
    (condition number about 1e6 on a trained DeiT-Tiny): in float32 the maps
    differ from float64 ones by up to 70 % of their range, and change with
    thread counts. By default (``precision="auto"``) they are computed in
    float64 wherever float64 is fast (CPUs, full-rate float64 GPUs), on a copy
    of the model in float64 (the model's own weights; the model itself is not
    touched), and returned in float32 (docs/methods.md 4).

    ``TransformerAttribution(forward_func, vit=None, *, precision="auto")``:
    every block is used (relevance passes through all of them).
    """

    reading = Reading(record_blocks=True)
    gradients = ReducedGradients()
    copy_fallback = ("precision='float32' to use the model as it is (its maps then depend on rounding; see the "
                     "precision argument)")

    def __init__(
        self, forward_func: Callable[..., Tensor], vit: Optional[nn.Module] = None, *, precision: str = "auto"
    ) -> None:
        """
        Args:
            forward_func: the model, or a module around it (or, with
                ``precision`` equal to the model's dtype, any callable).
            vit: the model, when ``forward_func`` is not a module containing it.
            precision: what the maps are computed in: ``"float64"``,
                ``"float32"``, or ``"auto"`` (default): float64 where float64
                is fast (CPUs; CUDA devices of compute capability 6.0, 7.0,
                8.0, 9.0), float32 elsewhere. When it differs from the model's
                dtype, a copy of ``forward_func`` in that precision computes
                them.
        """
        check_choice(precision, "precision", PRECISIONS)
        super().__init__(forward_func, layers=None, vit=vit)
        lrp = self.adapter if isinstance(self.adapter, SupportsLRP) else None
        head = lrp.lrp_head() if lrp is not None else None
        blocks = [lrp.lrp_block(view) for view in self.views] if lrp is not None else [None]
        if head is None or any(b is None for b in blocks):
            what = "its head" if head is None else f"block {[b is None for b in blocks].index(True)}"
            raise UnsupportedModelError(
                f"TransformerAttribution needs LRP rules for every part of the model, and {what} of this "
                f"{type(self.adapter.model).__name__} has parts the authors' rules do not cover (supported: timm "
                "VisionTransformer/DeiT with a class-token head and plain blocks: no layer scale, q/k norm or "
                "distillation head). Use GradientRollout, its gradient-only relative, or AGCAM."
            )
        self.precision = precision
        self.lrp_head: LRPHead = head
        self.lrp_blocks: List[LRPBlock] = blocks  # type: ignore[assignment]
        self._attention_relevance: List[Tensor] = []

    def relevance_dtype(self, device: torch.device) -> torch.dtype:
        """The precision the maps are computed in on ``device`` (see ``precision``)."""
        if self.precision != "auto":
            return getattr(torch, self.precision)
        return torch.float64 if float64_is_fast(device) else torch.float32

    def precision_for(self, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
        """`relevance_dtype`: the maps are computed in it, on a copy of the model when the model differs."""
        return self.relevance_dtype(device)

    def on_copy(self, forward_func: Callable[..., Any], vit: nn.Module, dtype: torch.dtype) -> "TransformerAttribution":
        return TransformerAttribution(forward_func, vit=vit, precision=str(dtype).replace("torch.", ""))

    def prepare_backward(self, target: Tensor, recorder: AttentionRecorder, P: int) -> None:
        inputs = recorder.block_inputs
        if recorder.last_output is None or any(x is None for x in inputs):
            raise RuntimeError("forward_func did not run every block of the model in the calling thread.")
        outputs = [*inputs[1:], recorder.last_output]
        with torch.no_grad():
            relevance = head_relevance(self.lrp_head, recorder.last_output, target)
            per_block: List[Optional[Tensor]] = [None] * len(self.lrp_blocks)
            for slot in reversed(range(len(self.lrp_blocks))):
                x = inputs[slot]
                relevance, per_block[slot], y = block_relevance(self.lrp_blocks[slot], x, relevance)  # type: ignore[arg-type]
                err = relative_error(y, outputs[slot])  # type: ignore[arg-type]
                if err > agreement_tolerance(y.dtype):
                    raise UnsupportedModelError(
                        f"{self.adapter.blocks_expression()}[{slot}] does not compute what its parts do "
                        f"(relative difference {err:.2e}): a hook or patched forward changes it, so relevance "
                        "through it would explain another computation."
                    )
        self._attention_relevance = per_block  # type: ignore[assignment]

    def reduce_gradient(self, slot: int, weights: Tensor, grad: Tensor) -> Tensor:
        return (grad * self._attention_relevance[slot].to(grad.dtype)).clamp(min=0).mean(dim=1)

    def combine(
        self, scores: List[Optional[Tensor]], weights: List[Tensor], grads: Optional[List[Tensor]], P: int
    ) -> Tensor:
        assert grads is not None  # the reduced mean_h(relu(dy/dA * R(A))) of each block
        eye = torch.eye(weights[0].shape[-1], dtype=grads[0].dtype, device=grads[0].device)
        rollout = grads[0] + eye
        for a_bar in grads[1:]:
            rollout = (a_bar + eye) @ rollout
        return rollout[:, 0, P:]


#: the precisions the maps may be computed in
PRECISIONS = ("auto", "float64", "float32")


def float64_is_fast(device: torch.device) -> bool:
    """Whether float64 arithmetic runs near float32's rate on ``device``: CPUs, and CUDA data-centre GPUs.

    NVIDIA's full-rate float64 parts are the x.0 compute capabilities from 6.0
    (P100, V100, A100, H100/H200); consumer and inference parts (6.1, 7.5,
    8.6, 8.9, ...) run float64 at 1/32 to 1/64 of float32.
    """
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return major >= 6 and minor == 0
    return False
