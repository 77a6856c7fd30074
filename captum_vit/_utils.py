"""Plumbing shared by every explainer: input checks, targets, chunking, hooks.

Nothing here knows what a ViT is (that is `captum_vit.adapters`); this module
knows Captum's conventions (tensor or tuple inputs, target forms) and how
``captum_vit`` answers bad input.
"""

from __future__ import annotations

import contextlib
import operator
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ._scope import scoped

TensorOrTuple = Union[Tensor, Tuple[Tensor, ...]]

#: ``target`` value understood internally as "every class" (see
#: ``attribute_all_classes``); not part of Captum's target forms.
ALL_CLASSES = "all"


@dataclass
class PreparedInputs:
    """Validated inputs of one ``attribute`` call.

    The rule for extra arguments (Captum's): a tensor among the inputs or
    ``additional_forward_args`` whose first dimension equals the batch size
    ``B`` is one row per example, and is split with the images when they are
    explained in chunks; anything else is passed whole to every chunk.
    """

    inputs: Tuple[Tensor, ...]
    is_tuple: bool
    additional_forward_args: Tuple[Any, ...]
    #: extra arguments split by the rule that also look per channel (a ``(C,)`` vector with ``B == C``)
    ambiguous: Tuple[int, ...] = ()

    @property
    def images(self) -> Tensor:
        return self.inputs[0]

    @property
    def batch_size(self) -> int:
        return int(self.inputs[0].shape[0])

    @property
    def has_per_example_extras(self) -> bool:
        """Whether a tensor besides the images is split with them (first dimension ``B``)."""
        return any(_per_example(a, self.batch_size) for a in (*self.inputs[1:], *self.additional_forward_args))

    def forward_args(self, rows: Optional[slice] = None) -> Tuple[Any, ...]:
        """Positional arguments for ``forward_func`` for the examples ``rows``."""
        B = self.batch_size
        if rows is None or (rows.start in (0, None) and rows.stop >= B):
            return (*self.inputs, *self.additional_forward_args)
        if self.ambiguous:
            warn_caller(
                f"additional_forward_args[{self.ambiguous[0]}] has shape ({B},): one value per example by the "
                "splitting rule (its length is the batch size), but also one per colour channel. It is split with "
                "the images, a slice per chunk. If it is per channel, bind it inside forward_func (a module "
                "attribute or functools.partial) instead."
            )
            self.ambiguous = ()  # said once per call
        sliced = tuple(_take_rows(t, rows, B) for t in self.inputs)
        extra = tuple(_take_rows(a, rows, B) for a in self.additional_forward_args)
        return (*sliced, *extra)

    def format(self, result: Tensor) -> TensorOrTuple:
        return (result,) if self.is_tuple else result


def module_of(forward_func: Any) -> Optional[nn.Module]:
    """The module behind ``forward_func``: itself, the module a bound method belongs to, or ``None``."""
    owner = forward_func if isinstance(forward_func, nn.Module) else getattr(forward_func, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def _per_example(value: Any, batch: int) -> bool:
    return isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch


def _take_rows(value: Any, rows: slice, batch: int) -> Any:
    return value[rows] if _per_example(value, batch) else value


def _check_tensor_data(t: Tensor, what: str) -> None:
    if t.is_meta:
        raise ValueError(
            f"{what} is on the meta device, which holds shapes but no values; explain real tensors "
            "(load the data, or .to('cpu')) on the model's device."
        )
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise ValueError(f"{what} contains NaN or infinite values; clean it (e.g. torch.nan_to_num) before explaining.")


def prepare_inputs(inputs: Any, additional_forward_args: Any = None) -> PreparedInputs:
    """Check Captum-style ``inputs`` of an image explainer.

    ``inputs`` is a ``(B, C, H, W)`` tensor or a tuple whose first element is
    one; further tuple elements and ``additional_forward_args`` are passed to
    ``forward_func`` (tensors with ``B`` rows are chunked with the images;
    see `PreparedInputs`).
    """
    is_tuple = isinstance(inputs, tuple)
    tensors = inputs if is_tuple else (inputs,)
    if len(tensors) == 0 or not all(isinstance(t, Tensor) for t in tensors):
        raise TypeError(
            "inputs must be a (B, C, H, W) image tensor or a tuple of tensors whose first element "
            f"is one; got {type(inputs).__name__}."
        )
    images = tensors[0]
    if images.dim() != 4:
        raise ValueError(
            f"inputs must be a batch of images of shape (B, C, H, W); got shape {tuple(images.shape)}. "
            "Add a batch dimension with images.unsqueeze(0) for a single image."
        )
    if images.shape[0] == 0:
        raise ValueError("inputs is an empty batch (B = 0); pass at least one image.")
    if not images.is_floating_point():
        raise TypeError(
            f"inputs must be floating point (got {images.dtype}); convert and normalise images "
            "as the model expects, e.g. images.float() / 255 followed by its normalisation."
        )
    for i, t in enumerate(tensors):
        _check_tensor_data(t, "inputs" if i == 0 else f"inputs[{i}]")
    if additional_forward_args is None:
        extra: Tuple[Any, ...] = ()
    elif isinstance(additional_forward_args, tuple):
        extra = additional_forward_args
    else:
        extra = (additional_forward_args,)
    for i, a in enumerate(extra):
        if isinstance(a, Tensor):
            _check_tensor_data(a, f"additional_forward_args[{i}]")
    B, C = images.shape[:2]
    ambiguous = tuple(i for i, a in enumerate(extra) if isinstance(a, Tensor) and a.dim() == 1 and len(a) == B == C)
    return PreparedInputs(tuple(tensors), is_tuple, extra, ambiguous)


def check_batch_size(batch_size: Optional[int], name: str = "batch_size") -> None:
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise ValueError(f"{name} must be a positive integer or None; got {batch_size!r}.")


def check_choice(value: Any, name: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")


@dataclass
class Targets:
    """Targets of one call, as a ``(B, k)`` index tensor (or ``None``).

    ``None`` means "the predicted class", resolved once logits exist.
    ``several`` is True when the user asked for ``k`` maps per example (a 2-D
    target or every class); the output then has ``k`` channels, else 1.
    """

    index: Optional[Tensor]
    several: bool
    all_classes: bool = False

    def resolve(self, logits: Tensor, rows: Optional[slice] = None) -> Tensor:
        """The ``(n, k)`` targets of examples ``rows``, given their ``(n, C)`` logits; checked."""
        B, C = logits.shape
        if self.all_classes:
            return torch.arange(C, device=logits.device).expand(B, C)
        if self.index is None:
            return logits.argmax(dim=1, keepdim=True)
        index = self.index if rows is None else self.index[rows]
        index = index.to(logits.device)
        if index.shape[0] != B:
            raise ValueError(f"target has {index.shape[0]} rows but the model returned {B} outputs.")
        bad = (index < 0) | (index >= C)
        if bad.any():
            raise ValueError(
                f"target {index[bad][0].item()} is out of range: the model has {C} classes, "
                f"so targets must lie in [0, {C - 1}]."
            )
        return index


def prepare_targets(target: Any, batch_size: int) -> Targets:
    """Normalise Captum's classifier target forms.

    Accepted: ``None`` (predicted class), an ``int`` (same class for every
    example), a list of ``B`` ints, a 0-D or 1-D tensor of length 1 or ``B``
    (one target per example), a ``(B, k)`` tensor or list of ``B`` lists
    (``k`` maps per example), or `ALL_CLASSES`.
    """
    if target is None:
        return Targets(None, several=False)
    if isinstance(target, str):
        if target == ALL_CLASSES:
            return Targets(None, several=True, all_classes=True)
        raise ValueError(f"target must be a class index, a list or tensor of them, or None; got {target!r}.")
    if isinstance(target, tuple):
        raise TypeError(
            "tuple targets index multi-dimensional outputs in Captum; a classifier needs an int, "
            "a list of B ints, or a tensor of shape (B,) or (B, k)."
        )
    if isinstance(target, bool) or (isinstance(target, float)):
        raise TypeError(f"target must be an integer class index; got {target!r}.")
    if not isinstance(target, (int, Tensor)) and hasattr(target, "__index__") and not hasattr(target, "shape"):
        target = operator.index(target)  # e.g. a numpy integer scalar
    elif not isinstance(target, (Tensor, list)) and hasattr(target, "__array__"):
        target = _array_target(target)
    if isinstance(target, int):
        _check_int64(target)
        return Targets(torch.full((batch_size, 1), target, dtype=torch.long), several=False)
    return _tensor_targets(_list_target(target) if isinstance(target, list) else target, batch_size)


def _list_target(target: list) -> Tensor:
    if not all(isinstance(t, (int, list, Tensor)) or hasattr(t, "__index__") for t in target) or any(
        isinstance(t, bool) for t in target
    ):
        raise TypeError("a list target must hold one class index (or a list of them) per example.")
    for t in _flatten(target):
        _check_int64(t)
    try:
        return torch.as_tensor(target)
    except (ValueError, TypeError, RuntimeError) as err:
        raise ValueError(f"could not read the list target as a (B,) or (B, k) index: {err}") from None


def _tensor_targets(target: Any, batch_size: int) -> Targets:
    """A tensor target of one of the accepted shapes, checked against the batch."""
    if not isinstance(target, Tensor):
        raise TypeError(f"unsupported target type {type(target).__name__}; use an int, a list or a tensor.")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices; got dtype {target.dtype}.")
    if target.is_meta:
        raise ValueError("target is on the meta device, which holds no values; give the class indices themselves.")
    target = target.long().cpu()
    if target.dim() == 0 or (target.dim() == 1 and target.numel() == 1):
        return Targets(target.reshape(1, 1).expand(batch_size, 1).clone(), several=False)
    if target.dim() == 1:
        if target.numel() != batch_size:
            raise ValueError(
                f"target has {target.numel()} entries but inputs hold {batch_size} examples; "
                "give one target per example, or a single int for all."
            )
        return Targets(target[:, None], several=False)
    if target.dim() == 2:
        if target.shape[1] == 0:
            raise ValueError(f"a 2-D target needs at least one class per example; got shape {tuple(target.shape)}.")
        if target.shape[0] != batch_size:
            raise ValueError(
                f"a 2-D target must have one row per example ({batch_size}); got shape {tuple(target.shape)}."
            )
        return Targets(target, several=True)
    raise ValueError(f"target must be 0-, 1- or 2-D; got shape {tuple(target.shape)}.")


def _check_int64(value: Any) -> None:
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        raise ValueError(f"target {value} is out of range: it is not a class index of any model.")


def _flatten(values: Any) -> Iterator[Any]:
    for v in values:
        if isinstance(v, list):
            yield from _flatten(v)
        else:
            yield v


def _array_target(target: Any) -> Tensor:
    import numpy as np

    array = np.asarray(target)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"target must hold integer class indices; got an array of {array.dtype}.")
    return torch.from_numpy(array.astype(np.int64))


def minmax_normalize(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Scale each ``(h, w)`` map of a ``(B, k, h, w)`` tensor to ``[0, 1]``.

    ``(s - min) / (max - min + eps)`` per image and per map (docs/methods.md 1.5).
    A constant map becomes all zeros.
    """
    flat = maps.flatten(2)
    lo = flat.min(dim=2, keepdim=True).values
    hi = flat.max(dim=2, keepdim=True).values
    return ((flat - lo) / (hi - lo + eps)).view_as(maps)


def flat_threshold(dtype: torch.dtype = torch.float32) -> float:
    """The relative range under which a map computed in ``dtype`` is flat.

    Ten times `agreement_tolerance`, the rounding by which two exact
    computations of the same map may differ: a map whose values span less than
    that share of their magnitude has a min-max picture of rounding noise
    (1e-3 in float32, 0.3 in float16 and bfloat16).
    """
    return 10 * agreement_tolerance(dtype)


def flat_maps(maps: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(B, k)`` bool: which raw ``(B, k, h, w)`` maps computed in ``dtype`` are flat (`flat_threshold`)."""
    flat = maps.detach().float().flatten(2)
    lo, hi = flat.min(dim=2).values, flat.max(dim=2).values
    return (hi - lo) <= flat_threshold(dtype) * torch.maximum(lo.abs(), hi.abs())


def output_maps(
    maps: Tensor, normalize: bool, *, who: str, dtype: torch.dtype = torch.float32, hint: str = ""
) -> Tensor:
    """Final ``(B, k, h, w)`` float maps (``k = 1`` for one target per example), flat ones said in a warning.

    Args:
        maps: raw maps; ``dtype``: the precision they were computed in;
        who: the method, for the warning; hint: what may give a map that is not flat.
    """
    maps = maps.float()
    flat = flat_maps(maps, dtype)
    if flat.any():
        first = maps.flatten(2)[flat][0]
        warn_caller(
            f"{who}: {int(flat.sum())} of {flat.numel()} maps are flat: their raw values span less than "
            f"{flat_threshold(dtype):.0e} of their magnitude (e.g. {float(first.min()):.7g} .. "
            f"{float(first.max()):.7g}), within what {str(dtype).replace('torch.', '')} rounding can produce, so "
            "their [0, 1] scaling shows noise. Near-constant scores do this (a saturated or near-uniform softmax, "
            f"untrained weights){hint}; normalize=False returns the raw values."
        )
    return minmax_normalize(maps) if normalize else maps


@contextlib.contextmanager
def calling_forward_func() -> Iterator[None]:
    """Mark exceptions raised inside a call of ``forward_func`` (see `user_error_or_none`)."""
    try:
        yield
    except Exception as err:
        err.captum_vit_in_forward = True  # type: ignore[attr-defined]
        raise


def raised_in_forward(err: BaseException) -> bool:
    return bool(getattr(err, "captum_vit_in_forward", False))


def user_error_or_none(forward_func: Callable[..., Any], prepared: PreparedInputs, who: str) -> Optional[Exception]:
    """After an explanation failed: the error ``forward_func`` raises on one image by itself, reworded, or ``None``.

    A wrong extra argument or tuple input fails deep inside the model; said as
    the caller's own error (the plain call fails too), it points at the call.
    Only for exceptions raised inside ``forward_func`` (`raised_in_forward`).
    """
    try:
        with torch.no_grad():
            forward_func(*prepared.forward_args(slice(0, 1)))
    except Exception as own:  # noqa: BLE001 - reworded and chained, never swallowed
        message = (
            f"forward_func fails on these inputs by itself, before {who} changes anything "
            f"({type(own).__name__}: {str(own).strip().splitlines()[0] if str(own).strip() else ''}). It is called as "
            "forward_func(*inputs, *additional_forward_args): check the inputs tuple and additional_forward_args "
            "against what it takes."
        )
        try:
            error = type(own)(message)
        except Exception:  # noqa: BLE001 - an exception type that takes other arguments: keep it as it is
            return own
        error.__cause__ = own
        return error
    return None


def warn_caller(message: str, category: type = UserWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside captum_vit and Captum (the user's call)."""
    import sys

    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in ("captum_vit", "captum"):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)


def compute_dtype(model: nn.Module, device: torch.device) -> torch.dtype:
    """The precision ``model`` computes in on ``device``: autocast's, else its parameters'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    param = next(model.parameters(), None)
    return param.dtype if param is not None and param.is_floating_point() else torch.float32


class HookSet(contextlib.AbstractContextManager):
    """Hooks registered for one call and removed when it ends, even on error.

    Every hook is scoped (`captum_vit._scope.scoped`): it acts only on
    forward passes of the explanation that registered it, so a forward in
    another thread meanwhile is untouched. Register inside
    ``adapter.explaining()``.
    """

    def __init__(self) -> None:
        self.handles: List[RemovableHandle] = []

    def add(self, handle: RemovableHandle) -> RemovableHandle:
        self.handles.append(handle)
        return handle

    def forward_hook(self, module: nn.Module, hook: Callable[..., Any], with_kwargs: bool = False) -> RemovableHandle:
        return self.add(module.register_forward_hook(scoped(hook), with_kwargs=with_kwargs))

    def forward_pre_hook(
        self, module: nn.Module, hook: Callable[..., Any], with_kwargs: bool = False
    ) -> RemovableHandle:
        return self.add(module.register_forward_pre_hook(scoped(hook), with_kwargs=with_kwargs))

    def __exit__(self, *exc: Any) -> None:
        while self.handles:
            self.handles.pop().remove()


def row_chunks(total: int, size: Optional[int]) -> Iterator[slice]:
    """Consecutive slices of at most ``size`` rows (one slice if ``size`` is None)."""
    step = total if size is None else max(1, size)
    for start in range(0, total, step):
        yield slice(start, min(start + step, total))


def forward_logits(forward_func: Callable[..., Any], args: Tuple[Any, ...]) -> Tensor:
    """Call ``forward_func`` and check it returned ``(N, C)`` classifier logits."""
    out = forward_func(*args)
    if not isinstance(out, Tensor) and hasattr(out, "logits"):  # transformers' ModelOutput
        out = out.logits
    elif isinstance(out, (tuple, list)):
        tensors = [t for t in out if isinstance(t, Tensor)]
        if len(out) == 1 and tensors:
            out = tensors[0]
        elif tensors:
            raise ValueError(
                f"forward_func returned {len(out)} outputs, not one logits tensor; which to explain is "
                "ambiguous. A distilled DeiT returns (class, distillation) logits in distilled-training mode: "
                "call model.eval(). Otherwise wrap forward_func to return the logits to explain."
            )
    if not isinstance(out, Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"forward_func must return classifier logits of shape (N, num_classes); got {shape}."
        )
    return out


def relative_error(value: Tensor, reference: Tensor) -> float:
    """``||value - reference|| / ||reference||`` in float32 (inf if ``value`` is not finite)."""
    value, reference = value.detach().float(), reference.detach().float()
    if not torch.isfinite(value).all():
        return float("inf")
    return ((value - reference).norm() / reference.norm().clamp_min(1e-12)).item()


def agreement_tolerance(*dtypes: torch.dtype) -> float:
    """How closely two computations of the same function must agree in these dtypes."""
    return 1e-4 if all(d in (torch.float32, torch.float64) for d in dtypes) else 3e-2



