"""The two passes of the ``chunked`` implementation over the logits, chunk by chunk.

Pass 1 (``stats_pass``) turns each chunk into the streaming state ``(m, d, s, a, argmax)`` of its rows with a few
in-place ops on one reused fp32 workspace::

    ws = logits[rows].float().clamp_min(-2**100); ws[r, y_r] = -2**100
    m = ws.amax(1); ws -= m[:, None]
    a = Σ_{i∈A, i≠y} ws_i − (K − [y∈A])·(z_y − m)        (excluded columns zeroed for the sum)
    e = ws.exp(); d = e.sum(1); s = (e * ws).sum(1)

and ``rowmath.finalize`` gives every statistic. In eager mode it also writes G while the chunk is cache-hot.

Pass 2 (``grad_pass``) recomputes ``e^{z − m}`` chunk by chunk and writes ``G = e^{w}·(scale + beta·w) + γ·[j∈A]``
with ``w = z − m`` (``rowmath.shifted_coefficients``) and the target column set exactly, rounded once to the
logits dtype. In place, source and destination are the same storage: each block is read into the workspace
before it is written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from losskit.kernels import rowmath
from losskit.kernels.chunked.layout import (
    GROUP,
    ColumnBlocks,
    Plan,
    Workspace,
    chunks,
    load,
    rows_view,
    set_target,
)
from losskit.kernels.columns import ColumnSet
from losskit.kernels.prepare import Prepared
from losskit.kernels.rowmath import NEG_LARGE, NEG_LARGE_SUM, RowState, RowStats

__all__ = ["Eager", "GradRows", "grad_pass", "stats_pass"]


@dataclasses.dataclass(frozen=True)
class _Block:
    """Columns ``[c0, c1)`` of the rows of one chunk, and where each row's target falls in it."""

    c0: int
    c1: int
    local: torch.Tensor  # target − c0, clamped into the block (safe to index with)
    in_block: torch.Tensor | None  # rows whose target lies in the block (None: a single block holds all)

    @staticmethod
    def of(c0: int, c1: int, target: torch.Tensor, single: bool) -> _Block:
        local = target - c0
        in_block = None if single else (local >= 0) & (local < c1 - c0)
        return _Block(c0, c1, local.clamp(0, c1 - c0 - 1), in_block)

    @property
    def width(self) -> int:
        return self.c1 - self.c0


@dataclasses.dataclass(frozen=True)
class GradRows:
    """Per-row coefficients of ``G_j = e^{z_j − shift}·(scale + beta·(z_j − shift)) + gamma·[j∈A]``, ``G_y``
    exact, for some rows (``beta`` / ``gamma`` None when statically zero)."""

    target: torch.Tensor  # clamped target of each row
    shift: torch.Tensor
    scale: torch.Tensor
    beta: torch.Tensor | None
    gamma: torch.Tensor | None
    g_target: torch.Tensor

    @staticmethod
    def of(co: rowmath.GradCoefficients, rs: RowStats, target: torch.Tensor) -> GradRows:
        """From coefficients of ``q_j = e^{z_j − L¬}`` to the shifted form (see ``rowmath.shifted_coefficients``)."""
        scale, beta = rowmath.shifted_coefficients(co, rs)
        return GradRows(target, rs.shift, scale, beta, co.gamma, co.g_target)

    def rows(self, span: slice) -> GradRows:
        def cut(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[span]

        return GradRows(*(cut(getattr(self, f.name)) for f in dataclasses.fields(self)))


# ------------------------------------------------------------------------------------------------------------
# Pass 1: the streaming state of every row (and, in eager mode, G while the chunk is hot).
# ------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Eager:
    """What pass 1 needs to write G in the forward: the output buffer (the logits themselves, in place) and the
    per-row coefficients of the rows ``span`` from their final statistics."""

    out: torch.Tensor
    coefficients: Callable[[RowStats, slice], rowmath.GradCoefficients]


@dataclasses.dataclass(frozen=True)
class _ChunkRows:
    target: torch.Tensor  # clamped
    zy: torch.Tensor
    y_in_support: torch.Tensor  # [y∈A] (float)


def _support_sum(wab: torch.Tensor, ex_local: torch.Tensor | None) -> torch.Tensor:
    """Row sums of the workspace over the support columns.

    torch.sum reduces pairwise (a matvec accumulates sequentially: 2e-5 relative on a 128k-term row). The
    excluded columns, usually few, are zeroed for the sum and restored for the exponentials: summing everything
    and subtracting them would cancel catastrophically when they hold −inf (clamped to −2¹⁰⁰) or any very
    negative value, which is how a vocabulary is masked.
    """
    if ex_local is None:
        return wab.sum(1)
    held = wab.index_select(1, ex_local)
    wab.index_fill_(1, ex_local, 0.0)
    total = wab.sum(1)
    wab.index_copy_(1, ex_local, held)
    return total


def _block_state(src: torch.Tensor, ws: Workspace, rows: _ChunkRows, blk: _Block, columns: ColumnBlocks
                 ) -> RowState:
    """Absorb the columns of ``blk`` of the chunk's rows into a fresh state (leaves ``exp`` in ``ws.b``)."""
    n = rows.target.shape[0]
    vb = blk.width
    wa = ws.a[:n]
    wab = wa[:, :vb]
    load(src, wab, torch.clamp, min=NEG_LARGE)
    if wa.shape[1] > vb:
        wa[:, vb:].fill_(NEG_LARGE)
    ex_local = columns.excluded(blk.c0, blk.c1)
    # Σ_{i∈A, i≠y} z_i as the logits are, for the support mean; the gap a below is summed against m instead.
    set_target(wab, blk.local, blk.in_block, 0.0)
    support_sum = _support_sum(wab, ex_local)
    set_target(wab, blk.local, blk.in_block, NEG_LARGE)

    groups = wa.view(n, -1, GROUP)
    gmax = groups.amax(2)
    g = gmax.argmax(1)
    mval = gmax.gather(1, g[:, None])[:, 0]
    inner = groups.gather(1, g[:, None, None].expand(n, 1, GROUP))[:, 0].argmax(1)
    amax_idx = g * GROUP + inner + blk.c0

    deg = mval <= NEG_LARGE  # no finite non-target column in this block
    m = torch.where(deg, torch.zeros_like(mval), mval)
    wa.sub_(m[:, None])

    # a = Σ_{i∈A, i≠y} (z_i − z_y), accumulated against m so a shared offset cancels exactly.
    set_target(wab, blk.local, blk.in_block, 0.0)
    s_a = _support_sum(wab, ex_local)
    y_in = rows.y_in_support if blk.in_block is None else rows.y_in_support * blk.in_block
    cnt = float(columns.support_count(blk.c0, blk.c1)) - y_in
    a = s_a - cnt * (rows.zy - m)
    a = torch.where(s_a < NEG_LARGE_SUM, torch.full_like(a, float("-inf")), a)
    set_target(wab, blk.local, blk.in_block, NEG_LARGE)

    wb = ws.b[:n]
    torch.exp(wa, out=wb)
    d = wb.sum(1)
    s = wa.mul_(wb).sum(1)
    return RowState(m=m, d=d, s=s, a=a, support_sum=support_sum, amax_val=mval, amax_idx=amax_idx)


def _chunk_state(src: torch.Tensor, ws: Workspace, rows: _ChunkRows, plan: Plan, columns: ColumnBlocks
                 ) -> RowState:
    """The final state of one chunk's rows: one block, or the merge of its vocab blocks."""
    if plan.single:
        c0, c1 = plan.blocks[0]
        return _block_state(src, ws, rows, _Block.of(c0, c1, rows.target, True), columns)
    state = None
    for c0, c1 in plan.blocks:
        st = _block_state(src[..., c0:c1], ws, rows, _Block.of(c0, c1, rows.target, False), columns)
        st.m = torch.where(st.d > 0, st.m, torch.full_like(st.m, float("-inf")))
        state = st if state is None else rowmath.merge_states(state, st)
    state.m = torch.where(state.m == float("-inf"), torch.zeros_like(state.m), state.m)
    return state


def _finalize(st: RowState, rows: _ChunkRows, num_support: int) -> RowStats:
    return rowmath.finalize(st, rowmath.RowTargets(rows.zy, rows.target, rows.y_in_support, num_support))


def stats_pass(logits: torch.Tensor, prep: Prepared, plan: Plan, eager: Eager | None = None) -> RowStats:
    """Pass 1 over ``logits``: the ``RowStats`` of every row, unmasked; writes G when ``eager`` is given."""
    n = prep.valid.numel()
    dt, dev = prep.dtype, logits.device
    m_all, d_all, s_all, a_all, sum_all, val_all, zy_all = (torch.empty(n, dtype=dt, device=dev) for _ in range(7))
    idx_all = torch.empty(n, dtype=torch.long, device=dev)
    ws = Workspace(plan, n, dt, dev)
    columns = ColumnBlocks(prep.support.ids, dev)
    for ch in chunks(logits, plan.rows_per_chunk):
        sl = ch.span
        src = ch.view(logits)
        tgt = prep.target[sl]
        zy = src.gather(-1, tgt.view(*src.shape[:-1], 1)).reshape(-1).to(dt)
        rows = _ChunkRows(tgt, zy, prep.target_in_support[sl])
        st = _chunk_state(src, ws, rows, plan, columns)
        m_all[sl], d_all[sl], s_all[sl], a_all[sl], sum_all[sl] = st.m, st.d, st.s, st.a, st.support_sum
        val_all[sl], idx_all[sl], zy_all[sl] = st.amax_val, st.amax_idx, zy
        if eager is not None:
            rs = _finalize(st, rows, prep.support.count)
            co = eager.coefficients(rs, sl)
            dst = ch.view(eager.out)
            if plan.single:
                # ws.b holds e^{z − m}: G_j = e^{z_j − m}·α/d with the target column set exactly. q comes from the
                # unsanitised load, so NaN/inf products of an ignored row are mapped to its exact zero gradient.
                safe_d = torch.where(st.d > 0, st.d, 1.0)
                g = GradRows(tgt, st.m, torch.where(st.d > 0, co.alpha / safe_d, 0.0), None, co.gamma, co.g_target)
                blk = _Block.of(0, prep.num_classes, tgt, True)
                _write_grad(ws.b[: ch.rows], dst, g, prep.support, blk, sanitize=True)
            else:
                _grad_chunk(src, dst, ws, GradRows.of(co, rs, tgt), prep.valid[sl], prep, plan)
    whole = RowState(m=m_all, d=d_all, s=s_all, a=a_all, support_sum=sum_all, amax_val=val_all, amax_idx=idx_all)
    return _finalize(whole, _ChunkRows(prep.target, zy_all, prep.target_in_support), prep.support.count)


# ------------------------------------------------------------------------------------------------------------
# Pass 2: write G = e^{w}·(scale + beta·w) + γ·[j∈A], target column exact.
# ------------------------------------------------------------------------------------------------------------


def _write_grad(q: torch.Tensor, dst: torch.Tensor, g: GradRows, support: ColumnSet, blk: _Block,
                u: torch.Tensor | None = None, sanitize: bool = False) -> None:
    """Finish G for one block from ``q = e^{w}`` (workspace, overwritten) and store it into ``dst``.

    With ``u`` (the workspace holding ``w``) given, ``q·(scale + beta·u)`` is formed, else ``q·scale``.
    ``sanitize`` maps NaN/inf products to 0 (see the eager path of ``stats_pass``).
    """
    qb = q[:, : blk.width]
    if u is not None and g.beta is not None:
        ub = u[:, : blk.width]
        ub.mul_(g.beta[:, None]).add_(g.scale[:, None])
        qb.mul_(ub)
    else:
        qb.mul_(g.scale[:, None])
    if sanitize:
        qb.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    if g.gamma is not None:
        if support.ids:
            qb.addr_(g.gamma, support.indicator[blk.c0 : blk.c1])
        else:
            qb.add_(g.gamma[:, None])
    set_target(qb, blk.local, blk.in_block, g.g_target)
    dst.copy_(rows_view(qb, dst))


def _grad_chunk(src: torch.Tensor, dst: torch.Tensor, ws: Workspace, g: GradRows, valid: torch.Tensor,
                prep: Prepared, plan: Plan) -> None:
    """G for the rows of one chunk from their coefficients ``g``, block by block."""
    n = g.shift.shape[0]
    validf = valid.to(prep.dtype)[:, None]
    for c0, c1 in plan.blocks:
        vb = c1 - c0
        wa = ws.a[:n, :vb]
        # NaN/inf only occur in bad or ignored rows; the sanitised copy keeps ignored rows' G an exact 0.
        load(src[..., c0:c1], wa, torch.nan_to_num, nan=0.0, posinf=0.0, neginf=NEG_LARGE)
        wa.mul_(validf)
        wa.sub_(g.shift[:, None])
        wb = ws.b[:n, :vb]
        torch.exp(wa, out=wb)
        blk = _Block.of(c0, c1, g.target, plan.single)
        _write_grad(wb, dst[..., c0:c1], g, prep.support, blk, u=wa if g.beta is not None else None)


def grad_pass(logits: torch.Tensor, out: torch.Tensor, prep: Prepared, plan: Plan, rs: RowStats,
              co: rowmath.GradCoefficients) -> None:
    """Write G for every row into ``out`` (shaped like ``logits``; may be ``logits`` itself)."""
    ws = Workspace(plan, prep.valid.numel(), prep.dtype, logits.device)
    g = GradRows.of(co, rs, prep.target)
    for ch in chunks(logits, plan.rows_per_chunk):
        _grad_chunk(ch.view(logits), ch.view(out), ws, g.rows(ch.span), prep.valid[ch.span], prep, plan)
