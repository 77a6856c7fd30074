"""The ViT-ReciproCAM engine: the masked copies of one block, two exact ways to compute them, scored.

`ReciproCAMEngine` owns everything `LayerReciproCAM` does
besides Captum's contract: the copy plan, the choice of strategy (proven
once by behaviour), the hooks of each forward pass and the scores.

Strategies (docs/methods.md 1.4):

- `GeneralCopies`: a forward hook on the explained block replaces its
  output by every copy, re-running the block through its own modules; the
  rest of the model runs on each copy. Works for every family and block.
- `SharedProjectionCopies`: the explained block's copies come from
  projections shared by all copies (``_copies.SharedProjections``); where the
  head reads only prefix tokens, the last block computes only its prefix
  rows (for the explained block itself, when it is the last; through a
  pre-hook and a hook on the last block otherwise). Used only after it is
  shown to give the general strategy's scores on one image.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from .._utils import (
    HookSet,
    PreparedInputs,
    Targets,
    agreement_tolerance,
    calling_forward_func,
    check_batch_size,
    check_choice,
    forward_logits,
    relative_error,
    row_chunks,
)
from ..adapters import (
    HEAD_PREFIX_ONLY,
    HEAD_UNKNOWN,
    BlockView,
    Call,
    EntersCopiesEarly,
    UnsupportedModelError,
    ViTAdapter,
    split_call,
)
from ._copies import RESIDUALS, SharedProjections, block_prefix_rows, copy_block_rows, masked_block, prefix_block_rows
from ._masks import KERNELS, mask_levels, reciprocal_masks
from ._plan import CopySelection, plan_copies

SCORES = ("softmax", "logits")
PATHS = ("auto", "fast", "general")

#: Tokens through the later blocks per call of ``forward_func`` when ``batch_size`` is not given.
GENERAL_TOKEN_BUDGET = 2**16
#: Tokens computed together inside a block by the shared-projection strategy (bounds the MLP's hidden rows).
SHARED_TOKEN_BUDGET = 2048


@dataclass(frozen=True)
class ReciproCAMOptions:
    """The options of one explanation, checked together (see `LayerReciproCAM.attribute`)."""

    kernel: str = "gaussian"
    keep_prefix_tokens: bool = True
    scores: str = "softmax"
    residual: str = "unmasked"
    batch_size: Optional[int] = None
    path: str = "auto"

    @classmethod
    def names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def check(self) -> None:
        check_choice(self.kernel, "kernel", KERNELS)
        check_choice(self.scores, "scores", SCORES)
        check_choice(self.path, "path", PATHS)
        check_choice(self.residual, "residual", RESIDUALS)
        check_batch_size(self.batch_size)
        if not isinstance(self.keep_prefix_tokens, bool):
            raise TypeError(f"keep_prefix_tokens must be True or False; got {self.keep_prefix_tokens!r}.")

    def masks(self, grid: Tuple[int, int], num_prefix: int, like: Tensor) -> Tensor:
        return reciprocal_masks(grid, num_prefix, self.kernel, self.keep_prefix_tokens, like.device, like.dtype)

    @property
    def proof_key(self) -> Tuple[str, bool, str]:
        """What a strategy's proof depends on besides the modules: the masks and the residual."""
        return self.kernel, self.keep_prefix_tokens, self.residual


def score_copies(logits: Tensor, scores: str) -> Tensor:
    """The map values of copies' logits: class probabilities (``"softmax"``) or the logits themselves."""
    return logits.softmax(-1) if scores == "softmax" else logits


@dataclass
class _Pass:
    """What one forward pass carries and what its hooks learn."""

    copies: CopySelection
    recorder: Any = None
    images_seen: int = 0
    #: how many times the explained block's input repeats each image (`copies_entry`)
    repeats: int = 1

    def layout(self, adapter: ViTAdapter, num_tokens: int, block_index: int) -> Tuple[int, Tuple[int, int]]:
        return adapter.tokens_layout(num_tokens, self.recorder.image_hw, block_index)


def copies_entry(adapter: ViTAdapter, index: int) -> Optional[nn.Module]:
    """Where the copies of block ``index`` must enter (`EntersCopiesEarly`), or ``None``: at the block itself."""
    return adapter.copies_enter_at(index) if isinstance(adapter, EntersCopiesEarly) else None


class CopyStrategy:
    """How one forward pass turns the explained block's output into the masked copies."""

    #: what `LayerReciproCAM.last_path` reports
    name = ""

    def __init__(self, adapter: ViTAdapter, view: BlockView, options: ReciproCAMOptions) -> None:
        self.adapter = adapter
        self.view = view
        self.options = options
        self.block_index = adapter.block_index(view.block)

    def copies_per_call(self, num_cells: int) -> int:
        """Copies per call of ``forward_func``: ``batch_size``, else a token budget."""
        tokens = self.adapter.num_prefix_tokens + num_cells
        return self.options.batch_size or max(1, GENERAL_TOKEN_BUDGET // tokens)

    def install(self, hooks: HookSet, forward: _Pass) -> None:
        hooks.forward_hook(self.view.block, lambda *a: self._explained_block(forward, *a), with_kwargs=True)
        entry = copies_entry(self.adapter, self.block_index)
        if entry is not None:  # the copies must enter before the block: its stage reshapes with its input's batch
            forward.repeats = forward.copies.count
            hooks.forward_pre_hook(entry, lambda module, args: self.adapter.repeat_for_copies(args, forward.repeats))

    def _explained_block(self, forward: _Pass, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        x, call = self.view.read_call(args, kwargs)
        out = self.view.unwrap_output(output)
        if forward.repeats > 1:  # every image came repeated once per copy: one of each is masked into the copies
            x, out = x[:: forward.repeats], out[:: forward.repeats]
        if self.view.math is not None:
            self.view.math.check_call(self.view.attention_call(call))
        forward.images_seen = n = x.shape[0]
        P, grid = forward.layout(self.adapter, x.shape[1], self.block_index)
        rows = self.output_rows(P, x.shape[1])
        copies = x.new_empty(n, forward.copies.count, rows, x.shape[2])
        if forward.copies.with_unmasked:
            copies[:, 0] = self.unmasked(x, call, out, module.training)[:, :rows]
        if forward.copies.cells:
            masks = self.options.masks(grid, P, x)[list(forward.copies.cells)]
            self.fill_masked(x, call, masks, P, copies[:, int(forward.copies.with_unmasked):])
        return self.view.wrap_output(output, copies.view(n * forward.copies.count, rows, x.shape[2]))

    def output_rows(self, num_prefix: int, num_tokens: int) -> int:
        """How many leading rows of each copy the block passes on."""
        return num_tokens

    def unmasked(self, x: Tensor, call: Call, out: Tensor, training: bool) -> Tensor:
        """The block's own output, checked as this strategy needs."""
        return out

    def fill_masked(self, x: Tensor, call: Call, masks: Tensor, num_prefix: int, into: Tensor) -> None:
        """Write the block's output on each masked copy into ``into`` (``(n, c, rows, D)``)."""
        raise NotImplementedError


class GeneralCopies(CopyStrategy):
    """Every copy re-runs the explained block through its own modules, then the rest of the model."""

    name = "general"

    def unmasked(self, x: Tensor, call: Call, out: Tensor, training: bool) -> Tensor:
        if not training:
            _check_block_wiring(self.view, x, call, out)
        return out

    def fill_masked(self, x: Tensor, call: Call, masks: Tensor, num_prefix: int, into: Tensor) -> None:
        into.copy_(masked_block(self.view, x, self.view.norm1(x), masks, self.options.residual, call))


class SharedProjectionCopies(CopyStrategy):
    """The explained block's copies from shared projections; only prefix rows of the last block where enough.

    Args:
        last_view: the last block's view, when the explained block is an
            earlier one and the head reads only prefix tokens: the last block
            then computes only the prefix rows of each copy. ``None``: the
            later blocks run as they are.
        prefix_output: the explained block is the last one and the head reads
            only prefix tokens: it returns only the prefix rows.
    """

    name = "fast"

    def __init__(
        self,
        adapter: ViTAdapter,
        view: BlockView,
        options: ReciproCAMOptions,
        *,
        last_view: Optional[BlockView] = None,
        prefix_output: bool = False,
    ) -> None:
        super().__init__(adapter, view, options)
        self.last_view = last_view
        self.prefix_output = prefix_output

    def copies_per_call(self, num_cells: int) -> int:
        if not (self.prefix_output or self.next_is_last):
            return super().copies_per_call(num_cells)
        # Nothing after the blocks computed here sees the copies' patch rows: whole images per pass, as many as
        # the token budget holds (an image's tokens before the block, its copies' prefix rows after), at most
        # ``batch_size`` images, since inside the block each image computes at least one copy at a time.
        P = self.adapter.num_prefix_tokens
        images = max(1, GENERAL_TOKEN_BUDGET // (P + num_cells + (num_cells + 1) * P))
        if self.options.batch_size:
            images = min(images, self.options.batch_size)
        return images * (num_cells + 1)

    @property
    def next_is_last(self) -> bool:
        """The last block, whose prefix rows are computed, comes right after the explained one."""
        return (self.last_view is not None and self.block_index == len(self.adapter.blocks) - 2
                and copies_entry(self.adapter, self.block_index) is None)

    def install(self, hooks: HookSet, forward: _Pass) -> None:
        if self.next_is_last:
            assert self.last_view is not None
            _ThroughLastBlock(self, self.last_view, forward).install(hooks)
            return
        super().install(hooks, forward)
        if self.last_view is not None:
            _LastBlockPrefixRows(self.adapter, self.last_view, forward).install(hooks)

    def output_rows(self, num_prefix: int, num_tokens: int) -> int:
        return num_prefix if self.prefix_output else num_tokens

    def fill_masked(self, x: Tensor, call: Call, masks: Tensor, num_prefix: int, into: Tensor) -> None:
        n, T, _ = x.shape
        levels, level_index = mask_levels(masks)
        shared = SharedProjections(self.view.math, self.view.norm1(x), levels, self.view.attention_call(call))
        residual = self.options.residual
        if self.prefix_output:  # scores of the P prefix queries, a gather per copy: all copies of an image at once
            for chunk in row_chunks(masks.shape[0], _copies_per_chunk(self.options.batch_size, n, num_prefix)):
                into[:, chunk] = prefix_block_rows(self.view, x, shared, masks[chunk], level_index[chunk],
                                                   num_prefix, residual)
            return
        for image in range(n):  # every row of every copy: each copy's own keys and values
            for chunk in row_chunks(masks.shape[0], _copies_per_chunk(None, 1, T)):
                copy_block_rows(self.view, x, shared, image, masks[chunk], level_index[chunk], residual,
                                out=into[image, chunk])

    def shared_projections(self, x: Tensor, call: Call, masks: Tensor) -> Tuple[SharedProjections, Tensor]:
        """The projections every copy of ``x`` reads, and each copy's level per token."""
        levels, level_index = mask_levels(masks)
        return SharedProjections(self.view.math, self.view.norm1(x), levels, self.view.attention_call(call)), level_index


def _copies_per_chunk(batch_size: Optional[int], num_images: int, rows: int) -> int:
    """Copies computed together inside a block: ``batch_size`` per image, else a budget of ``rows`` each."""
    if batch_size:
        return max(1, batch_size // num_images)
    return max(1, SHARED_TOKEN_BUDGET // (num_images * rows))


class _LastBlockPrefixRows:
    """Pre-hook and hook on the last block: its own forward on one copy per image, prefix rows for all.

    The pre-hook keeps the copies and hands the block's own forward the first
    copy of each image only; the hook then returns, per image, the block's own
    output for the unmasked copy and `block_prefix_rows` of the masked
    ones: ``(n * count, P, D)``, all that a head reading prefix tokens sees.
    """

    def __init__(self, adapter: ViTAdapter, view: BlockView, forward: _Pass) -> None:
        self.adapter = adapter
        self.view = view
        self.forward = forward
        self.copies: Optional[Tensor] = None

    def install(self, hooks: HookSet) -> None:
        hooks.forward_pre_hook(self.view.block, self._keep_copies, with_kwargs=True)
        hooks.forward_hook(self.view.block, self._prefix_rows, with_kwargs=True)

    def _keep_copies(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        x, _ = split_call(args, kwargs)
        n, count = self.forward.images_seen, self.forward.copies.count
        self.copies = x.view(n, count, *x.shape[1:])
        first = self.copies[:, 0]
        if args:
            return (first, *args[1:]), kwargs
        name = next(iter(kwargs))
        return args, {**kwargs, name: first}

    def _prefix_rows(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        assert self.copies is not None
        _, call = self.view.read_call(args, kwargs)
        P = self.adapter.num_prefix_tokens
        n, count, T, D = self.copies.shape
        rows = self.copies.new_empty(n, count, P, D)
        first = int(self.forward.copies.with_unmasked)
        if first:
            rows[:, 0] = self.view.unwrap_output(output)[:, :P]
        for image in range(n):  # contiguous slices of the copies: nothing is copied to feed the block
            for chunk in row_chunks(count - first, _copies_per_chunk(None, 1, T)):
                part = slice(chunk.start + first, chunk.stop + first)
                rows[image, part] = block_prefix_rows(self.view, self.copies[image, part], P, call)
        self.copies = None
        return self.view.wrap_output(output, rows.view(n * count, P, D))


class _ThroughLastBlock:
    """Hooks on the explained block and on the last block right after it: a chunk of copies at a time
    through both blocks, so nothing the size of every copy is built.

    The explained block keeps its own output (the model carries one row per
    image to the last block) and its hook keeps the block's input. The last
    block's hook returns, per image, the last block's own output for the
    unmasked copy and, chunk by chunk, `block_prefix_rows` of the explained
    block's masked copies (`copy_block_rows`): ``(n * count, P, D)``, all
    that a head reading prefix tokens sees. Exact only if nothing acts on the
    tensor between the two blocks; the strategy's behavioural proof checks that.
    """

    def __init__(self, strategy: SharedProjectionCopies, last_view: BlockView, forward: _Pass) -> None:
        self.strategy = strategy
        self.last_view = last_view
        self.forward = forward
        self.block_input: Optional[Tuple[Tensor, Call]] = None

    def install(self, hooks: HookSet) -> None:
        hooks.forward_hook(self.strategy.view.block, self._keep_input, with_kwargs=True)
        hooks.forward_hook(self.last_view.block, self._prefix_rows, with_kwargs=True)

    def _keep_input(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        view = self.strategy.view
        x, call = view.read_call(args, kwargs)
        assert view.math is not None
        view.math.check_call(view.attention_call(call))
        self.forward.images_seen = x.shape[0]
        self.block_input = (x, call)

    def _prefix_rows(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        assert self.block_input is not None
        (x, call), self.block_input = self.block_input, None
        _, last_call = self.last_view.read_call(args, kwargs)
        strategy, copies = self.strategy, self.forward.copies
        n, T, D = x.shape
        P, grid = self.forward.layout(strategy.adapter, T, strategy.block_index)
        rows = x.new_empty(n, copies.count, P, D)
        first = int(copies.with_unmasked)
        if first:
            rows[:, 0] = self.last_view.unwrap_output(output)[:, :P]
        if copies.cells:
            masks = strategy.options.masks(grid, P, x)[list(copies.cells)]
            shared, level_index = strategy.shared_projections(x, call, masks)
            per_chunk = _copies_per_chunk(strategy.options.batch_size, 1, T)
            block_rows = x.new_empty(min(per_chunk, masks.shape[0]), T, D)  # one buffer, reused while in cache
            for image in range(n):
                for chunk in row_chunks(masks.shape[0], per_chunk):
                    out = block_rows[: chunk.stop - chunk.start]
                    copy_block_rows(strategy.view, x, shared, image, masks[chunk], level_index[chunk],
                                    strategy.options.residual, out=out)
                    rows[image, chunk.start + first : chunk.stop + first] = block_prefix_rows(
                        self.last_view, out, P, last_call)
        return self.last_view.wrap_output(output, rows.view(n * copies.count, P, D))


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

    def fast_strategy(self, options: ReciproCAMOptions) -> SharedProjectionCopies:
        return SharedProjectionCopies(
            self.adapter, self.view, options,
            last_view=self._last_view(), prefix_output=self.is_last_block and self.head_reads_prefix_only,
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
        blocks = [self.layer] + ([] if self.is_last_block else [self.adapter.blocks[-1]])
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
        forward = _Pass(copies)
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


def _check_block_wiring(view: BlockView, x: Tensor, call: Call, output: Tensor) -> None:
    err = relative_error(view.forward(view.norm1(x), x, call), output)
    if err > agreement_tolerance(x.dtype):
        raise UnsupportedModelError(
            f"{type(view.block).__name__}.forward is not the pre-norm block that ReciproCAM re-runs "
            f"(x + ls1(attn(norm1(x))), then + ls2(mlp(norm2(.)))): relative difference {err:.2e}. "
            "A patched forward or a different wiring cannot be explained exactly."
        )

