"""One mechanism that exposes every block's attention: ``S``, ``A`` and ``dy/dA``.

Fused attention kernels never materialise the scores ``S`` or the weights
``A``. `AttentionRecorder` registers a forward hook on each chosen
attention module that re-computes the module's output with explicit matrices
(the adapter's `~captum_vit.adapters.AttentionMath`) and returns it in
place of the fused result, so ``A`` is part of the autograd graph. Nothing is
edited: no flag is touched, and the hooks are removed on exit, also after an
exception. Every hook call also checks that the explicit result equals the
module's own output, so an attention variant, a forward hook or a patched
forward that the explicit form does not reproduce fails loudly instead of
explaining the wrong computation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ._attribution import ViTAttribution
from ._utils import (
    HookSet,
    Targets,
    agreement_tolerance,
    calling_forward_func,
    forward_logits,
    relative_error,
)
from .adapters import (
    HEAD_PATCHES_ONLY,
    AttentionMath,
    BlockView,
    GradientRule,
    UnsupportedModelError,
    ViTAdapter,
)


class AttentionRecorder(HookSet):
    """Records ``S`` and ``A`` of the chosen blocks during one forward pass.

    Args:
        adapter: the ViT's adapter.
        views: the chosen blocks' views (each with an ``AttentionMath``).
        other_attention: the attention modules of the blocks not recorded.
        detach_input: feed detached inputs to every attention module of the
            model, recorded or not (AGCAM: gradients reach ``A`` only through
            skip connections and MLPs); the first ``gradient_rows`` rows of
            ``A`` are then a leaf that requires grad (the rest is constant).
        requires_grad: make ``A`` part of a differentiable graph even when
            neither the inputs nor the parameters require grad.
        score_rows: keep only the first ``score_rows`` query rows of ``S``
            (AGCAM reads the class-token row alone); ``0`` keeps none,
            ``None`` all.
        gradient_rows: with ``detach_input``, the rows of ``A`` whose
            gradient is wanted.
        keep_weights: what to keep of each ``A`` (default all of it); must be
            ``A`` itself for gradient methods, whose ``dy/dA`` is taken.
        record_blocks: record each view's block input and the last view's
            block output (detached).
        rule: the backward pass's rule through ``v``, ``S`` and ``A``
            (`~captum_vit.adapters.GradientRule`; AttnLRP).

    After the forward, ``scores[i]`` and ``weights[i]`` hold what was kept of
    ``views[i]``'s scores and weights: ``(B, H, T, T)`` unless reduced.
    """

    def __init__(
        self,
        adapter: ViTAdapter,
        views: Sequence[BlockView],
        other_attention: Sequence[nn.Module] = (),
        detach_input: bool = False,
        requires_grad: bool = False,
        score_rows: Optional[int] = None,
        gradient_rows: int = 1,
        keep_weights: Callable[[Tensor], Tensor] = lambda a: a,
        record_blocks: bool = False,
        rule: Optional[GradientRule] = None,
    ) -> None:
        super().__init__()
        self.rule = rule
        self.gradient_rows = gradient_rows
        self.keep_weights = keep_weights
        self.record_blocks = record_blocks
        #: with ``record_blocks``: each view's block input, and the last view's block output (detached)
        self.block_inputs: List[Optional[Tensor]] = []
        self.last_output: Optional[Tensor] = None
        self.adapter = adapter
        self.views = list(views)
        self.other_attention = list(other_attention)
        self.detach_input = detach_input
        self.requires_grad = requires_grad
        self.score_rows = score_rows
        self.scores: List[Optional[Tensor]] = []
        self.weights: List[Optional[Tensor]] = []

    def __enter__(self) -> "AttentionRecorder":
        self.scores = [None] * len(self.views)
        self.weights = [None] * len(self.views)
        self._grad_modes: List[bool] = []
        for slot, view in enumerate(self.views):
            # the module's own (fused) forward only serves the agreement check: no graph for it
            self.forward_pre_hook(view.attention_module, self._pause_grad)
            self.forward_hook(view.attention_module, self._hook(slot, view), with_kwargs=True)
        if self.record_blocks:
            self.block_inputs = [None] * len(self.views)
            for slot, view in enumerate(self.views):
                self.forward_pre_hook(view.block, self._block_input(slot, view), with_kwargs=True)
            self.forward_hook(self.views[-1].block, self._block_output(self.views[-1]))
        if self.detach_input:  # every attention input is detached, recorded or not
            for module in self.other_attention:
                self.forward_pre_hook(module, _detach_tensors, with_kwargs=True)
        return self

    def _block_input(self, slot: int, view: BlockView) -> Callable[..., None]:
        def record(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
            self.block_inputs[slot] = view.read_call(args, kwargs)[0].detach()

        return record

    def _block_output(self, view: BlockView) -> Callable[..., None]:
        def record(module: nn.Module, args: Tuple[Any, ...], output: Any) -> None:
            self.last_output = view.unwrap_output(output).detach()

        return record

    def _pause_grad(self, module: nn.Module, args: Tuple[Any, ...]) -> None:
        self._grad_modes.append(torch.is_grad_enabled())
        torch.set_grad_enabled(False)

    def _hook(self, slot: int, view: BlockView) -> Callable[..., Any]:
        math: AttentionMath = view.math  # type: ignore[assignment]

        def hook(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any) -> Any:
            torch.set_grad_enabled(self._grad_modes.pop())
            x, call = math.read_call(args, kwargs)
            math.check_call(call)
            if self.detach_input:
                x = x.detach()
            elif self.requires_grad and not x.requires_grad:
                # nothing upstream needs a gradient; a leaf here keeps every A in the graph
                x = x.detach().requires_grad_(True)
            leaf_rows = self.gradient_rows if self.detach_input else None
            out, scores, weights = math.explicit(x, call, leaf_rows=leaf_rows, rule=self.rule)
            if not module.training:
                _check_same_output(self.adapter, view, out, math.unwrap_output(output))
            # keep only what the method reads: a clone of a few rows frees the (B, H, T, T) scores
            self.scores[slot] = None if self.score_rows == 0 else (
                scores if self.score_rows is None else scores[:, :, : self.score_rows].detach().clone()
            )
            self.weights[slot] = self.keep_weights(weights)
            return math.wrap_output(output, out)

        return hook

    def recorded(self) -> Tuple[List[Optional[Tensor]], List[Tensor]]:
        if any(w is None for w in self.weights):
            raise RuntimeError(
                "forward_func did not run every explained attention module in the calling thread; it must run "
                "the model in the thread that calls attribute (nn.DataParallel over several GPUs does not)."
            )
        return list(self.scores), list(self.weights)  # type: ignore[arg-type]


def _detach_tensors(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[Any, Any]:
    detach = lambda v: v.detach() if isinstance(v, Tensor) else v  # noqa: E731
    return tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()}


def _check_same_output(adapter: ViTAdapter, view: BlockView, explicit: Tensor, reference: Tensor) -> None:
    err = relative_error(explicit, reference)
    if err > agreement_tolerance(reference.dtype):
        index = adapter.blocks.index(view.block)
        raise UnsupportedModelError(
            f"the explicit attention does not reproduce {type(view.attention_module).__name__} of "
            f"{adapter.blocks_expression()}[{index}] (relative difference {err:.2e}): a forward hook on it, a "
            "patched forward or an attention variant captum_vit does not know. Remove the hook or patch while "
            "explaining, or use LayerReciproCAM with path='general', which runs the module as it is."
        )


def resolve_blocks(adapter: ViTAdapter, layers: Optional[Sequence[Any]]) -> List[int]:
    """Block indices from ``None`` (all), ints, or block modules."""
    n = len(adapter.blocks)
    if layers is None:
        return list(range(n))
    if isinstance(layers, (int, nn.Module)) or hasattr(layers, "__index__"):
        layers = [layers]
    indices = []
    for layer in layers:
        if isinstance(layer, nn.Module):
            indices.append(adapter.block_index(layer))
            continue
        if isinstance(layer, bool) or not hasattr(layer, "__index__"):
            raise TypeError(f"layers must hold block indices or blocks of the model; got {type(layer).__name__}.")
        index = int(layer.__index__())
        if not -n <= index < n:
            raise ValueError(f"block index {index} is out of range for a model with {n} blocks.")
        indices.append(index % n)
    if not indices:
        raise ValueError("layers is empty; pass None for every block.")
    return sorted(set(indices))


@dataclass(frozen=True)
class Reading:
    """What one forward records of the chosen blocks' attention (`AttentionRecorder`'s settings).

    Attributes:
        detach_input: feed detached inputs to every attention module (AGCAM:
            ``dy/dA`` through skip connections and MLPs only).
        score_rows: query rows of ``S`` that `AttentionExplainer.combine`
            reads (``None``: all, ``0``: none).
        gradient_rows: with ``detach_input``, the rows of ``A`` whose gradient is read.
        record_blocks: record each explained block's input and the last one's
            output (for `AttentionExplainer.prepare_backward`).
    """

    detach_input: bool = False
    score_rows: Optional[int] = 0
    gradient_rows: int = 1
    record_blocks: bool = False


class NoGradients:
    """The map depends on the attention alone (rollout): no backward pass."""

    needed = False

    def of(self, explainer: "AttentionExplainer", score: Tensor, weights: List[Tensor],
           retain_graph: bool) -> Optional[List[Tensor]]:
        return None


class AttentionGradients:
    """``dy/dA`` of each block, whole (AGCAM reads the class-token row)."""

    needed = True

    def of(self, explainer: "AttentionExplainer", score: Tensor, weights: List[Tensor],
           retain_graph: bool) -> Optional[List[Tensor]]:
        return list(torch.autograd.grad(score, weights, retain_graph=retain_graph))


class ReducedGradients:
    """What `AttentionExplainer.reduce_gradient` keeps of each block's ``A`` and ``dy/dA``, taken during the
    backward pass so that no block's whole ``(n, H, T, T)`` gradient is kept (needs an attached graph: not
    with ``Reading.detach_input``)."""

    needed = True

    def of(self, explainer: "AttentionExplainer", score: Tensor, weights: List[Tensor],
           retain_graph: bool) -> Optional[List[Tensor]]:
        # Every later block's A lies on the path from the score to the first block's A (nothing is
        # detached), so one backward to weights[0] reaches them all; each block's hook reduces its
        # gradient as soon as it exists, and only the reduction is kept.
        reduced: List[Optional[Tensor]] = [None] * len(weights)

        def keeper(slot: int) -> Callable[[Tensor], None]:
            def keep(grad: Tensor) -> None:
                reduced[slot] = explainer.reduce_gradient(slot, weights[slot], grad)

            return keep

        handles = [a.register_hook(keeper(slot)) for slot, a in enumerate(weights)]
        try:
            torch.autograd.grad(score, weights[0], retain_graph=retain_graph)
        finally:
            for handle in handles:
                handle.remove()
        if any(r is None for r in reduced):
            raise RuntimeError("the gradient did not reach every explained block's attention.")
        return reduced  # type: ignore[return-value]


class AttentionExplainer(ViTAttribution):
    """Base of the attention-based explainers: owns capture, batching and output.

    A subclass chooses its `reading` (what the forward records) and its
    `gradients` strategy (none, ``dy/dA``, or a reduction of it taken during
    the backward pass), and implements `combine`, which turns one forward's
    recorded attention (and the gradients of one target per example) into
    ``(n, h*w)`` maps.
    """

    #: what the forward records
    reading = Reading()
    #: how the map depends on the target
    gradients: Any = NoGradients()

    @property
    def needs_gradients(self) -> bool:  # type: ignore[override]
        return self.gradients.needed

    def __init__(
        self,
        forward_func: Callable[..., Any],
        layers: Optional[Sequence[Any]] = None,
        vit: Optional[nn.Module] = None,
    ) -> None:
        r"""
        Args:
            forward_func: the model, or a module/callable around it, mapping
                ``(B, C, H, W)`` inputs to ``(B, num_classes)`` logits; a
                ``torch.compile``'d model is explained through its eager module.
            layers: blocks to use, as indices or modules of the model's
                blocks; ``None`` (default) uses every block.
            vit: the model; needed only when ``forward_func`` is not a module
                containing it.
        """
        super().__init__(forward_func, vit)
        name = self.who
        self.refuse_attention_refusal()
        if not self.adapter.has_class_token:
            raise UnsupportedModelError(
                f"{name} reads the class token's attention row, but this model has no class token "
                "(class_token=False); use LayerReciproCAM instead."
            )
        if self.adapter.head_reads == HEAD_PATCHES_ONLY:
            raise UnsupportedModelError(
                f"{name} explains through the class token's attention row, but the head of this "
                f"{type(self.adapter.model).__name__} reads {self.adapter.head_reads}: the class token's row "
                "does not reach the prediction. Use LayerReciproCAM, which explains any head."
            )
        self.block_indices = resolve_blocks(self.adapter, layers)
        self.views = self.explicit_views(self.block_indices, "to read the attention matrix")
        # the blocks not explained still get detached attention inputs (AGCAM); found once, not per call
        self.other_attention = [
            self.adapter.block_view(block).attention_module
            for i, block in enumerate(self.adapter.blocks)
            if i not in self.block_indices
        ]

    def prepare_backward(self, target: Tensor, recorder: AttentionRecorder, P: int) -> None:
        """Called before the backward pass of each ``(n,)`` target column (default: nothing)."""

    def reduce_gradient(self, slot: int, weights: Tensor, grad: Tensor) -> Tensor:
        """What `combine` reads of block ``slot``'s ``A`` and ``dy/dA`` (with `ReducedGradients`)."""
        raise NotImplementedError

    def keep_weights(self, weights: Tensor) -> Tensor:
        """What `combine` reads of one block's ``(n, H, T, T)`` weights (all, by default).

        Called during the forward, so a reduction here frees the rest at
        once. Gradient methods must keep ``A`` itself (``dy/dA`` is taken).
        """
        return weights

    def combine(
        self, scores: List[Optional[Tensor]], weights: List[Tensor], grads: Optional[List[Tensor]], P: int
    ) -> Tensor:
        """``(n, h*w)`` maps from one forward's recorded attention (and ``dy/dA``)."""
        raise NotImplementedError

    def chunk_maps(self, args: Tuple[Any, ...], targets: Targets, rows: slice) -> Tensor:
        recorder = AttentionRecorder(
            self.adapter,
            self.views,
            self.other_attention,
            detach_input=self.reading.detach_input,
            requires_grad=self.needs_gradients,
            score_rows=self.reading.score_rows,
            gradient_rows=self.reading.gradient_rows,
            keep_weights=self.keep_weights,
            record_blocks=self.reading.record_blocks,
        )
        grad_mode = torch.enable_grad() if self.needs_gradients else torch.no_grad()
        with grad_mode:
            with self.adapter.recording_image_size() as size, recorder, calling_forward_func():
                logits = forward_logits(self.forward_func, args)  # type: ignore[attr-defined]
            scores, weights = recorder.recorded()
            P, (h, w) = self.adapter.tokens_layout(weights[0].shape[-1], size.image_hw)
            chosen = targets.resolve(logits.detach(), rows)
            n, k = chosen.shape
            if not self.needs_gradients:
                return self.combine(scores, weights, None, P).view(n, 1, h, w).expand(n, k, h, w).detach()
            maps = []
            for j in range(k):  # one forward, one backward per target column
                score = logits.gather(1, chosen[:, j : j + 1]).sum()
                self.prepare_backward(chosen[:, j], recorder, P)
                grads = self.gradients.of(self, score, weights, retain_graph=j < k - 1)
                maps.append(self.combine(scores, weights, grads, P).detach())
        return torch.stack(maps, dim=1).view(n, k, h, w)
