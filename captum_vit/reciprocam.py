"""ViT-ReciproCAM as a Captum layer attribution."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from captum.attr import LayerAttribution, PerturbationAttribution
from captum.log import log_usage
from torch import Tensor, nn

from ._utils import (
    ALL_CLASSES,
    HookSet,
    PreparedInputs,
    Targets,
    TensorOrTuple,
    agreement_tolerance,
    check_batch_size,
    check_choice,
    forward_logits,
    output_maps,
    prepare_inputs,
    prepare_targets,
    relative_error,
    row_chunks,
)
from .adapters import (
    HEAD_PREFIX_ONLY,
    HEAD_UNKNOWN,
    BlockView,
    Call,
    UnsupportedModelError,
    ViTAdapter,
    check_runtime,
    eager_forward_func,
    find_adapter,
)

KERNELS = ("gaussian", "dirac")
SCORES = ("softmax", "logits")
PATHS = ("auto", "fast", "general")
RESIDUALS = ("normalized", "input")

#: The paper's 3x3 spatial kernel: binomial weights / 16, centre weight 0.25.
GAUSSIAN_3X3 = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16.0

#: Default chunk sizes, in masked copies per call of ``forward_func``. The
#: general path holds ``copies * T`` tokens through every later block; the
#: fast path holds ``copies * T * heads`` attention scores of the prefix rows.
_GENERAL_TOKEN_BUDGET = 2**16
_FAST_SCORE_BUDGET = 2**24


def reciprocal_masks(
    grid: Tuple[int, int],
    num_prefix_tokens: int,
    kernel: str = "gaussian",
    keep_prefix_tokens: bool = True,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The ``(h*w, P + h*w)`` token masks of ViT-ReciproCAM (docs/methods.md 1.2).

    Row ``k = i*w + j`` is the mask of grid cell ``(i, j)``: the 3x3 binomial
    kernel centred there, cropped at the border and not renormalised
    (``"gaussian"``), or a one at the cell (``"dirac"``); prefix tokens get 1
    (``keep_prefix_tokens``) or 0.
    """
    check_choice(kernel, "kernel", KERNELS)
    h, w = grid
    K = h * w
    spatial = torch.eye(K, device=device, dtype=torch.float32).view(K, 1, h, w)
    if kernel == "gaussian":
        weight = GAUSSIAN_3X3.to(device=device).view(1, 1, 3, 3)
        spatial = F.conv2d(spatial, weight, padding=1)  # zero padding crops at the border
    prefix = torch.full((K, num_prefix_tokens), 1.0 if keep_prefix_tokens else 0.0, device=device)
    return torch.cat([prefix, spatial.view(K, K)], dim=1).to(dtype)


class _StopForward(Exception):
    """Raised by a probe hook to end a forward pass early."""


@dataclass(frozen=True)
class CopySelection:
    """Which copies of each image one forward pass carries.

    ``unmasked``: the block's own output (used for the prediction) comes
    first; ``cells``: grid cells whose masked copies follow, in that order.
    """

    unmasked: bool
    cells: Tuple[int, ...]

    @property
    def count(self) -> int:
        return int(self.unmasked) + len(self.cells)


def plan_copies(
    num_images: int, num_cells: int, copies_per_call: int
) -> Iterator[Tuple[slice, CopySelection]]:
    """``(image rows, copies)`` per forward pass; every image's unmasked copy comes first.

    Whole images are grouped when their ``1 + num_cells`` copies fit, so
    every image runs the part of the model before the explained block once;
    an image whose copies do not fit is split into consecutive cell ranges,
    the first also carrying the unmasked copy.
    """
    per_image = num_cells + 1
    if copies_per_call >= per_image:
        for rows in row_chunks(num_images, copies_per_call // per_image):
            yield rows, CopySelection(True, tuple(range(num_cells)))
        return
    for b in range(num_images):
        for chunk in row_chunks(per_image, copies_per_call):  # copy j >= 1 is cell j - 1
            cells = tuple(range(max(chunk.start, 1) - 1, chunk.stop - 1))
            yield slice(b, b + 1), CopySelection(chunk.start == 0, cells)


class LayerReciproCAM(LayerAttribution, PerturbationAttribution):
    r"""ViT-ReciproCAM: gradient-free class activation maps for ViTs.

    Byun & Lee, "ViT-ReciproCAM: Gradient and Attention-Free Visual
    Explanations for Vision Transformer", arXiv 2310.02588.

    For the explained block :math:`L` with input :math:`X` and
    :math:`Z = \mathrm{norm1}(X)`, every patch cell :math:`k` of the
    :math:`h \times w` grid gets a token mask :math:`M_k` (a 3x3 binomial
    kernel around the cell, or a one-hot "dirac"; prefix tokens kept) and a
    masked copy :math:`Z_k = Z \odot M_k` that replaces the attention input.
    The residual is :math:`R_k = Z_k` (``residual="normalized"``, the
    authors' first code and the default) or :math:`R_k = X \odot M_k`
    (``residual="input"``, the authors' later OpenVINO XAI code):

    .. math::
        y_k = R_k + \mathrm{ls1}(\mathrm{attn}(Z_k)),\quad
        y_k \leftarrow y_k + \mathrm{ls2}(\mathrm{mlp}(\mathrm{norm2}(y_k))).

    The rest of the model runs on every copy, and the map of class :math:`c`
    at cell :math:`k` is :math:`\mathrm{softmax}(f(y_k))_c` (or the logit),
    min-max scaled per image and class. One pass scores every class, so maps
    for many targets cost no more than one (:meth:`attribute_all_classes`).

    Two exact ways to compute it:

    - the general path: a forward hook on ``layer`` replaces its output by
      the masked copies, run through everything after it in chunks of
      ``batch_size`` copies; it works for every supported family and block;
    - the fast path, when ``layer`` is the last block and the head reads only
      the prefix tokens: only the prefix rows of each copy matter, and since
      masks scale whole tokens, every token's key and value are projected
      once per mask value and shared by all copies. Each copy then costs its
      prefix queries' attention row and one MLP per prefix token: about one
      extra forward pass for all :math:`h w` copies.

    ``path="auto"`` (default) uses the fast path only where it is proven by
    behaviour: before its first use (and again whenever the explained block's
    modules or hooks change) it is compared with the general path on the
    unmasked and several masked copies of one image; if they differ, the
    general path is used and a warning says why.
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
            layer: the block to explain (any block of the model; the paper
                uses the last), e.g. ``model.blocks[-1]`` in timm.
            vit: the model holding ``layer``; needed only when
                ``forward_func`` is not a module that contains it.
            device_ids: accepted for Captum compatibility (DataParallel).
        """
        self.adapter: ViTAdapter = find_adapter(forward_func, layer, vit)
        forward_func = eager_forward_func(forward_func)
        LayerAttribution.__init__(self, forward_func, layer, device_ids)
        PerturbationAttribution.__init__(self, forward_func)
        self.block_index = self.adapter.block_index(layer)
        self.view: BlockView = self.adapter.block_view(layer)
        # behavioural verdicts on the fast path: (modules fingerprint, options) -> None (exact) or a reason
        self._fast_path_verdicts: Dict[Any, Optional[str]] = {}
        #: the path the last call took, ``"fast"`` or ``"general"`` (``None`` before any call)
        self.last_path: Optional[str] = None

    @property
    def multiplies_by_inputs(self) -> bool:
        return False

    def fast_path_unavailable_reason(self) -> Optional[str]:
        """Why the exact fast path cannot be used for this layer, or ``None``.

        ``None`` means the fast path applies by construction; it is still
        checked by behaviour before its first use.
        """
        if self.block_index != len(self.adapter.blocks) - 1:
            return f"the explained block is block {self.block_index}, not the last one"
        if self.adapter.head_reads not in (HEAD_PREFIX_ONLY, HEAD_UNKNOWN):
            return f"the head reads {self.adapter.head_reads}"
        if self.view.math is None:
            return f"{type(self.view.attention_module).__name__} has no explicit form in captum_vit"
        fingerprint = self._fingerprint()
        failed = [v for k, v in self._fast_path_verdicts.items() if k[0] == fingerprint and v]
        return failed[0] if failed else None

    @log_usage(part_of_slo=True)
    def attribute(
        self,
        inputs: TensorOrTuple,
        target: Any = None,
        additional_forward_args: Any = None,
        kernel: str = "gaussian",
        keep_prefix_tokens: bool = True,
        scores: str = "softmax",
        normalize: bool = True,
        batch_size: Optional[int] = None,
        path: str = "auto",
        residual: str = "normalized",
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
                ``None`` picks a bound from the token count. On the general
                path it is the copies per call of ``forward_func``; on the
                fast path the model runs once per image regardless, and
                ``batch_size`` bounds the copies' attention rows computed
                together inside the block.
            path: ``"auto"``, ``"fast"`` or ``"general"`` (see class doc).
            residual: ``"normalized"`` (the masked normalised input, default)
                or ``"input"`` (the masked block input) as the block's residual.

        Returns:
            ``(B, 1, h, w)`` maps on the patch grid (``(B, k, h, w)`` for a
            2-D target), float32. Upsample with
            ``LayerAttribution.interpolate(maps, images.shape[-2:], "bilinear")``.
        """
        prepared = prepare_inputs(inputs, additional_forward_args)
        targets = prepare_targets(target, prepared.batch_size)
        options = _Options(kernel, keep_prefix_tokens, scores, batch_size, path, residual)
        return prepared.format(output_maps(self._maps(prepared, targets, options), normalize))

    def attribute_all_classes(
        self, inputs: TensorOrTuple, additional_forward_args: Any = None, **kwargs: Any
    ) -> TensorOrTuple:
        """Maps of every class from one pass: ``(B, num_classes, h, w)``.

        Takes the keyword arguments of :meth:`attribute` except ``target``.
        """
        prepared = prepare_inputs(inputs, additional_forward_args)
        normalize = kwargs.pop("normalize", True)
        unknown = set(kwargs) - set(_Options.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unexpected keyword arguments: {', '.join(sorted(unknown))}")
        maps = self._maps(prepared, prepare_targets(ALL_CLASSES, prepared.batch_size), _Options(**kwargs))
        return prepared.format(output_maps(maps, normalize))

    # -- the engine ---------------------------------------------------------
    def _maps(self, prepared: PreparedInputs, targets: Targets, options: "_Options") -> Tensor:
        options.check()
        with torch.no_grad(), self.adapter.explaining():  # the block's hooks are only ours from here on
            check_runtime(self.adapter, "ViT-ReciproCAM", needs_gradients=False)
            _refuse_user_block_hooks(self.layer, self.adapter, self.block_index)
            grid = self._probe_grid(prepared)
            fast = self._choose_path(prepared, grid, options)
            maps = self._run(prepared, targets, grid, options, fast)
            self.last_path = "fast" if fast else "general"
        return maps

    def _choose_path(self, prepared: PreparedInputs, grid: Tuple[int, int], options: "_Options") -> bool:
        if options.path == "general":
            return False
        reason = self.fast_path_unavailable_reason()
        if reason is None:
            fingerprint = self._fingerprint()
            key = (fingerprint, options.kernel, options.keep_prefix_tokens, options.residual)
            if any(k[0] != fingerprint for k in self._fast_path_verdicts):  # the block changed: old proofs lapse
                self._fast_path_verdicts.clear()
            if key not in self._fast_path_verdicts:
                self._fast_path_verdicts[key] = self._verify_fast_path(prepared, grid, options)
                if self._fast_path_verdicts[key] is not None and options.path == "auto":
                    warnings.warn(
                        f"ReciproCAM fast path not used: {self._fast_path_verdicts[key]}; the exact general path "
                        "runs instead (slower).",
                        stacklevel=4,
                    )
            reason = self._fast_path_verdicts[key]
        if reason is not None and options.path == "fast":
            raise ValueError(f"path='fast' is not exact here: {reason}. Use path='auto' or 'general'.")
        return reason is None

    def _fingerprint(self) -> Tuple[Any, ...]:
        """What the fast path's proof depends on: the block's modules, their forwards and hooks."""
        return tuple(
            (id(m), type(m), m.__dict__.get("forward"), tuple(m._forward_hooks), tuple(m._forward_pre_hooks))
            for m in self.layer.modules()
        ) + (self.adapter.head_reads,)

    def _verify_fast_path(self, prepared: PreparedInputs, grid: Tuple[int, int], options: "_Options") -> Optional[str]:
        """Compare fast and general path on the unmasked and a few masked copies of one image.

        An exception on the general path is the caller's (bad arguments, a
        failing ``forward_func``) and propagates without a verdict; one on the
        fast path only, or any difference, is a reason not to use it.
        """
        K = grid[0] * grid[1]
        cells = tuple(sorted({0, K // 3, (2 * K) // 3, K - 1}))
        copies = CopySelection(True, cells)
        args = prepared.forward_args(slice(0, 1))
        general = self._forward_copies(args, copies, options, fast=False)
        try:
            fast = self._forward_copies(args, copies, options, fast=True)
        except Exception as err:  # noqa: BLE001 - the reason to fall back, reported in the warning
            return f"forward_func fails on the prefix rows alone, so it reads patch tokens after the block ({err})"
        tolerance = agreement_tolerance(fast.dtype, general.dtype)
        err = relative_error(fast, general)
        if err <= tolerance:
            return None
        if relative_error(fast[:1], general[:1]) > tolerance:  # the unmasked copy differs only by the patch rows
            return f"forward_func's output depends on patch tokens after the explained block (difference {err:.2e})"
        return (
            f"it differs from the general path by {err:.2e} (relative) on masked copies"
            f"{_likely_cause(self.view, self.adapter)}"
        )

    def _probe_grid(self, prepared: PreparedInputs) -> Tuple[int, int]:
        """The patch grid for these inputs, from a forward stopped at the image entry."""

        def stop(module: nn.Module, args: Tuple[Any, ...]) -> None:
            raise _StopForward

        with self.adapter.recording_image_size() as recorder, HookSet() as hooks:
            hooks.forward_pre_hook(self.adapter.image_module, stop)
            try:
                self.forward_func(*prepared.forward_args(slice(0, 1)))
            except _StopForward:
                pass
        if recorder.image_hw is None:
            raise RuntimeError("forward_func never ran the model's patch embedding; is it the right model?")
        return self.adapter.grid_for(recorder.image_hw)

    def _forward_copies(
        self, args: Tuple[Any, ...], copies: CopySelection, options: "_Options", fast: bool
    ) -> Tensor:
        """``(n * copies.count, C)`` logits of one forward pass carrying ``copies`` of each image."""
        hook = _MaskedCopies(self.adapter, self.view, options, fast)
        hook.copies = copies
        with self.adapter.recording_image_size() as recorder, HookSet() as hooks:
            hook.recorder = recorder
            hooks.forward_hook(self.layer, hook, with_kwargs=True)
            logits = forward_logits(self.forward_func, args)
        n = hook.images_seen
        if logits.shape[0] != n * copies.count:
            raise RuntimeError(
                f"forward_func returned {logits.shape[0]} rows for {n} images x {copies.count} copies: "
                "it must return one row of logits per row of the explained block's output, and run the model in the "
                "thread that calls attribute (nn.DataParallel over several GPUs does not)."
            )
        return logits

    def _run(
        self, prepared: PreparedInputs, targets: Targets, grid: Tuple[int, int], options: "_Options", fast: bool
    ) -> Tensor:
        B, K = prepared.batch_size, grid[0] * grid[1]
        if fast:
            # whole images per pass, so the model before the block runs once per image; batch_size
            # bounds the copies computed at once inside the hook instead
            per_call = max(K + 1, self._default_batch_size(K, fast))
        else:
            per_call = options.batch_size or self._default_batch_size(K, fast)
        result: Optional[Tensor] = None
        chosen_all: Optional[Tensor] = None
        for rows, copies in plan_copies(B, K, per_call):
            n = rows.stop - rows.start
            logits = self._forward_copies(prepared.forward_args(rows), copies, options, fast)
            logits = logits.view(n, copies.count, -1).float()
            if copies.unmasked:
                chosen = targets.resolve(logits[:, 0], rows)
                if chosen_all is None:
                    chosen_all = torch.empty(B, chosen.shape[1], dtype=torch.long, device=logits.device)
                    result = torch.empty(B, K, chosen.shape[1], dtype=torch.float32, device=logits.device)
                chosen_all[rows] = chosen
                logits = logits[:, 1:]
            assert result is not None and chosen_all is not None
            values = logits.softmax(-1) if options.scores == "softmax" else logits
            if copies.cells:
                index = chosen_all[rows][:, None, :].expand(n, len(copies.cells), -1)
                result[rows, copies.cells[0] : copies.cells[-1] + 1] = values.gather(2, index)
        assert result is not None
        return result.permute(0, 2, 1).reshape(B, -1, *grid)

    def _default_batch_size(self, num_cells: int, fast: bool) -> int:
        T = self.adapter.num_prefix_tokens + num_cells
        if fast:
            heads = self.view.math.num_heads if self.view.math is not None else 1
            return max(1, _FAST_SCORE_BUDGET // (T * heads * self.adapter.num_prefix_tokens))
        return max(1, _GENERAL_TOKEN_BUDGET // T)


@dataclass
class _Options:
    """The options of one ``attribute`` call, checked together."""

    kernel: str = "gaussian"
    keep_prefix_tokens: bool = True
    scores: str = "softmax"
    batch_size: Optional[int] = None
    path: str = "auto"
    residual: str = "normalized"

    def check(self) -> None:
        check_choice(self.kernel, "kernel", KERNELS)
        check_choice(self.scores, "scores", SCORES)
        check_choice(self.path, "path", PATHS)
        check_choice(self.residual, "residual", RESIDUALS)
        check_batch_size(self.batch_size)
        if not isinstance(self.keep_prefix_tokens, bool):
            raise TypeError(f"keep_prefix_tokens must be True or False; got {self.keep_prefix_tokens!r}.")


def _refuse_user_block_hooks(layer: nn.Module, adapter: ViTAdapter, index: int) -> None:
    if layer._forward_hooks:
        raise UnsupportedModelError(
            f"{adapter.blocks_expression()}[{index}] has {len(layer._forward_hooks)} forward hook(s) of its own; "
            "ReciproCAM replaces that block's output with masked copies and cannot apply them to the copies. "
            "Remove the hooks while explaining (forward pre-hooks and hooks on its sub-modules are fine)."
        )


def _likely_cause(view: BlockView, adapter: ViTAdapter) -> str:
    attn = view.attention_module
    causes = []
    if attn._forward_hooks or attn._forward_pre_hooks:
        causes.append("a forward hook on the attention module")
    if "forward" in attn.__dict__:
        causes.append("a patched attention forward")
    if adapter.head_reads == HEAD_UNKNOWN:
        causes.append("a head outside the model that reads patch tokens")
    if not causes:
        causes.append("a projection or attention variant that is not per-token")
    return "; likely " + " or ".join(causes)


class _MaskedCopies:
    """Forward hook on the explained block: replaces its output by masked copies.

    For a pass carrying :class:`CopySelection` ``copies`` it returns, per
    image, the block's own output (if ``copies.unmasked``) and the masked
    copies of ``copies.cells``: full sequences on the general path, only the
    prefix rows on the fast path.
    """

    def __init__(self, adapter: ViTAdapter, view: BlockView, options: _Options, fast: bool) -> None:
        self.adapter = adapter
        self.view = view
        self.options = options
        self.fast = fast
        self.copies = CopySelection(True, ())
        self.recorder: Any = None
        self.images_seen = 0

    def masks(self, grid: Tuple[int, int], P: int, like: Tensor) -> Tensor:
        return reciprocal_masks(grid, P, self.options.kernel, self.options.keep_prefix_tokens, like.device, like.dtype)

    def __call__(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any) -> Any:
        x, call = self.view.read_call(args, kwargs)
        out = self.view.unwrap_output(output)
        attention_call = self.view.attention_call(call)
        if self.view.math is not None:
            self.view.math.check_call(attention_call)
        n, T, D = x.shape
        self.images_seen = n
        P, grid = self.adapter.tokens_layout(T, self.recorder.image_hw)
        parts = []
        if self.copies.unmasked:
            if not self.fast and not module.training:
                _check_block_wiring(self.view, x, call, out)
            parts.append((out[:, :P] if self.fast else out)[:, None])
        if self.copies.cells:
            masks = self.masks(grid, P, x)[list(self.copies.cells)]  # (c, T)
            z = self.view.norm1(x)
            source = z if self.options.residual == "normalized" else x
            if self.fast:
                chunk = max(1, self.options.batch_size // n) if self.options.batch_size else None
                parts.append(_fast_prefix_rows(self.view, z, source, masks, P, attention_call, chunk))
            else:
                zk = (z[:, None] * masks[None, :, :, None]).reshape(-1, T, D)
                rk = zk if source is z else (source[:, None] * masks[None, :, :, None]).reshape(-1, T, D)
                parts.append(self.view.forward(zk, rk, call).view(n, -1, T, D))
        copies = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return self.view.wrap_output(output, copies.reshape(-1, *copies.shape[2:]))


def _check_block_wiring(view: BlockView, x: Tensor, call: Call, output: Tensor) -> None:
    err = relative_error(view.forward(view.norm1(x), x, call), output)
    if err > agreement_tolerance(x.dtype):
        raise UnsupportedModelError(
            f"{type(view.block).__name__}.forward is not the pre-norm block that ReciproCAM re-runs "
            f"(x + ls1(attn(norm1(x))), then + ls2(mlp(norm2(.)))): relative difference {err:.2e}. "
            "A patched forward or a different wiring cannot be explained exactly."
        )


def _fast_prefix_rows(
    view: BlockView,
    z: Tensor,
    source: Tensor,
    masks: Tensor,
    P: int,
    call: Call,
    chunk: Optional[int] = None,
    keep_prefix: Optional[bool] = None,
) -> Tensor:
    """Prefix rows of the block output for each masked copy, exactly.

    Args:
        view: the last block.
        z: ``(n, T, D)`` normalised block input.
        source: what the residual masks: ``z`` or the block input ``x``.
        masks: ``(c, T)`` token masks of the copies.
        P: number of prefix tokens.
        chunk: copies whose attention rows are computed together (``None``: all).
        keep_prefix: whether the masks keep the prefix rows (``None``: read from ``masks``).

    Returns:
        ``(n, c, P, D)``: rows ``:P`` of ``view.forward(z * m, source * m)``;
        the attention rows come from :meth:`AttentionMath.prefix_rows`, the
        rest of the block acts on each token alone.
    """
    assert view.math is not None
    attention = view.math.prefix_rows(z, masks, P, call, chunk, keep_prefix)  # (n, c, P, D)
    n, c, _, D = attention.shape
    residual = (masks[0, :P, None] * source[:, :P])[:, None].expand(n, c, P, D)
    y = view.finish(residual.reshape(n * c, P, D), attention.reshape(n * c, P, D))
    return y.view(n, c, P, D)
