"""What the masked copies of one block compute, exactly, with what they share computed once.

A mask scales whole tokens, and a block's attention projects each token on
its own (``AttentionMath.project`` is per token), so token ``t`` of copy
``j`` is projected from ``m_jt * z_t``: with ``V`` distinct mask values
(five for the gaussian kernel, two for dirac) the ``V`` projections of
``level * z`` give the queries, keys and values of every copy
(`SharedProjections`). Each copy then costs its attention and the rest
of the block for the rows that are wanted, and nothing for the projections.

The three residuals of the explained block (docs/methods.md 1.3):

- ``"unmasked"``: the block's own input ``X`` (the paper's text and the
  authors' repository, which replaces ``norm1``'s output, so the block's
  skip connection carries ``X`` unchanged);
- ``"normalized"``: the masked normalised input ``Z * M`` (OpenVINO
  Training Extensions 1.x);
- ``"input"``: the masked block input ``X * M`` (OpenVINO XAI 1.1).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..adapters import AttentionMath, BlockView, Call, MlpEntry, merge_heads

RESIDUALS = ("unmasked", "normalized", "input")


def residual_rows(x: Tensor, z: Tensor, masks: Tensor, rows: int, residual: str) -> Tensor:
    """``(n, c, rows, D)``: the first ``rows`` rows of each copy's residual.

    Args:
        x: ``(n, T, D)`` block input; z: its normalised form.
        masks: ``(c, T)`` the copies' token masks.
        rows: how many leading rows are wanted (``P`` or ``T``).
        residual: one of `RESIDUALS`.
    """
    n, _, D = x.shape
    if residual == "unmasked":
        return x[:, None, :rows].expand(n, masks.shape[0], rows, D)
    source = z if residual == "normalized" else x
    return source[:, None, :rows] * masks[None, :, :rows, None]


def masked_block(view: BlockView, x: Tensor, z: Tensor, masks: Tensor, residual: str, call: Call) -> Tensor:
    """``(n, c, T, D)``: the block re-run on every masked copy through its own modules (the general path)."""
    n, T, D = x.shape
    zk = (z[:, None] * masks[None, :, :, None]).reshape(-1, T, D)
    rk = residual_rows(x, z, masks, T, residual).reshape(-1, T, D)
    return view.forward(zk, rk, call).view(n, -1, T, D)


class SharedProjections:
    """The queries, keys and values of one attention input ``z`` at every mask level, projected once.

    Args:
        math: the attention's explicit form.
        z: ``(n, T, D)`` unmasked attention input.
        levels: ``(V,)`` the masks' distinct values (`mask_levels`).
        call: the rest of the attention module's call (RoPE, a bias).

    `rows` gives the attention output at chosen query rows of each
    copy. A few rows per copy (the prefix rows, or the distinct rows of
    `distinct_rows`) are scored against every key at every level once
    and each copy picks its levels by a gather; many rows gather each copy's
    own keys and values for PyTorch's fused attention.
    """

    def __init__(self, math: AttentionMath, z: Tensor, levels: Tensor, call: Call) -> None:
        self.math = math
        self.z = z
        projected = [math.project(level * z, call) for level in levels]
        # (n, T, V, H, d): a copy's tokens are gathered by (token, level) in one pass, in the layout attention reads
        self.q, self.k, self.v = (torch.stack([p[i].transpose(1, 2) for p in projected], dim=2) for i in range(3))
        self.bias = math.score_bias(call)
        self.levels = levels

    @functools.cached_property
    def zero_rows_alike(self) -> bool:
        """Every zeroed token has the same query and no position bias tells them apart (no RoPE, no relative
        bias), so all zeroed rows of a copy have one attention output. Read from the projections themselves
        (only where every row is wanted: a data-dependent branch that ``torch.export`` cannot trace)."""
        q0 = self.q[:, :, 0]
        return bool(self.levels[0] == 0) and self.bias is None and torch.equal(q0, q0[:, :1].expand_as(q0))

    def rows(self, image: int, masks: Tensor, level_index: Tensor, query_rows: Tensor) -> Tensor:
        """``(c, r, D)``: the module's output at rows ``query_rows[j]`` (``(c, r)``) of each copy ``z[image] * masks[j]``."""
        return self.rows_of(slice(image, image + 1), masks, level_index, query_rows)[0]

    def rows_of(self, images: slice, masks: Tensor, level_index: Tensor, query_rows: Tensor) -> Tensor:
        """``(n, c, r, D)``: as `rows`, for every image in ``images`` at once.

        Nothing here reads the number of images as a Python number, so an
        exported graph takes any batch.
        """
        T, V = self.k.shape[1:3]
        few = query_rows.shape[1] * V <= T // 2  # scoring every level costs less than gathering keys and values
        out = (self._scored if few else self._gathered)(images, level_index, query_rows)  # (n, c, H, r, d)
        module_input = None
        if self.math.finish_reads_input:
            module_input = self.z[images][:, query_rows] * masks.gather(1, query_rows)[None, ..., None]
            module_input = module_input.flatten(0, 1)
        merged = merge_heads(out.flatten(0, 1))  # (n * c, r, H * d)
        finished = self.math.finish(merged, module_input)
        return finished.unflatten(0, out.shape[:2])

    def _queries(self, images: slice, level_index: Tensor, query_rows: Tensor) -> Tensor:
        """``(n, c, H, r, d)``: each copy's queries at its rows."""
        return self.q[images][:, query_rows, level_index.gather(1, query_rows)].transpose(2, 3)

    def _row_bias(self, query_rows: Tensor) -> Optional[Tensor]:
        """The score bias at each copy's query rows: ``(c, H, r, T)`` (or ``None``)."""
        if self.bias is None:
            return None
        bias = self.bias.reshape(-1, *self.bias.shape[-2:])  # (H or 1, T, T)
        return bias[:, query_rows].transpose(0, 1)

    def _gathered(self, images: slice, level_index: Tensor, query_rows: Tensor) -> Tensor:
        """Each copy's own keys and values, fused attention: ``(n, c, H, r, d)``."""
        c, T = level_index.shape
        token = torch.arange(T, device=level_index.device).expand(c, T)
        k = self.k[images][:, token, level_index].transpose(2, 3)  # (n, c, H, T, d)
        v = self.v[images][:, token, level_index].transpose(2, 3)
        q = self._queries(images, level_index, query_rows)
        bias = self._row_bias(query_rows)
        out = self.math.attend(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
                               None if bias is None else bias.repeat(q.shape[0], 1, 1, 1))
        return out.unflatten(0, q.shape[:2])

    def _scored(self, images: slice, level_index: Tensor, query_rows: Tensor) -> Tensor:
        """Scores against the keys of every level, each copy's picked by a gather: ``(n, c, H, r, d)``."""
        c, T = level_index.shape
        _, _, V, H, d = self.k.shape
        q = self._queries(images, level_index, query_rows) * self.math.scale  # (n, c, H, r, d)
        keys = self.k[images].flatten(1, 2)  # (n, T * V, H, d)
        every = torch.einsum("nchrd,nkhd->nchrk", q, keys)  # token t at level l is column t*V + l
        column = torch.arange(T, device=level_index.device) * V + level_index  # (c, T)
        index = column[None, :, None, None].expand(q.shape[0], c, H, q.shape[3], T)
        scores = every.gather(4, index)
        bias = self._row_bias(query_rows)
        weights = self.math.attention_dropout((scores if bias is None else scores + bias).softmax(dim=-1))
        out = 0
        for level in range(V):  # sum_t A_jt v_t(level of copy j at t)
            chosen = (level_index == level).to(weights.dtype)[None, :, None, None]  # (1, c, 1, 1, T)
            out = out + torch.einsum("nchrt,nthd->nchrd", weights * chosen, self.v[images][:, :, level])
        return out


def distinct_rows(masks: Tensor) -> "tuple[Tensor, Tensor, Tensor]":
    """The rows whose attention can differ within each copy, when all zeroed rows are alike.

    Returns ``(distinct, slot, first_zero)``: ``(c, r')`` row indices per copy
    (its nonzero rows in order, then zero rows, ``r'`` = most nonzero rows +
    1), ``(c, R)`` the position in ``distinct`` that holds each row's output,
    and ``(c,)`` the position of the copy's first zero row (of a nonzero row
    when a copy has none, which then covers every row).
    """
    nonzero = masks != 0
    count = nonzero.sum(1)
    order = (~nonzero).to(torch.uint8).argsort(dim=1, stable=True)  # nonzero rows first, then zero rows, in order
    width = min(masks.shape[1], int(count.max()) + 1)
    first_zero = count.clamp(max=width - 1)
    slot = torch.where(nonzero, nonzero.cumsum(1) - 1, first_zero[:, None].expand_as(nonzero))
    return order[:, :width], slot, first_zero


@dataclass
class FoldedInput:
    """What `folded_mlp_branch` reads of one image's block input ``x`` (``(T, D)``), computed once for all of
    its copies: ``x`` centred per row, its variance, and the MLP's first layer on it."""

    entry: MlpEntry
    #: ``(hidden, D)`` the linear weight times the norm's scale; ``(hidden,)`` the constant of the first layer
    weight: Tensor
    offset: Optional[Tensor]
    x_centred: Tensor
    x_variance: Tensor
    x_hidden: Tensor

    @classmethod
    def of(cls, view: BlockView, x: Tensor) -> Optional["FoldedInput"]:
        """The folded input of ``x`` where the block's MLP branch starts with a layer norm and a linear layer
        (`BlockView.mlp_entry`), else ``None``."""
        entry = view.mlp_entry()
        if entry is None:
            return None
        norm, linear = entry.norm, entry.linear
        weight = linear.weight if norm.weight is None else linear.weight * norm.weight
        offset = linear.bias
        if norm.bias is not None:
            offset = linear.weight @ norm.bias + (0 if offset is None else offset)
        centred = x - x.mean(-1, keepdim=True)
        return cls(entry, weight, offset, centred, centred.square().mean(-1), centred @ weight.T)


def copy_block_rows(
    view: BlockView, x: Tensor, shared: SharedProjections, image: int, masks: Tensor, level_index: Tensor,
    residual: str, out: Tensor, folded: Optional[FoldedInput] = None,
) -> None:
    """Write the block's output on each masked copy of image ``image`` into ``out`` (``(c, T, D)``), exactly.

    The attention comes from `SharedProjections`; the residual, the
    layer scale and the MLP act on each token alone (``view.finish``). Where
    all zeroed rows are alike, attention runs once per distinct row; with a
    masked residual the zeroed rows stay alike through the whole block, so
    the MLP too runs once per distinct row; with the unmasked one, ``folded``
    (`FoldedInput` of ``x[image]``) computes the MLP's first layer from the
    image's rows and the copies' distinct rows (`folded_mlp_branch`).
    """
    c, T = masks.shape
    if not shared.zero_rows_alike:
        attention = shared.rows(image, masks, level_index, torch.arange(T, device=masks.device).expand(c, T))
        r = residual_rows(x[image : image + 1], shared.z[image : image + 1], masks, T, residual)[0]
        out.copy_(view.finish(r, attention))
        return
    distinct, slot, scaled = _distinct_attention(view, shared, image, masks, level_index)
    D = scaled.shape[-1]
    if residual == "unmasked":  # every row keeps its own input: the stream is x + the row's scaled attention
        rows = (torch.arange(c, device=slot.device)[:, None] * scaled.shape[1] + slot).flatten()  # into (c * r')
        torch.add(x[image][None], scaled.flatten(0, 1).index_select(0, rows).view(c, T, D), out=out)
        out.add_(view.mlp_branch(out) if folded is None else folded_mlp_branch(folded, scaled, rows))
        return
    y = _masked_residual_rows(view, x, shared, image, masks, distinct, scaled, residual)
    torch.gather(y, 1, slot[..., None].expand(c, T, D), out=out)


def _distinct_attention(
    view: BlockView, shared: SharedProjections, image: int, masks: Tensor, level_index: Tensor
) -> "tuple[Tensor, Tensor, Tensor]":
    """`distinct_rows` of ``masks`` and ``(c, r', D)`` the scaled attention at them (zeroed rows alike)."""
    distinct, slot, _ = distinct_rows(masks)
    return distinct, slot, view.layer_scale1(shared.rows(image, masks, level_index, distinct))


def _masked_residual_rows(
    view: BlockView, x: Tensor, shared: SharedProjections, image: int, masks: Tensor, distinct: Tensor,
    scaled: Tensor, residual: str,
) -> Tensor:
    source = shared.z if residual == "normalized" else x
    y = source[image][distinct] * masks.gather(1, distinct)[..., None] + scaled
    return y + view.mlp_branch(y)


def distinct_block_rows(
    view: BlockView, x: Tensor, shared: SharedProjections, image: int, masks: Tensor, level_index: Tensor,
    residual: str,
) -> "tuple[Tensor, Tensor, Tensor]":
    """Each copy's block output as its distinct rows, for a masked residual where all zeroed rows are alike.

    Returns ``(rows, slot, log_count)``: ``(c, r, D)`` the distinct rows,
    ``(c, T)`` which of them each row of the copy is, and ``(c, r)`` the log of
    how many rows each stands for (``-inf`` for a padding row none is).
    """
    c, T = masks.shape
    distinct, slot, scaled = _distinct_attention(view, shared, image, masks, level_index)
    rows = _masked_residual_rows(view, x, shared, image, masks, distinct, scaled, residual)
    count = torch.zeros(c, distinct.shape[1], dtype=rows.dtype, device=rows.device)
    count.scatter_add_(1, slot, torch.ones(c, T, dtype=rows.dtype, device=rows.device))
    return rows, slot, count.log()


def compressed_block(view: BlockView, y: Tensor, log_count: Tensor, call: Call) -> Tensor:
    """``(N, r, D)``: a block on inputs of which ``y`` (``(N, r, D)``) are the distinct rows, row ``i`` standing
    for ``exp(log_count[:, i])`` identical rows, exactly.

    Identical rows give identical queries, keys and values where nothing
    depends on a token's position (no rotary embedding, no position bias:
    the caller checks), so ``m`` identical keys weigh as one key whose
    score is raised by ``log m``; the rest of the block acts on each row.
    """
    math: Optional[AttentionMath] = view.math
    assert math is not None
    z = view.norm1(y)
    attention_call = view.attention_call(call)
    q, k, v = math.project(z, attention_call)
    out = math.attend(q, k, v, log_count[:, None, None, :].to(q.dtype))
    attention = math.finish(merge_heads(out), z if math.finish_reads_input else None)
    return view.finish(y, attention)


def folded_mlp_branch(folded: FoldedInput, scaled: Tensor, rows: Tensor) -> Tensor:
    """``(c, T, D)``: the MLP branch on rows ``y[j, t] = x[t] + scaled.flatten(0, 1)[rows[j * T + t]]``, its
    first linear layer applied to the ``T`` rows of ``x`` and the ``r`` rows of each copy's ``scaled`` instead
    of every ``c * T`` row.

    The layer norm centres each row and divides it by its deviation, and the
    linear layer is linear, so with ``x~``, ``s~`` the centred rows and ``W``
    the linear weight times the norm's scale, ``linear(norm(y)) = (W x~ + W s~)
    / sigma + (the linear bias + W_linear norm.bias)``, where ``sigma^2 =
    var(x) + var(s) + 2 x~ . s~ / D + eps``: the same sums in another order,
    equal up to rounding.

    Args:
        folded: `FoldedInput` of the image's ``(T, D)`` block input.
        scaled: ``(c, r, D)`` each copy's distinct scaled attention rows.
        rows: ``(c * T,)`` which of them each row adds.
    """
    c, r, D = scaled.shape
    T = folded.x_centred.shape[0]
    s_centred = (scaled - scaled.mean(-1, keepdim=True)).flatten(0, 1)  # (c * r, D)
    token = torch.arange(T, device=rows.device).repeat(c)
    cross = (s_centred @ folded.x_centred.T)[rows, token].view(c, T)  # x~_t . s~ of the row it adds
    variance = folded.x_variance + s_centred.square().mean(-1)[rows].view(c, T) + 2 * cross / D
    hidden = (s_centred @ folded.weight.T).index_select(0, rows).view(c, T, -1)
    hidden.add_(folded.x_hidden).mul_(torch.rsqrt(variance + folded.entry.norm.eps)[..., None])
    if folded.offset is not None:
        hidden.add_(folded.offset)
    return folded.entry.rest(hidden)


def prefix_block_rows(
    view: BlockView, x: Tensor, shared: SharedProjections, masks: Tensor, level_index: Tensor, num_prefix: int,
    residual: str,
) -> Tensor:
    """``(n, c, P, D)``: the prefix rows of the (last) block's output on each masked copy, exactly."""
    n, _, D = x.shape
    c, P = masks.shape[0], num_prefix
    prefix = torch.arange(P, device=masks.device).expand(c, P)
    attention = shared.rows_of(slice(None), masks, level_index, prefix)  # (n, c, P, D): every image at once
    r = residual_rows(x, shared.z, masks, P, residual)
    return view.finish(r.flatten(0, 1), attention.flatten(0, 1)).unflatten(0, (n, c))


def block_prefix_rows(view: BlockView, x: Tensor, num_prefix: int, call: Call) -> Tensor:
    """``(N, P, D)``: the prefix rows of a standard block's output on inputs ``x`` (``(N, T, D)``).

    Every token's key and value are needed, but queries, attention rows and
    the rest of the block only for the ``P`` prefix rows that a head reading
    prefix tokens sees.
    """
    math: Optional[AttentionMath] = view.math
    assert math is not None
    z = view.norm1(x)
    out = math.prefix_attention(z, view.attention_call(call), num_prefix)
    attention = math.finish(merge_heads(out), z[:, :num_prefix] if math.finish_reads_input else None)
    return view.finish(x[:, :num_prefix], attention)
