"""ViT-ReciproCAM as a Captum layer attribution."""

from __future__ import annotations

import warnings
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
    model_is_training,
    output_maps,
    prepare_inputs,
    prepare_targets,
    relative_error,
    row_chunks,
)
from ._vit import AttentionView, ViTStructure, block_forward, check_vit_block, prenorm_block_forward

KERNELS = ("gaussian", "dirac")
SCORES = ("softmax", "logits")
PATHS = ("auto", "fast", "general")

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
    """The ``(h*w, P + h*w)`` token masks of ViT-ReciproCAM (methods.md 1.2).

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


class LayerReciproCAM(LayerAttribution, PerturbationAttribution):
    r"""ViT-ReciproCAM: gradient-free class activation maps for ViTs.

    Byun & Lee, "ViT-ReciproCAM: Gradient and Attention-Free Visual
    Explanations for Vision Transformer", arXiv 2310.02588.

    For the explained block :math:`L` with input :math:`X` and
    :math:`Z = \mathrm{norm1}(X)`, every patch cell :math:`k` of the
    :math:`h \times w` grid gets a token mask :math:`M_k` (a 3x3 binomial
    kernel around the cell, or a one-hot "dirac"; prefix tokens kept) and a
    masked copy :math:`Z_k = Z \odot M_k` that replaces both the attention
    input and the residual of the block:

    .. math::
        y_k = Z_k + \mathrm{ls1}(\mathrm{attn}(Z_k)),\quad
        y_k \leftarrow y_k + \mathrm{ls2}(\mathrm{mlp}(\mathrm{norm2}(y_k))).

    The rest of the model runs on every copy, and the map of class :math:`c`
    at cell :math:`k` is :math:`\mathrm{softmax}(f(y_k))_c`, min-max scaled
    per image and class. One pass scores every class, so maps for many
    targets cost no more than one (:meth:`attribute_all_classes`).

    Two exact ways to compute it:

    - the general path: a forward hook on ``layer`` replaces its output by
      the masked copies, run through everything after it in chunks of
      ``batch_size`` copies;
    - the fast path, when ``layer`` is the last block and the head reads only
      the prefix tokens (timm ``global_pool="token"``, distilled DeiT): only
      the prefix rows of each copy matter, and since masks scale rows of
      linear maps one ``qkv`` projection of :math:`Z` serves every copy. Each
      copy then costs its prefix queries' attention row and one MLP per
      prefix token: about one extra forward pass for all :math:`h w` copies.

    ``path="auto"`` (default) takes the fast path where it is exact, checked
    once against a plain forward; the general path everywhere else.
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
                normalises or resizes, a function returning ``.logits``)
                mapping ``(B, C, H, W)`` inputs to ``(B, num_classes)`` logits.
            layer: the timm ViT block to explain (any of ``model.blocks``;
                the paper uses the last).
            vit: the timm ``VisionTransformer`` holding ``layer``; needed only
                when ``forward_func`` is not a module that contains it.
            device_ids: accepted for Captum compatibility (DataParallel).
        """
        check_vit_block(layer)
        LayerAttribution.__init__(self, forward_func, layer, device_ids)
        PerturbationAttribution.__init__(self, forward_func)
        self.structure = ViTStructure.find(forward_func, layer, vit)
        self.block_index = self.structure.block_index(layer)
        # "unverified" until one call has checked the fast path against a plain forward
        self._fast_path_state = "unverified"

    @property
    def multiplies_by_inputs(self) -> bool:
        return False

    def fast_path_unavailable_reason(self) -> Optional[str]:
        """Why the exact fast path cannot be used for this layer, or ``None``."""
        from timm.models.vision_transformer import Block

        if self.block_index != len(self.structure.blocks) - 1:
            return f"the explained block is block {self.block_index}, not the last one"
        if not self.structure.head_reads_prefix_only():
            pool = getattr(self.structure.model, "global_pool", None)
            return f"the head reads patch tokens (global_pool={pool!r} or a custom head)"
        if type(self.layer).forward is not Block.forward:
            return f"{type(self.layer).__name__} is not timm's standard Block"
        try:
            AttentionView(self.layer.attn)
        except TypeError as err:
            return str(err)
        return None

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
            batch_size: masked copies per call of ``forward_func`` (memory
                bound); ``None`` picks one from the token count.
            path: ``"auto"``, ``"fast"`` or ``"general"`` (see class doc).

        Returns:
            ``(B, 1, h, w)`` maps on the patch grid (``(B, k, h, w)`` for a
            2-D target), float32. Upsample with
            ``LayerAttribution.interpolate(maps, images.shape[-2:], "bilinear")``.
        """
        prepared = prepare_inputs(inputs, additional_forward_args)
        targets = prepare_targets(target, prepared.batch_size)
        maps = self._maps(prepared, targets, kernel, keep_prefix_tokens, scores, batch_size, path)
        return prepared.format(output_maps(maps, normalize))

    def attribute_all_classes(
        self, inputs: TensorOrTuple, additional_forward_args: Any = None, **kwargs: Any
    ) -> TensorOrTuple:
        """Maps of every class from one pass: ``(B, num_classes, h, w)``.

        Takes the keyword arguments of :meth:`attribute` except ``target``.
        """
        prepared = prepare_inputs(inputs, additional_forward_args)
        normalize = kwargs.pop("normalize", True)
        maps = self._maps(prepared, prepare_targets(ALL_CLASSES, prepared.batch_size), **_defaults(kwargs))
        return prepared.format(output_maps(maps, normalize))

    # -- the engine ---------------------------------------------------------
    def _maps(
        self,
        prepared: PreparedInputs,
        targets: Targets,
        kernel: str = "gaussian",
        keep_prefix_tokens: bool = True,
        scores: str = "softmax",
        batch_size: Optional[int] = None,
        path: str = "auto",
    ) -> Tensor:
        check_choice(kernel, "kernel", KERNELS)
        check_choice(scores, "scores", SCORES)
        check_choice(path, "path", PATHS)
        check_batch_size(batch_size)
        if model_is_training(self.structure.model):
            warnings.warn(
                "the model is in training mode: dropout makes ReciproCAM scores random. Call model.eval() first.",
                stacklevel=3,
            )
        use_fast = self._use_fast_path(path)
        with torch.no_grad():
            if use_fast and self._fast_path_state == "unverified":
                try:
                    result = self._run(prepared, targets, kernel, keep_prefix_tokens, scores, batch_size, True, True)
                except _FastPathMismatch as err:
                    if path == "fast":
                        raise ValueError(f"path='fast' is not exact for this forward_func: {err}") from None
                    warnings.warn(f"ReciproCAM fast path disabled for this explainer: {err}", stacklevel=3)
                    self._fast_path_state = "unusable"
                    use_fast = False
                else:
                    self._fast_path_state = "verified"
                    return result
            return self._run(prepared, targets, kernel, keep_prefix_tokens, scores, batch_size, use_fast, False)

    def _use_fast_path(self, path: str) -> bool:
        if path == "general":
            return False
        reason = self.fast_path_unavailable_reason()
        if reason is None and self._fast_path_state == "unusable":
            reason = "forward_func reads patch tokens after the explained block"
        if reason is not None and path == "fast":
            raise ValueError(f"path='fast' is not exact here: {reason}. Use path='auto' or 'general'.")
        return reason is None

    def _probe_grid(self, prepared: PreparedInputs) -> Tuple[int, int]:
        """The patch grid for these inputs, from a forward stopped at the patch embedding."""

        def stop(module: nn.Module, args: Tuple[Any, ...]) -> None:
            raise _StopForward

        with self.structure.recording_image_size() as recorder, HookSet() as hooks:
            hooks.add(self.structure.model.patch_embed.register_forward_pre_hook(stop))
            try:
                self.forward_func(*prepared.forward_args(slice(0, 1)))
            except _StopForward:
                pass
        if recorder.image_hw is None:
            raise RuntimeError("forward_func never ran the model's patch embedding; is it the right model?")
        return self.structure.grid_for(recorder.image_hw)

    def _run(
        self,
        prepared: PreparedInputs,
        targets: Targets,
        kernel: str,
        keep_prefix_tokens: bool,
        scores: str,
        batch_size: Optional[int],
        use_fast: bool,
        verify_fast: bool,
    ) -> Tensor:
        h, w = self._probe_grid(prepared)
        B, K = prepared.batch_size, h * w
        T = self.structure.num_prefix_tokens + K
        if batch_size is None:
            if use_fast:
                heads = AttentionView(self.layer.attn).num_heads
                batch_size = max(1, _FAST_SCORE_BUDGET // (T * heads * self.structure.num_prefix_tokens))
            else:
                batch_size = max(1, _GENERAL_TOKEN_BUDGET // T)
        reference = None
        if verify_fast:  # a plain forward to check that the head reads prefix rows only
            reference = forward_logits(self.forward_func, prepared.forward_args(slice(0, 1))).float()

        copies = _MaskedCopies(self.structure, self.layer, kernel, keep_prefix_tokens, use_fast)
        result: Optional[Tensor] = None
        resolved: Optional[Tensor] = None
        with self.structure.recording_image_size() as recorder, HookSet() as hooks:
            copies.recorder = recorder
            hooks.add(self.layer.register_forward_hook(copies, with_kwargs=True))
            for rows, c0, c1 in _plan(B, K + 1, batch_size):
                copies.copy_range = (c0, c1)
                logits = self._forward_copies(prepared.forward_args(rows), verify_fast and c0 == 0)
                n = rows.stop - rows.start
                if logits.shape[0] != n * (c1 - c0):
                    raise RuntimeError(
                        f"forward_func returned {logits.shape[0]} rows for {n} images x {c1 - c0} copies: "
                        "it must return one row of logits per row of the explained block's output."
                    )
                logits = logits.view(n, c1 - c0, -1)
                if c0 == 0:
                    if reference is not None:
                        _check_against_reference(logits[0, 0], reference[0])
                        reference = None
                    chosen = targets.resolve(logits[:, 0], rows)
                    if resolved is None:
                        resolved = torch.empty(B, chosen.shape[1], dtype=torch.long, device=logits.device)
                        result = torch.empty(B, K + 1, chosen.shape[1], dtype=torch.float32, device=logits.device)
                    resolved[rows] = chosen
                values = logits.float().softmax(-1) if scores == "softmax" else logits.float()
                index = resolved[rows][:, None, :].expand(n, c1 - c0, -1)
                result[rows, c0:c1] = values.gather(2, index)
        assert result is not None
        return result[:, 1:].permute(0, 2, 1).reshape(B, -1, h, w)


    def _forward_copies(self, args: Tuple[Any, ...], first_fast_call: bool) -> Tensor:
        if not first_fast_call:
            return forward_logits(self.forward_func, args)
        try:  # a head that needs patch tokens fails on the prefix-only sequence
            return forward_logits(self.forward_func, args)
        except Exception as err:  # noqa: BLE001 - re-raised as a reason to fall back
            raise _FastPathMismatch(f"forward_func failed on the prefix rows alone ({err})") from err


class _FastPathMismatch(RuntimeError):
    pass


def _check_against_reference(fast_row: Tensor, reference: Tensor) -> None:
    err = relative_error(fast_row, reference)
    if err > agreement_tolerance(fast_row.dtype, reference.dtype):
        raise _FastPathMismatch(
            "forward_func's output depends on patch tokens after the explained block "
            f"(relative difference {err:.2e} from a plain forward)"
        )


def _defaults(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    allowed = {"kernel", "keep_prefix_tokens", "scores", "batch_size", "path"}
    unknown = set(kwargs) - allowed
    if unknown:
        raise TypeError(f"unexpected keyword arguments: {', '.join(sorted(unknown))}")
    return kwargs


def _plan(num_images: int, copies_per_image: int, copies_per_call: int) -> Iterator[Tuple[slice, int, int]]:
    """``(image rows, first copy, end copy)`` per call; copy 0 is the unmasked output.

    Whole images are grouped when they fit, so every image runs the part of
    the model before the explained block once; an image whose copies do not
    fit is split into consecutive copy ranges, the first holding copy 0.
    """
    if copies_per_call >= copies_per_image:
        for rows in row_chunks(num_images, copies_per_call // copies_per_image):
            yield rows, 0, copies_per_image
    else:
        for b in range(num_images):
            for c in row_chunks(copies_per_image, copies_per_call):
                yield slice(b, b + 1), c.start, c.stop


class _MaskedCopies:
    """Forward hook on the explained block: replaces its output by masked copies.

    For a call covering copies ``[c0, c1)`` of each image it returns, per
    image, the block's own output (copy 0, used for the prediction) and the
    masked copies of cells ``c0-1 .. c1-2``: full sequences on the general
    path, only the prefix rows on the fast path.
    """

    def __init__(
        self, structure: ViTStructure, block: nn.Module, kernel: str, keep_prefix_tokens: bool, fast: bool
    ) -> None:
        self.structure = structure
        self.block = block
        self.kernel = kernel
        self.keep_prefix_tokens = keep_prefix_tokens
        self.fast = fast
        self.copy_range = (0, 0)
        self.recorder: Any = None
        self._masks: Dict[Any, Tensor] = {}

    def masks(self, grid: Tuple[int, int], P: int, like: Tensor) -> Tensor:
        key = (grid, P, like.device, like.dtype)
        if key not in self._masks:
            self._masks[key] = reciprocal_masks(grid, P, self.kernel, self.keep_prefix_tokens, like.device, like.dtype)
        return self._masks[key]

    def __call__(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Tensor) -> Tensor:
        if kwargs.get("attn_mask") is not None or kwargs.get("is_causal", False):
            raise NotImplementedError("LayerReciproCAM does not support blocks called with attention masks.")
        x = args[0] if args else kwargs["x"]
        n, T, D = x.shape
        P, grid = self.structure.tokens_layout(T, self.recorder.image_hw)
        c0, c1 = self.copy_range
        parts = []
        if c0 == 0:
            if not self.fast and not module.training:
                _check_prenorm_block(module, x, output)
            parts.append((output[:, :P] if self.fast else output)[:, None])
        if c1 > max(c0, 1):
            masks = self.masks(grid, P, x)[max(c0, 1) - 1 : c1 - 1]
            if self.fast:
                parts.append(_fast_prefix_rows(module, x, masks, P))
            else:
                z = module.norm1(x)
                zk = (z[:, None] * masks[None, :, :, None]).reshape(-1, T, D)
                parts.append(prenorm_block_forward(module, zk).view(n, -1, T, D))
        out = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return out.reshape(-1, *out.shape[2:])


def _check_prenorm_block(block: nn.Module, x: Tensor, output: Tensor) -> None:
    err = relative_error(block_forward(block, x), output)
    if err > agreement_tolerance(x.dtype):
        raise TypeError(
            f"{type(block).__name__}.forward is not the pre-norm ViT block that ReciproCAM re-runs "
            f"(x + ls1(attn(norm1(x))), then + ls2(mlp(norm2(x)))): relative difference {err:.2e}."
        )


def _fast_prefix_rows(block: nn.Module, x: Tensor, masks: Tensor, P: int) -> Tensor:
    """Prefix rows of the block output for each masked copy, exactly.

    Args:
        block: the last timm ``Block``.
        x: ``(n, T, D)`` block input.
        masks: ``(c, T)`` token masks of the copies.
        P: number of prefix tokens.

    Returns:
        ``(n, c, P, D)``: rows ``:P`` of ``prenorm_block_forward(block, Z * m)``.

    A mask scales rows of ``Z``, so for copy ``m`` the keys and values are
    ``m_t * (Z W)_t + b``. Without ``k_norm`` the prefix queries' scores are
    then ``m_t (q . U_t) + q . b``: one product serves every copy. With
    ``k_norm`` the keys are not linear in ``m_t``, but masks take few distinct
    values (0, 1/16, 1/8, 1/4, 1), so keys and scores are computed once per
    value and gathered per copy. The values need no trick:
    ``sum_t A_t (m_t U_t + b) = (A * m) @ U + b``.
    """
    att = AttentionView(block.attn)
    n, T, _ = x.shape
    c = masks.shape[0]
    z = block.norm1(x)
    uq, uk, uv = att.qkv_without_bias(z)  # (n, H, T, d) each
    bq, bk, bv = att.qkv_bias(z)  # (H, 1, d) each
    m_prefix = masks[0, :P]  # identical for every copy: all ones or all zeros
    q = att.module.q_norm(m_prefix[:, None] * uq[:, :, :P] + bq)  # (n, H, P, d)

    if isinstance(att.module.k_norm, nn.Identity):
        # keys are linear in the mask: S_t = scale * (m_t (q . U_t) + q . b)
        unmasked = (q * att.scale) @ uk.transpose(-2, -1)  # (n, H, P, T)
        offset = (q * att.scale) @ bk.transpose(-2, -1)  # (n, H, P, 1)
        scores = unmasked[:, :, :, None, :] * masks + offset[:, :, :, None, :]  # (n, H, P, c, T)
    else:
        levels, level_index = torch.unique(masks, return_inverse=True)  # (V,), (c, T)
        keys = att.module.k_norm(levels.view(-1, 1, 1, 1, 1) * uk + bk)  # (V, n, H, T, d)
        level_scores = (q * att.scale) @ keys.transpose(-2, -1)  # (V, n, H, P, T)
        token = torch.arange(T, device=x.device).expand(c, T)
        scores = level_scores.permute(0, 4, 1, 2, 3)[level_index, token].permute(2, 3, 4, 0, 1)
    weights = scores.softmax(dim=-1)  # (n, H, P, c, T)
    H, d = att.num_heads, att.head_dim
    mixed = (weights * masks).reshape(n, H, P * c, T) @ uv  # (n, H, P*c, d)
    heads = mixed.view(n, H, P, c, d) + bv.view(1, H, 1, 1, d)
    merged = heads.permute(0, 3, 2, 1, 4).reshape(n, c, P, H * d)
    z_prefix = (m_prefix[:, None] * z[:, :P])[:, None]  # (n, 1, P, D)
    y = z_prefix + block.ls1(att.output(merged, z_prefix))
    return y + block.ls2(block.mlp(block.norm2(y)))
