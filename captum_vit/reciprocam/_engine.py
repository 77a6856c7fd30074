"""The ViT-ReciproCAM engine: the masked copies of one block, computed by a proven strategy, and scored.

`ReciproCAMEngine` owns everything `LayerReciproCAM` does besides Captum's
contract: the copy plan, the choice of strategy (`._strategies`, the fast
one proven once by behaviour), the hooks of each forward pass and the scores.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from .._utils import (
    HookSet,
    PreparedInputs,
    Targets,
    agreement_tolerance,
    calling_forward_func,
    forward_logits,
    relative_error,
)
from ..adapters import HEAD_PREFIX_ONLY, HEAD_UNKNOWN, BlockView, UnsupportedModelError, ViTAdapter
from ._options import ReciproCAMOptions, score_copies
from ._plan import CopySelection, plan_copies
from ._strategies import CopyStrategy, ForwardPass, GeneralCopies, SharedProjectionCopies


class ReciproCAMEngine:
    """Masked copies of one block of one model, computed and scored.

    Args:
        forward_func: the (eager) callable to explain.
        adapter: the ViT's adapter.
        layer: the explained block.
    """

    def __init__(self, forward_func: Callable[..., Any], adapter: ViTAdapter, layer: nn.Module) -> None:
        self.forward_func = forward_func
        self.adapter = adapter
        self.layer = layer
        self.block_index = adapter.block_index(layer)
        self.view = adapter.block_view(layer)
        #: behavioural verdicts: (modules fingerprint, options' proof key) -> None (exact) or a reason
        self._verdicts: Dict[Any, Optional[str]] = {}
        #: the strategy the last call used, ``"fast"`` or ``"general"`` (``None`` before any call)
        self.last_path: Optional[str] = None

    # -- which strategy ------------------------------------------------------
    @property
    def is_last_block(self) -> bool:
        return self.block_index == len(self.adapter.blocks) - 1

    @property
    def head_reads_prefix_only(self) -> bool:
        """Whether the last block's patch rows may be skipped (an unknown head is checked by behaviour)."""
        return self.adapter.head_reads in (HEAD_PREFIX_ONLY, HEAD_UNKNOWN)

    def _last_view(self) -> Optional[BlockView]:
        if self.is_last_block or not self.head_reads_prefix_only:
            return None
        view = self.adapter.block_view(self.adapter.blocks[-1])
        return view if view.math is not None else None

    def _later_views(self) -> Tuple[BlockView, ...]:
        """The views of every block after the explained one, where the head reads only prefix tokens and each
        has an explicit attention; empty otherwise."""
        if self.is_last_block or not self.head_reads_prefix_only:
            return ()
        try:
            views = tuple(self.adapter.block_view(b) for b in self.adapter.blocks[self.block_index + 1 :])
        except UnsupportedModelError:
            return ()
        return views if all(v.math is not None for v in views) else ()

    def fast_strategy(self, options: ReciproCAMOptions) -> SharedProjectionCopies:
        return SharedProjectionCopies(
            self.adapter, self.view, options,
            last_view=self._last_view(), prefix_output=self.is_last_block and self.head_reads_prefix_only,
            later_views=self._later_views(),
        )

    def fast_path_unavailable_reason(self) -> Optional[str]:
        """Why the exact fast path cannot be used for this block, or ``None``.

        ``None`` means it applies by construction; it is still checked by
        behaviour before its first use.
        """
        if self.view.math is None:
            return f"{type(self.view.attention_module).__name__} has no explicit form in captum_vit"
        fingerprint = self._fingerprint()
        failed = [v for k, v in self._verdicts.items() if k[0] == fingerprint and v]
        return failed[0] if failed else None

    def choose(self, prepared: PreparedInputs, grid: Tuple[int, int], options: ReciproCAMOptions) -> CopyStrategy:
        general = GeneralCopies(self.adapter, self.view, options)
        if options.path == "general":
            return general
        reason = self.fast_path_unavailable_reason()
        if reason is None:
            reason = self._proof(prepared, grid, options)
        if reason is not None and options.path == "fast":
            raise ValueError(f"path='fast' is not exact here: {reason}. Use path='auto' or 'general'.")
        return general if reason is not None else self.fast_strategy(options)

    def _proof(self, prepared: PreparedInputs, grid: Tuple[int, int], options: ReciproCAMOptions) -> Optional[str]:
        """The cached verdict on the fast strategy for these modules and options, established once."""
        fingerprint = self._fingerprint()
        if any(k[0] != fingerprint for k in self._verdicts):  # the blocks changed: old proofs lapse
            self._verdicts.clear()
        key = (fingerprint, options.proof_key)
        if key not in self._verdicts:
            self._verdicts[key] = self._verify(prepared, grid, options)
            if self._verdicts[key] is not None and options.path == "auto":
                warnings.warn(
                    f"ReciproCAM fast path not used: {self._verdicts[key]}; the exact general path runs instead "
                    "(slower).",
                    stacklevel=5,
                )
        return self._verdicts[key]

    def _fingerprint(self) -> Tuple[Any, ...]:
        """What the fast strategy's proof depends on: the modules, forwards and hooks of the blocks it computes."""
        blocks = self.adapter.blocks[self.block_index :]  # the later ones too: a masked residual computes them
        return tuple(
            (id(m), type(m), m.__dict__.get("forward"), tuple(m._forward_hooks), tuple(m._forward_pre_hooks))
            for block in blocks for m in block.modules()
        ) + (self.adapter.head_reads,)

    def _verify(self, prepared: PreparedInputs, grid: Tuple[int, int], options: ReciproCAMOptions) -> Optional[str]:
        """Compare the fast and general strategies on the unmasked and a few masked copies of one image.

        An exception on the general strategy is the caller's (bad arguments,
        a failing ``forward_func``) and propagates without a verdict; one on
        the fast strategy only, or any difference, is a reason not to use it.
        """
        K = grid[0] * grid[1]
        copies = CopySelection(with_unmasked=True, cells=tuple(sorted({0, K // 3, (2 * K) // 3, K - 1})))
        args = prepared.forward_args(slice(0, 1))
        general = self.forward_copies(GeneralCopies(self.adapter, self.view, options), args, copies)
        try:
            fast = self.forward_copies(self.fast_strategy(options), args, copies)
        except Exception as err:  # noqa: BLE001 - the reason to fall back, reported in the warning
            return f"forward_func fails on the prefix rows alone, so it reads patch tokens after the block ({err})"
        tolerance = agreement_tolerance(fast.dtype, general.dtype)
        err = relative_error(fast, general)
        if err <= tolerance:
            return None
        if relative_error(fast[:1], general[:1]) > tolerance:  # the unmasked copy differs only by the patch rows
            return f"forward_func's output depends on patch tokens after the last block (difference {err:.2e})"
        return f"it differs from the general path by {err:.2e} (relative) on masked copies{self._likely_cause()}"

    def _likely_cause(self) -> str:
        blocks = [self.view] + ([] if self.is_last_block else [self.adapter.block_view(self.adapter.blocks[-1])])
        causes = []
        for view in blocks:
            attn = view.attention_module
            if attn._forward_hooks or attn._forward_pre_hooks:
                causes.append("a forward hook on the attention module")
            if "forward" in attn.__dict__:
                causes.append("a patched attention forward")
        if self.adapter.head_reads == HEAD_UNKNOWN:
            causes.append("a head outside the model that reads patch tokens")
        if not causes:
            causes.append("a projection or attention variant that is not per-token")
        return "; likely " + " or ".join(dict.fromkeys(causes))

    # -- running -------------------------------------------------------------
    def forward_copies(self, strategy: CopyStrategy, args: Tuple[Any, ...], copies: CopySelection) -> Tensor:
        """``(n * copies.count, C)`` logits of one forward pass carrying ``copies`` of each image."""
        forward = ForwardPass(copies)
        with self.adapter.recording_image_size() as recorder, HookSet() as hooks:
            forward.recorder = recorder
            strategy.install(hooks, forward)
            with calling_forward_func():
                logits = forward_logits(self.forward_func, args)
        if logits.shape[0] != forward.images_seen * copies.count:
            raise RuntimeError(
                f"forward_func returned {logits.shape[0]} rows for {forward.images_seen} images x {copies.count} "
                "copies: it must return one row of logits per row of the explained block's output, and run the "
                "model in the thread that calls attribute (nn.DataParallel over several GPUs does not)."
            )
        return logits

    def raw_maps(
        self, prepared: PreparedInputs, targets: Targets, grid: Tuple[int, int], options: ReciproCAMOptions
    ) -> Tensor:
        """``(B, k, h, w)`` raw scores of the chosen classes; sets `last_path`."""
        strategy = self.choose(prepared, grid, options)
        B, K = prepared.batch_size, grid[0] * grid[1]
        result: Optional[Tensor] = None
        chosen: Optional[Tensor] = None
        per_call = strategy.copies_per_call(K)
        if prepared.has_per_example_extras:  # one image per pass: a one-row extra tensor fits its copies anywhere
            per_call = min(per_call, K + 1)
        for rows, copies in plan_copies(B, K, per_call):
            n = rows.stop - rows.start
            logits = self.forward_copies(strategy, prepared.forward_args(rows), copies).view(n, copies.count, -1)
            logits = logits.float()
            if copies.with_unmasked:
                picked = targets.resolve(logits[:, 0], rows)
                if chosen is None:
                    chosen = torch.empty(B, picked.shape[1], dtype=torch.long, device=logits.device)
                    result = torch.empty(B, K, picked.shape[1], dtype=torch.float32, device=logits.device)
                chosen[rows] = picked
                logits = logits[:, 1:]
            assert result is not None and chosen is not None
            if copies.cells:
                index = chosen[rows][:, None, :].expand(n, len(copies.cells), -1)
                result[rows, copies.cells[0] : copies.cells[-1] + 1] = score_copies(logits, options.scores).gather(2, index)
        assert result is not None
        self.last_path = strategy.name
        return result.permute(0, 2, 1).reshape(B, -1, *grid)


def refuse_user_block_hooks(layer: nn.Module, adapter: ViTAdapter, index: int) -> None:
    """A forward hook on the explained block cannot act on the copies that replace its output: refuse it."""
    if layer._forward_hooks:
        raise UnsupportedModelError(
            f"{adapter.blocks_expression()}[{index}] has {len(layer._forward_hooks)} forward hook(s) of its own; "
            "ReciproCAM replaces that block's output with masked copies and cannot apply them to the copies. "
            "Remove the hooks while explaining (forward pre-hooks and hooks on its sub-modules are fine)."
        )
