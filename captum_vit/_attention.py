"""One mechanism that exposes every block's attention: ``S``, ``A`` and ``dy/dA``.

timm's fused attention never materialises the scores ``S`` or the weights
``A``. :class:`AttentionRecorder` registers a forward hook on each chosen
attention module that re-computes the module's output with explicit matrices
(:meth:`captum_vit._vit.AttentionView.explicit`) and returns it in place of
the fused result, so ``A`` is part of the autograd graph. Nothing is edited:
the ``fused_attn`` flag is never touched, and the hooks are removed on exit,
also after an exception. Every hook call also checks that the explicit
result equals the module's own output, so an attention variant this module
does not know fails loudly instead of explaining the wrong computation.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from captum.log import log_usage
from torch import Tensor, nn

from ._utils import (
    HookSet,
    TensorOrTuple,
    agreement_tolerance,
    relative_error,
    Targets,
    check_batch_size,
    forward_logits,
    output_maps,
    prepare_inputs,
    prepare_targets,
    row_chunks,
)
from ._vit import AttentionView, ViTStructure


class AttentionRecorder(HookSet):
    """Records ``S`` and ``A`` of the chosen blocks during one forward pass.

    Args:
        structure: the ViT.
        block_indices: indices into ``structure.blocks``.
        detach_input: feed ``x.detach()`` to every attention module of the
            model, recorded or not (AGCAM: gradients reach ``A`` only through
            skip connections and MLPs); ``A`` is then a leaf that requires grad.
        requires_grad: make ``A`` part of a differentiable graph even when
            neither the inputs nor the parameters require grad.
        score_rows: keep only the first ``score_rows`` query rows of ``S``
            (AGCAM reads the class-token row alone); ``None`` keeps all.

    After the forward, ``scores[i]`` and ``weights[i]`` hold the ``(B, H, T, T)``
    scores and weights of block ``block_indices[i]`` (``(B, H, score_rows, T)``
    scores with ``score_rows``).
    """

    def __init__(
        self,
        structure: ViTStructure,
        block_indices: Sequence[int],
        detach_input: bool = False,
        requires_grad: bool = False,
        score_rows: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.score_rows = score_rows
        self.structure = structure
        self.block_indices = list(block_indices)
        self.detach_input = detach_input
        self.requires_grad = requires_grad
        self.views = [AttentionView(structure.blocks[i].attn) for i in self.block_indices]
        self.scores: List[Optional[Tensor]] = []
        self.weights: List[Optional[Tensor]] = []

    def __enter__(self) -> "AttentionRecorder":
        self.reset()
        for slot, view in enumerate(self.views):
            self.add(view.module.register_forward_hook(self._hook(slot, view), with_kwargs=True))
        if self.detach_input:  # every attention input is detached, recorded or not
            for i, block in enumerate(self.structure.blocks):
                if i not in self.block_indices:
                    self.add(block.attn.register_forward_pre_hook(_detach_first_argument))
        return self

    def reset(self) -> None:
        self.scores = [None] * len(self.views)
        self.weights = [None] * len(self.views)

    def _hook(self, slot: int, view: AttentionView):
        def hook(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Tensor) -> Tensor:
            if kwargs.get("attn_mask") is not None or kwargs.get("is_causal", False):
                raise NotImplementedError("attention masks are not supported by captum_vit's attention capture.")
            x = args[0] if args else kwargs["x"]
            if self.detach_input:
                x = x.detach()
            elif self.requires_grad and not x.requires_grad:
                # nothing upstream needs a gradient; a leaf here keeps every A in the graph
                x = x.detach().requires_grad_(True)
            out, scores, weights = view.explicit(x, detach_weights=self.detach_input)
            if not module.training:
                _check_same_output(module, out, output)
            self.scores[slot] = scores if self.score_rows is None else scores[:, :, : self.score_rows].detach()
            self.weights[slot] = weights
            return out

        return hook

    def recorded(self) -> Tuple[List[Tensor], List[Tensor]]:
        if any(w is None for w in self.weights):
            raise RuntimeError("forward_func did not run every explained attention module.")
        return list(self.scores), list(self.weights)  # type: ignore[arg-type]


def _detach_first_argument(module: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
    return (args[0].detach(), *args[1:])


def _check_same_output(module: nn.Module, explicit: Tensor, reference: Tensor) -> None:
    err = relative_error(explicit, reference)
    if err > agreement_tolerance(reference.dtype):
        raise RuntimeError(
            f"captum_vit's explicit attention does not reproduce {type(module).__name__} "
            f"(relative difference {err:.2e}); this attention variant is not supported."
        )


def resolve_blocks(structure: ViTStructure, layers: Optional[Sequence[Any]]) -> List[int]:
    """Block indices from ``None`` (all), ints, or block modules."""
    if layers is None:
        return list(range(len(structure.blocks)))
    if isinstance(layers, (int, nn.Module)):
        layers = [layers]
    indices = []
    n = len(structure.blocks)
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, nn.Module)):
            raise TypeError(f"layers must hold block indices or blocks of the model; got {type(layer).__name__}.")
        if isinstance(layer, int):
            if not -n <= layer < n:
                raise ValueError(f"block index {layer} is out of range for a model with {n} blocks.")
            indices.append(layer % n)
        else:
            indices.append(structure.block_index(layer))
    if not indices:
        raise ValueError("layers is empty; pass None for every block.")
    return sorted(set(indices))


class AttentionExplainer:
    """Base of the attention-based explainers: owns capture, batching and output.

    A subclass sets the class attributes below and implements :meth:`combine`,
    which turns one forward's recorded attention (and, for gradient methods,
    ``dy/dA`` of one target per example) into ``(n, h*w)`` maps.
    """

    #: feed ``x.detach()`` to every attention module (AGCAM)
    detach_attention_input = False
    #: the map depends on the target through ``dy/dA``
    uses_gradients = False
    #: query rows of ``S`` that :meth:`combine` reads (``None``: all)
    score_rows: Optional[int] = None

    def __init__(
        self,
        forward_func: Callable[..., Any],
        layers: Optional[Sequence[Any]] = None,
        vit: Optional[nn.Module] = None,
    ) -> None:
        r"""
        Args:
            forward_func: the model, or a module/callable around it, mapping
                ``(B, C, H, W)`` inputs to ``(B, num_classes)`` logits.
            layers: blocks to use, as indices or modules of ``model.blocks``;
                ``None`` (default) uses every block.
            vit: the timm ``VisionTransformer``; needed only when
                ``forward_func`` is not a module containing it.
        """
        super().__init__(forward_func)  # the Captum base class that follows in the MRO
        self.structure = ViTStructure.find(forward_func, None, vit)
        if not self.structure.has_class_token:
            raise ValueError(
                f"{type(self).__name__} reads the class token's attention row, but this model has no class "
                "token (class_token=False); use LayerReciproCAM instead."
            )
        self.block_indices = resolve_blocks(self.structure, layers)
        for i in self.block_indices:  # fail now, not at the first call, on unknown attention modules
            AttentionView(self.structure.blocks[i].attn)

    def combine(self, scores: List[Tensor], weights: List[Tensor], grads: Optional[List[Tensor]], P: int) -> Tensor:
        """``(n, h*w)`` maps from one forward's recorded attention (and ``dy/dA``)."""
        raise NotImplementedError

    @property
    def multiplies_by_inputs(self) -> bool:
        return False

    @log_usage(part_of_slo=True)
    def attribute(
        self,
        inputs: TensorOrTuple,
        target: Any = None,
        additional_forward_args: Any = None,
        normalize: bool = True,
        batch_size: Optional[int] = None,
    ) -> TensorOrTuple:
        r"""
        Args:
            inputs: ``(B, C, H, W)`` images, or a tuple whose first element
                is; the output is a tuple then too.
            target: ``None`` (predicted class), an ``int``, a list of ``B``
                ints or a ``(B,)`` tensor, or a ``(B, k)`` tensor for ``k``
                maps per example (one forward pass, one backward pass each).
                Class-agnostic methods ignore it but for the output shape.
            additional_forward_args: extra arguments for ``forward_func``.
            normalize: min-max scale each map to ``[0, 1]`` (default);
                ``False`` returns the raw values.
            batch_size: images per forward/backward pass (memory bound);
                ``None`` takes the whole batch at once.

        Returns:
            ``(B, 1, h, w)`` float32 maps on the patch grid (``(B, k, h, w)``
            for a 2-D target).
        """
        prepared = prepare_inputs(inputs, additional_forward_args)
        targets = prepare_targets(target, prepared.batch_size)
        check_batch_size(batch_size)
        chunks = [
            self._maps(prepared.forward_args(rows), targets, rows)
            for rows in row_chunks(prepared.batch_size, batch_size)
        ]
        return prepared.format(output_maps(torch.cat(chunks), normalize))

    def _maps(self, args: Tuple[Any, ...], targets: Targets, rows: slice) -> Tensor:
        recorder = AttentionRecorder(
            self.structure,
            self.block_indices,
            detach_input=self.detach_attention_input,
            requires_grad=self.uses_gradients,
            score_rows=self.score_rows,
        )
        grad_mode = torch.enable_grad() if self.uses_gradients else torch.no_grad()
        with grad_mode:
            with self.structure.recording_image_size() as size, recorder:
                logits = forward_logits(self.forward_func, args)  # type: ignore[attr-defined]
            scores, weights = recorder.recorded()
            P, (h, w) = self.structure.tokens_layout(weights[0].shape[-1], size.image_hw)
            chosen = targets.resolve(logits.detach(), rows)
            n, k = chosen.shape
            if not self.uses_gradients:
                return self.combine(scores, weights, None, P).view(n, 1, h, w).expand(n, k, h, w).detach()
            maps = []
            for j in range(k):  # one forward, one backward per target column
                score = logits.gather(1, chosen[:, j : j + 1]).sum()
                grads = torch.autograd.grad(score, weights, retain_graph=j < k - 1)
                maps.append(self.combine(scores, weights, list(grads), P).detach())
        return torch.stack(maps, dim=1).view(n, k, h, w)
