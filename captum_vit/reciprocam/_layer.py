"""ViT-ReciproCAM as a Captum layer attribution: Captum's contract over `ReciproCAMEngine`."""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import torch
from captum.attr import LayerAttribution, PerturbationAttribution
from captum.log import log_usage
from torch import nn

from .._attribution import reporting_user_errors
from .._utils import (
    ALL_CLASSES,
    HookSet,
    PreparedInputs,
    TensorOrTuple,
    calling_forward_func,
    compute_dtype,
    output_maps,
    prepare_inputs,
    prepare_targets,
)
from ..adapters import BlockView, ViTAdapter, check_runtime, eager_forward_func, find_adapter
from ._engine import ReciproCAMEngine, refuse_user_block_hooks
from ._options import ReciproCAMOptions


class _StopForward(Exception):
    """Raised by a probe hook to end a forward pass early."""


class LayerReciproCAM(LayerAttribution, PerturbationAttribution):
    r"""ViT-ReciproCAM: gradient-free class activation maps for ViTs.

    Byun & Lee, "ViT-ReciproCAM: Gradient and Attention-Free Visual
    Explanations for Vision Transformer", arXiv 2310.02588.

    For the explained block \(L\) with input \(X\) and
    \(Z = \mathrm{norm1}(X)\), every patch cell \(k\) of the
    \(h \times w\) grid gets a token mask \(M_k\) (a 3x3 binomial
    kernel around the cell, or a one-hot "dirac"; prefix tokens kept) and a
    masked copy \(Z_k = Z \odot M_k\) that replaces the attention input;
    the block's residual is \(R_k\):

    \[
        y_k = R_k + \mathrm{ls1}(\mathrm{attn}(Z_k)),\quad
        y_k \leftarrow y_k + \mathrm{ls2}(\mathrm{mlp}(\mathrm{norm2}(y_k))).
    \]

    The method's authors published three codes that differ in \(R_k\)
    (``residual``): the unmasked block input \(X\) (``"unmasked"``, the
    default: the paper's "unmodified skip connected feature" and the authors'
    own repository ``sybyun/vitcam``, which explains the second-last block),
    \(Z_k\) (``"normalized"``, OpenVINO Training Extensions 1.x, last
    block) or \(X \odot M_k\) (``"input"``, OpenVINO XAI 1.1, last block,
    with logits). The rest of the model runs on every copy, and the map of
    class \(c\) at cell \(k\) is \(\mathrm{softmax}(f(y_k))_c\)
    (or the logit), min-max scaled per image and class. One pass scores every
    class, so maps for many targets cost no more than one
    (`attribute_all_classes`).

    Two exact ways to compute it (docs/methods.md 1.4):

    - the general path: the explained block's output is replaced by the
      masked copies, run through everything after it in chunks of
      ``batch_size`` copies; every supported family and block;
    - the fast path: masks scale whole tokens, so every token is projected
      once per mask value and the copies share the projections; where the
      head reads only prefix tokens the last block computes only the prefix
      rows of each copy. For the last block that is about one extra forward
      pass for all \(h w\) copies; for an earlier block the copies still
      run the MLP of the explained block and every block in between.

    ``path="auto"`` (default) uses the fast path only where it is proven by
    behaviour: before its first use (and again whenever the blocks it
    computes change their modules or hooks) it is compared with the general
    path on the unmasked and several masked copies of one image; if they
    differ, the general path is used and a warning says why.
    """

    def __init__(
        self,
        forward_func: Callable[..., Any],
        layer: nn.Module,
        vit: Optional[nn.Module] = None,
        device_ids: Optional[List[int]] = None,
    ) -> None:
        r"""
        Args:
            forward_func: the model, or any callable around it (a wrapper that
                normalises or resizes, a function returning ``.logits``, a
                ``torch.compile``'d model, which is explained through its eager
                module) mapping ``(B, C, H, W)`` inputs to ``(B, num_classes)`` logits.
            layer: the block to explain (any block of the model), e.g.
                ``model.blocks[-2]`` in timm, the authors' choice.
            vit: the model holding ``layer``; needed only when
                ``forward_func`` is not a module that contains it.
            device_ids: accepted for Captum compatibility (DataParallel).
        """
        self.adapter: ViTAdapter = find_adapter(forward_func, layer, vit)
        forward_func = eager_forward_func(forward_func)
        LayerAttribution.__init__(self, forward_func, layer, device_ids)
        PerturbationAttribution.__init__(self, forward_func)
        self.engine = ReciproCAMEngine(forward_func, self.adapter, layer)

    @property
    def block_index(self) -> int:
        """Index of the explained block among the model's blocks."""
        return self.engine.block_index

    @property
    def view(self) -> BlockView:
        return self.engine.view

    @property
    def last_path(self) -> Optional[str]:
        """The path the last call took, ``"fast"`` or ``"general"`` (``None`` before any call)."""
        return self.engine.last_path

    @property
    def multiplies_by_inputs(self) -> bool:
        return False

    def fast_path_unavailable_reason(self) -> Optional[str]:
        """Why the exact fast path cannot be used for this block, or ``None`` (see the class doc)."""
        return self.engine.fast_path_unavailable_reason()

    @log_usage(part_of_slo=True)
    def attribute(
        self,
        inputs: TensorOrTuple,
        target: Any = None,
        additional_forward_args: Any = None,
        *,
        kernel: str = "gaussian",
        keep_prefix_tokens: bool = True,
        scores: str = "softmax",
        normalize: bool = True,
        batch_size: Optional[int] = None,
        path: str = "auto",
        residual: str = "unmasked",
    ) -> TensorOrTuple:
        r"""
        Args:
            inputs: ``(B, C, H, W)`` images, or a tuple whose first element
                is; the output is a tuple then too.
            target: ``None`` (the predicted class), an ``int``, a list of
                ``B`` ints or a ``(B,)`` tensor (one map per example), or a
                ``(B, k)`` tensor (``k`` maps per example, same cost).
            additional_forward_args: extra arguments for ``forward_func``,
                after the inputs; tensors with ``B`` rows are chunked along.
            kernel: ``"gaussian"`` (3x3 binomial, the paper's default) or
                ``"dirac"`` (one cell per copy).
            keep_prefix_tokens: keep class/distillation/register tokens in
                every copy (default), or mask them (the paper's ablation).
            scores: ``"softmax"`` probabilities (default) or raw ``"logits"``.
            normalize: min-max scale each map to ``[0, 1]``; ``False`` returns
                the raw scores.
            batch_size: masked copies computed at once (memory bound);
                ``None`` picks a bound from the token count. When the copies
                flow through later blocks it is the copies per call of
                ``forward_func``; when the last block is explained on the
                fast path the model runs once per image regardless, and
                ``batch_size`` bounds the copies computed together inside it.
            path: ``"auto"``, ``"fast"`` or ``"general"`` (see class doc).
            residual: the explained block's residual: ``"unmasked"`` (its
                input, default), ``"normalized"`` (the masked normalised
                input) or ``"input"`` (the masked block input).

        Returns:
            ``(B, 1, h, w)`` maps on the patch grid (``(B, k, h, w)`` for a
            2-D target), float32. Upsample with
            ``LayerAttribution.interpolate(maps, images.shape[-2:], "bilinear")``.
        """
        prepared = prepare_inputs(inputs, additional_forward_args)
        targets = prepare_targets(target, prepared.batch_size)
        options = ReciproCAMOptions(kernel=kernel, keep_prefix_tokens=keep_prefix_tokens, scores=scores,
                                    residual=residual, batch_size=batch_size, path=path)
        return prepared.format(self._output(self._maps(prepared, targets, options), normalize, prepared))

    def attribute_all_classes(
        self, inputs: TensorOrTuple, additional_forward_args: Any = None, **kwargs: Any
    ) -> TensorOrTuple:
        """Maps of every class from one pass: ``(B, num_classes, h, w)``.

        Takes the keyword arguments of `attribute` except ``target``.
        """
        prepared = prepare_inputs(inputs, additional_forward_args)
        normalize = kwargs.pop("normalize", True)
        unknown = set(kwargs) - set(ReciproCAMOptions.names())
        if unknown:
            raise TypeError(f"unexpected keyword arguments: {', '.join(sorted(unknown))}")
        maps = self._maps(prepared, prepare_targets(ALL_CLASSES, prepared.batch_size), ReciproCAMOptions(**kwargs))
        return prepared.format(self._output(maps, normalize, prepared))

    def _output(self, maps: torch.Tensor, normalize: bool, prepared: PreparedInputs) -> torch.Tensor:
        dtype = compute_dtype(self.adapter.model, prepared.images.device)
        return output_maps(maps, normalize, who="ViT-ReciproCAM", dtype=dtype,
                           hint=": try scores='logits' or another block")

    def _maps(self, prepared: PreparedInputs, targets: Any, options: ReciproCAMOptions) -> torch.Tensor:
        options.check()
        with torch.no_grad(), self.adapter.explaining():  # the block's hooks are only ours from here on
            check_runtime(self.adapter, "ViT-ReciproCAM", needs_gradients=False)
            refuse_user_block_hooks(self.layer, self.adapter, self.block_index)
            with reporting_user_errors(self.forward_func, prepared, "ViT-ReciproCAM"):
                return self.engine.raw_maps(prepared, targets, self._probe_grid(prepared), options)

    def _probe_grid(self, prepared: PreparedInputs) -> Tuple[int, int]:
        """The explained block's patch grid for these inputs, from a forward stopped at the image entry."""

        def stop(module: nn.Module, args: Tuple[Any, ...]) -> None:
            raise _StopForward

        with self.adapter.recording_image_size() as recorder, HookSet() as hooks:
            hooks.forward_pre_hook(self.adapter.image_module, stop)
            try:
                with calling_forward_func():
                    self.forward_func(*prepared.forward_args(slice(0, 1)))
            except _StopForward:
                pass
        if recorder.image_hw is None:
            raise RuntimeError("forward_func never ran the model's patch embedding; is it the right model?")
        return self.adapter.block_grid(self.block_index, recorder.image_hw)
