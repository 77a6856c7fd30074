"""`ViTAttribution`: the one ``attribute()`` that every gradient or attention explainer shares.

A method subclasses it and implements `ViTAttribution.chunk_maps` (the raw
maps of one chunk of images); finding the adapter, preparing the inputs and
targets, scoping the hooks, chunking, reporting the caller's own errors as
theirs, and formatting, normalising and checking the maps are written here
once. ``ViTAttribution`` comes first in a method's bases and a Captum
`~captum.attr.Attribution` class after it, so ``forward_func`` and Captum's
contract come from Captum.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from captum.log import log_usage
from torch import Tensor, nn

from ._utils import (
    PreparedInputs,
    Targets,
    TensorOrTuple,
    check_batch_size,
    compute_dtype,
    module_of,
    output_maps,
    prepare_inputs,
    prepare_targets,
    raised_in_forward,
    row_chunks,
    user_error_or_none,
)
from .adapters import (
    BlockView,
    RefusesAttentionMethods,
    UnsupportedModelError,
    ViTAdapter,
    check_runtime,
    eager_forward_func,
    find_adapter,
)


@contextlib.contextmanager
def reporting_user_errors(forward_func: Callable[..., Any], prepared: PreparedInputs, who: str) -> Iterator[None]:
    """Re-raise an error from inside ``forward_func`` as the caller's own, when it is theirs.

    A wrong extra argument or tuple input fails deep inside the model; when
    ``forward_func`` raises on one image by itself too, that error is raised
    instead (with where it came from), so the message names the caller's
    mistake rather than a hook of ours.
    """
    try:
        yield
    except Exception as err:
        if isinstance(err, UnsupportedModelError) or not raised_in_forward(err):
            raise
        own = user_error_or_none(forward_func, prepared, who)
        if own is None:
            raise
        raise own from own.__cause__


def cast_floats(value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors (alone or in a tuple) in ``dtype``; everything else as it is."""
    if isinstance(value, tuple):
        return tuple(cast_floats(v, dtype) for v in value)
    return value.to(dtype) if isinstance(value, Tensor) and value.is_floating_point() else value


class ViTAttribution:
    """Base of captum_vit's explainers that run one chunk of images at a time.

    Subclasses set `needs_gradients` and implement `chunk_maps`. A method
    whose rules need another precision than the model's overrides
    `precision_for` and `on_copy`: `attribute` then explains a copy of the
    model in that precision (`twin`), and the user's model is not touched.
    """

    #: the method differentiates the model (refused under ``torch.inference_mode``)
    needs_gradients = False
    #: in the refusal to copy a plain-function ``forward_func``: the option that avoids the copy
    copy_fallback = "a model in the precision the method computes in"

    def __init__(self, forward_func: Callable[..., Any], vit: Optional[nn.Module] = None) -> None:
        self.adapter: ViTAdapter = find_adapter(forward_func, None, vit)
        super().__init__(eager_forward_func(forward_func))  # the Captum base class that follows in the MRO

    @property
    def who(self) -> str:
        """The method's name in messages."""
        return type(self).__name__

    @property
    def multiplies_by_inputs(self) -> bool:
        return False

    def refuse_attention_refusal(self) -> None:
        """Refuse a model whose attention the method cannot read (windows, class attention, pooled grids)."""
        if isinstance(self.adapter, RefusesAttentionMethods):
            model = type(self.adapter.model).__name__
            raise UnsupportedModelError(f"{self.who} is not defined for {model}: {self.adapter.attention_refusal()}.")

    def explicit_views(self, indices: Sequence[int], purpose: str) -> List[BlockView]:
        """The views of blocks ``indices``, each with its attention's explicit form (`AttentionMath`), refused
        now rather than at the first call where one has none; ``purpose``: what the method reads it for."""
        views = [self.adapter.block_view(self.adapter.blocks[i]) for i in indices]
        for i, view in zip(indices, views):
            if view.math is None:
                raise UnsupportedModelError(
                    f"{type(view.attention_module).__name__} of {self.adapter.blocks_expression()}[{i}] has no "
                    f"explicit form in captum_vit, which {self.who} needs {purpose}. Use LayerReciproCAM (its "
                    "general path runs any attention module)."
                )
        return views

    def precision_for(self, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
        """The precision the maps are computed in, for a model in ``model_dtype`` on ``device`` (default: the
        model's own)."""
        return model_dtype

    def on_copy(self, forward_func: Callable[..., Any], vit: nn.Module, dtype: torch.dtype) -> "ViTAttribution":
        """This method, with its settings, on a copy of the model in ``dtype`` (with `precision_for`)."""
        raise NotImplementedError

    def twin(self, dtype: torch.dtype) -> Tuple[Any, nn.Module]:
        """A copy of ``forward_func`` (and of the ViT in it) in ``dtype``: ``(forward_func, vit)``.

        For methods whose rules need more precision than the model's own; the
        user's model is never touched. A plain-function ``forward_func``
        cannot be copied: the refusal names `copy_fallback`.
        """
        forward_func = self.forward_func  # type: ignore[attr-defined]
        owner = module_of(forward_func)
        if not isinstance(owner, nn.Module) or not any(m is self.adapter.model for m in owner.modules()):
            raise UnsupportedModelError(
                f"{self.who} computes its maps in {str(dtype).replace('torch.', '')} on a copy of the model, and "
                "forward_func is a plain function, which cannot be copied with the model. Pass the model (or a module "
                f"around it) as forward_func, or {self.copy_fallback}."
            )
        path = next(name for name, m in owner.named_modules() if m is self.adapter.model)
        copied = copy.deepcopy(owner).to(dtype)
        twin = copied if forward_func is owner else getattr(copied, forward_func.__name__)
        return twin, (copied.get_submodule(path) if path else copied)

    def chunk_maps(self, args: tuple, targets: Targets, rows: slice) -> Tensor:
        """Raw ``(n, k, ...)`` maps of the ``n`` images in ``rows`` (``k`` targets per image).

        Args:
            args: ``forward_func``'s arguments for these rows.
            targets: every image's targets; ``targets.resolve(logits, rows)``
                gives this chunk's ``(n, k)`` classes.
            rows: the chunk's rows of the whole batch.
        """
        raise NotImplementedError

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
            ``(B, 1, h, w)`` float32 maps on the patch grid, or ``(B, 1, H, W)``
            for a method that maps the input pixels (``(B, k, ...)`` for a
            2-D target).
        """
        prepared = prepare_inputs(inputs, additional_forward_args)  # bad input is refused here, first
        model_dtype = compute_dtype(self.adapter.model, prepared.images.device)
        dtype = self.precision_for(model_dtype, prepared.images.device)
        if dtype != model_dtype:
            copied = self.on_copy(*self.twin(dtype), dtype)
            return copied.attribute(cast_floats(inputs, dtype), target, cast_floats(additional_forward_args, dtype),
                                    normalize, batch_size)
        targets = prepare_targets(target, prepared.batch_size)
        check_batch_size(batch_size)
        with self.adapter.explaining():
            check_runtime(self.adapter, self.who, needs_gradients=self.needs_gradients)
            with reporting_user_errors(self.forward_func, prepared, self.who):  # type: ignore[attr-defined]
                chunks = [self.chunk_maps(self._chunk_args(prepared, rows), targets, rows)
                          for rows in row_chunks(prepared.batch_size, batch_size)]
        maps = output_maps(torch.cat(chunks), normalize, who=self.who, dtype=dtype)
        return prepared.format(maps)

    def _chunk_args(self, prepared: PreparedInputs, rows: slice) -> Tuple[Any, ...]:
        """``forward_func``'s arguments for ``rows``; for a gradient method, tensors made under
        ``torch.inference_mode`` are cloned, since they cannot enter an autograd graph."""
        args = prepared.forward_args(rows)
        if not self.needs_gradients:
            return args
        return tuple(a.clone() if isinstance(a, Tensor) and a.is_inference() else a for a in args)
