"""How one forward pass turns the explained block's output into the masked copies (docs/methods.md 1.4).

- `GeneralCopies`: a forward hook on the explained block replaces its
  output by every copy, re-running the block through its own modules; the
  rest of the model runs on each copy. Works for every family and block.
- `SharedProjectionCopies`: the explained block's copies come from
  projections shared by all copies (`SharedProjections`); where the head
  reads only prefix tokens, the last block computes only its prefix rows
  (for the explained block itself, when it is the last; through a
  pre-hook and a hook on the last block otherwise, or, when the explained
  block is the one before the last, both blocks a chunk of copies at a
  time). The engine uses it only after proving it equal to the general
  strategy on one image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from torch import Tensor, nn

from .._utils import HookSet, agreement_tolerance, relative_error, row_chunks
from ..adapters import BlockView, Call, EntersCopiesEarly, UnsupportedModelError, ViTAdapter, split_call
from ._copies import (
    FoldedInput,
    SharedProjections,
    block_prefix_rows,
    compressed_block,
    copy_block_rows,
    distinct_block_rows,
    masked_block,
    prefix_block_rows,
)
from ._masks import mask_levels
from ._options import ReciproCAMOptions
from ._plan import CopySelection

#: Tokens through the later blocks per call of ``forward_func`` when ``batch_size`` is not given.
GENERAL_TOKEN_BUDGET = 2**16
#: Tokens computed together inside a block by the shared-projection strategy (bounds the MLP's hidden rows).
SHARED_TOKEN_BUDGET = 2048


@dataclass
class ForwardPass:
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

    def install(self, hooks: HookSet, forward: ForwardPass) -> None:
        hooks.forward_hook(self.view.block, lambda *a: self._explained_block(forward, *a), with_kwargs=True)
        entry = copies_entry(self.adapter, self.block_index)
        if entry is not None:  # the copies must enter before the block: its stage reshapes with its input's batch
            forward.repeats = forward.copies.count
            hooks.forward_pre_hook(entry, lambda module, args: self.adapter.repeat_for_copies(args, forward.repeats))

    def _explained_block(self, forward: ForwardPass, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
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
        later_views: the views of every block after the explained one, where
            the head reads only prefix tokens and each has an explicit
            attention: with a masked residual the copies then go through them
            as their few distinct rows (`compressed_block`).
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
        later_views: Sequence[BlockView] = (),
    ) -> None:
        super().__init__(adapter, view, options)
        self.last_view = last_view
        self.prefix_output = prefix_output
        self.later_views = tuple(later_views)

    def copies_per_call(self, num_cells: int) -> int:
        if not (self.prefix_output or self.next_is_last or self.compresses_later_blocks):
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

    @property
    def compresses_later_blocks(self) -> bool:
        """A masked residual with every later block computed here: the copies keep their distinct rows only."""
        return (bool(self.later_views) and self.options.residual != "unmasked"
                and copies_entry(self.adapter, self.block_index) is None)

    def install(self, hooks: HookSet, forward: ForwardPass) -> None:
        if self.compresses_later_blocks:
            _ThroughLaterBlocks(self, forward).install(hooks)
            return
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
        shared, level_index = self.shared_projections(x, call, masks)
        if self.prefix_output:  # scores of the P prefix queries, a gather per copy: all copies of an image at once
            for chunk in row_chunks(masks.shape[0], _copies_per_chunk(self.options.batch_size, n, num_prefix)):
                into[:, chunk] = prefix_block_rows(self.view, x, shared, masks[chunk], level_index[chunk],
                                                   num_prefix, self.options.residual)
            return
        # every row of every copy (each copy's own keys and values), written into ``into`` chunk by chunk
        for _ in self.masked_chunks(x, shared, masks, level_index, _copies_per_chunk(None, 1, T),
                                    lambda image, chunk: into[image, chunk]):
            pass

    def masked_chunks(
        self, x: Tensor, shared: SharedProjections, masks: Tensor, level_index: Tensor, per_chunk: int,
        out_for: Callable[[int, slice], Tensor],
    ) -> Iterator[Tuple[int, slice, Tensor]]:
        """The explained block's output on the masked copies of each image, ``per_chunk`` copies at a time:
        ``(image, chunk, rows)`` with ``rows`` (``(c, T, D)``) written into ``out_for(image, chunk)``."""
        residual = self.options.residual
        for image in range(x.shape[0]):
            folded = FoldedInput.of(self.view, x[image]) if residual == "unmasked" else None
            for chunk in row_chunks(masks.shape[0], per_chunk):
                out = out_for(image, chunk)
                copy_block_rows(self.view, x, shared, image, masks[chunk], level_index[chunk], residual,
                                out=out, folded=folded)
                yield image, chunk, out

    def shared_projections(self, x: Tensor, call: Call, masks: Tensor) -> Tuple[SharedProjections, Tensor]:
        """The projections every copy of ``x`` reads, and each copy's level per token."""
        levels, level_index = mask_levels(masks)
        shared = SharedProjections(self.view.math, self.view.norm1(x), levels, self.view.attention_call(call))
        return shared, level_index


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

    def __init__(self, adapter: ViTAdapter, view: BlockView, forward: ForwardPass) -> None:
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

    def __init__(self, strategy: SharedProjectionCopies, last_view: BlockView, forward: ForwardPass) -> None:
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
        calls = self.later_calls(self.last_view.read_call(args, kwargs)[1])
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
            self.fill_copies(x, shared, masks, level_index, calls, rows[:, first:])
        return self.last_view.wrap_output(output, rows.view(n * copies.count, P, D))

    def later_calls(self, last_call: Call) -> List[Call]:
        """The calls of the blocks after the explained one, given the last block's."""
        return [last_call]

    def fill_copies(self, x: Tensor, shared: SharedProjections, masks: Tensor, level_index: Tensor,
                    calls: List[Call], into: Tensor) -> None:
        """Write each masked copy's prefix rows of the last block's output into ``into`` (``(n, c, P, D)``)."""
        _, T, D = x.shape
        per_chunk = _copies_per_chunk(self.strategy.options.batch_size, 1, T)
        block_rows = x.new_empty(min(per_chunk, masks.shape[0]), T, D)  # one buffer, reused while in cache
        chunks = self.strategy.masked_chunks(x, shared, masks, level_index, per_chunk,
                                             lambda image, chunk: block_rows[: chunk.stop - chunk.start])
        for image, chunk, rows in chunks:
            into[image, chunk] = block_prefix_rows(self.last_view, rows, into.shape[2], calls[-1])


class _ThroughLaterBlocks(_ThroughLastBlock):
    """Hooks on the explained block and every block after it, for a masked residual: each copy goes through
    the later blocks as its distinct rows.

    With a masked residual all zeroed rows of a copy leave the explained block
    equal (`SharedProjections.zero_rows_alike`), and equal rows stay equal
    through a block without position terms, so `compressed_block` computes
    each later block on a copy's few distinct rows, each counted as the rows
    it stands for. The model carries one row per image through those blocks
    and the hooks keep each one's call; the last block's hook returns, per
    image, its own output for the unmasked copy and the copies' prefix rows.
    Where the zeroed rows are not alike (a position term) the copies go through
    the later blocks' views whole. Exact only if nothing acts on the tensors
    between the blocks; the strategy's behavioural proof checks that.
    """

    def __init__(self, strategy: SharedProjectionCopies, forward: ForwardPass) -> None:
        super().__init__(strategy, strategy.later_views[-1], forward)
        self.calls: List[Call] = []

    def install(self, hooks: HookSet) -> None:
        hooks.forward_hook(self.strategy.view.block, self._keep_input, with_kwargs=True)
        for view in self.strategy.later_views[:-1]:
            hooks.forward_hook(view.block, lambda module, args, kwargs, output, view=view: self._keep_call(
                view, args, kwargs), with_kwargs=True)
        hooks.forward_hook(self.last_view.block, self._prefix_rows, with_kwargs=True)

    def _keep_call(self, view: BlockView, args: Any, kwargs: Any) -> None:
        self.calls.append(view.read_call(args, kwargs)[1])

    def later_calls(self, last_call: Call) -> List[Call]:
        calls, self.calls = [*self.calls, last_call], []
        return calls

    def fill_copies(self, x: Tensor, shared: SharedProjections, masks: Tensor, level_index: Tensor,
                    calls: List[Call], into: Tensor) -> None:
        later = list(zip(self.strategy.later_views, calls))
        no_bias = all(v.math is not None and v.math.score_bias(v.attention_call(c)) is None for v, c in later)
        if not (shared.zero_rows_alike and no_bias):  # a position term: the copies cross the later blocks whole
            per_chunk = _copies_per_chunk(self.strategy.options.batch_size, 1, x.shape[1])
            fresh = lambda image, chunk: x.new_empty(chunk.stop - chunk.start, *x.shape[1:])  # noqa: E731
            chunks = self.strategy.masked_chunks(x, shared, masks, level_index, per_chunk, fresh)
            for image, chunk, y in chunks:
                for later_view, later_call in later[:-1]:
                    y = later_view.forward(later_view.norm1(y), y, later_call)
                into[image, chunk] = block_prefix_rows(self.last_view, y, into.shape[2], calls[-1])
            return
        width = int((masks != 0).sum(1).max()) + 1  # a copy's distinct rows: its non-zero ones and one zeroed row
        view, residual, P = self.strategy.view, self.strategy.options.residual, into.shape[2]
        for image in range(x.shape[0]):
            for chunk in row_chunks(masks.shape[0], _copies_per_chunk(self.strategy.options.batch_size, 1, width)):
                y, slot, log_count = distinct_block_rows(view, x, shared, image, masks[chunk], level_index[chunk],
                                                         residual)
                for later_view, later_call in later:
                    y = compressed_block(later_view, y, log_count, later_call)
                into[image, chunk] = y.gather(1, slot[:, :P, None].expand(-1, -1, y.shape[-1]))


def _check_block_wiring(view: BlockView, x: Tensor, call: Call, output: Tensor) -> None:
    err = relative_error(view.forward(view.norm1(x), x, call), output)
    if err > agreement_tolerance(x.dtype):
        raise UnsupportedModelError(
            f"{type(view.block).__name__}.forward is not the pre-norm block that ReciproCAM re-runs "
            f"(x + ls1(attn(norm1(x))), then + ls2(mlp(norm2(.)))): relative difference {err:.2e}. "
            "A patched forward or a different wiring cannot be explained exactly."
        )
