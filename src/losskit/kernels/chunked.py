"""The ``chunked`` implementation: pure torch, custom autograd, memory bounded by one chunk (spec/kernels.md §4.3).

The logits are streamed in chunks of ``max(1, chunk_bytes // (4·V))`` rows (a row wider than the budget is
split into vocab blocks merged with the rule of §3.1). Each chunk is copied into one reused fp32 workspace
(fp64 for fp64 logits; the caller's tensor is never written unless ``inplace_grad``), the target column is
set to (clamped) −∞ there, and a few in-place ops produce the streaming state ``(m, d, s, a, argmax)``:

    ws = logits[rows].float().clamp_min(-2**100); ws[r, y_r] = -2**100
    m = ws.amax(1); ws -= m[:, None]
    a = (ws with the target column at 0) @ support_indicator - (K - [y∈A])·(z_y - m)
    e = ws.exp(); d = e.sum(1); s = (e * ws).sum(1)

The closed forms of §3.2 (``rowmath.finalize``) then give every statistic. The gradient pass recomputes
``q = exp(z - L¬)`` chunk by chunk and writes ``G = q·(α + β·u) + γ·[j∈A]`` with the target column set
exactly (§3.5), rounded once to the logits dtype.

What it equals, in plain torch (the oracle the tests use, ``reference.py``)::

    lsm = logits.double().log_softmax(-1)
    nll = -lsm.gather(-1, target[..., None])[..., 0]
    entropy = -(lsm.exp() * lsm).sum(-1)
    ...and autograd for the gradients.

Gradient modes (§4.1): *deferred* (``TokenStatsFunction``: row constants saved, one recompute pass in
backward) and *eager* (``FusedTokenLossFunction``: G written in the forward while the chunk is cache-hot,
only a guarded rescale in backward). In-place mode writes G into the logits' storage and bumps its version
counter, so any other consumer of those logits fails loudly.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Iterator

import torch

from losskit.contract import LossInputError, TokenStats
from losskit.kernels import rowmath
from losskit.kernels.columns import ids_tensor
from losskit.kernels.prepare import Prepared, Smoothing
from losskit.kernels.rowmath import NEG_LARGE, NEG_LARGE_SUM, RowState, RowStats

DEFAULT_CHUNK_BYTES_CPU = 4 * 1024 * 1024
DEFAULT_CHUNK_BYTES_CUDA = 256 * 1024 * 1024
# argmax over a row is done in two stages (max of 64-column groups, then inside the winning group): torch's
# argmax kernel is ~10x slower than amax on CPU, so the workspace width is padded to a multiple of this.
_GROUP = 64

_DOUBLE_BACKWARD_MESSAGE = (
    'impl="chunked" computes a once-differentiable custom backward; double backward (create_graph=True) is '
    'not supported. Use impl="torch" for higher-order gradients'
)


def default_chunk_bytes(device: torch.device) -> int:
    """4 MiB on CPU (cache-sized, yet ≥ 1M elements per op), 256 MiB on CUDA (§4.3)."""
    return DEFAULT_CHUNK_BYTES_CUDA if device.type == "cuda" else DEFAULT_CHUNK_BYTES_CPU


def check_chunk_bytes(chunk_bytes, device: torch.device) -> int:
    """``chunk_bytes`` or the device default; ``LossInputError`` unless a positive int."""
    if chunk_bytes is None:
        return default_chunk_bytes(device)
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
        raise LossInputError(f"chunk_bytes must be a positive int (bytes) or None, got {chunk_bytes!r}")
    return chunk_bytes


# ------------------------------------------------------------------------------------------------------------
# Chunk layout: how rows and columns are cut, for 2-D logits, viewable 3-D logits and shifted 3-D views.
# ------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Rows ``[r0, r1)`` of the flattened leading dims; ``view(t)`` returns them from any tensor shaped like
    the logits (2-D ``(rows, V)`` or 3-D ``(b, t, V)``), without a copy."""

    r0: int
    r1: int
    view: Callable[[torch.Tensor], torch.Tensor]

    @property
    def rows(self) -> int:
        return self.r1 - self.r0


def _chunks(logits: torch.Tensor, rows_per_chunk: int) -> Iterator[Chunk]:
    v = logits.shape[-1]
    n = logits.numel() // v if v else 0
    flat_ok = True
    if logits.dim() == 3:
        try:
            logits.view(-1, v)
        except RuntimeError:  # e.g. logits[:, :-1]: rows are not one stride apart across the batch
            flat_ok = False
    if flat_ok:
        for r0 in range(0, n, rows_per_chunk):
            r1 = min(n, r0 + rows_per_chunk)
            yield Chunk(r0, r1, lambda t, r0=r0, r1=r1: t.view(-1, t.shape[-1])[r0:r1])
        return
    b, t_len = logits.shape[0], logits.shape[1]
    if t_len <= rows_per_chunk:
        per = rows_per_chunk // t_len
        for b0 in range(0, b, per):
            b1 = min(b, b0 + per)
            yield Chunk(b0 * t_len, b1 * t_len, lambda t, b0=b0, b1=b1: t[b0:b1])
    else:
        for bi in range(b):
            for t0 in range(0, t_len, rows_per_chunk):
                t1 = min(t_len, t0 + rows_per_chunk)
                yield Chunk(bi * t_len + t0, bi * t_len + t1, lambda t, bi=bi, t0=t0, t1=t1: t[bi, t0:t1])


@dataclasses.dataclass(frozen=True)
class Plan:
    """Rows per chunk and vocab blocks for one call (§4.3)."""

    rows_per_chunk: int
    blocks: tuple[tuple[int, int], ...]  # column ranges [c0, c1)
    width: int  # workspace width: the widest block padded to a multiple of _GROUP

    @staticmethod
    def make(num_classes: int, dtype: torch.dtype, chunk_bytes: int) -> Plan:
        item = torch.finfo(dtype).bits // 8
        rows = max(1, chunk_bytes // (item * num_classes))
        block = num_classes if chunk_bytes >= item * num_classes else max(1, chunk_bytes // item)
        blocks = tuple((c0, min(num_classes, c0 + block)) for c0 in range(0, num_classes, block))
        width = -(-block // _GROUP) * _GROUP
        return Plan(rows, blocks, width)


class _Workspace:
    """The two reused ``(rows_per_chunk, width)`` buffers of a call (fp32, or fp64 for fp64 input)."""

    def __init__(self, plan: Plan, n: int, dtype: torch.dtype, device: torch.device, second: bool = True):
        rows = min(plan.rows_per_chunk, max(n, 1))
        self.a = torch.empty(rows, plan.width, dtype=dtype, device=device)
        self.b = torch.empty(rows, plan.width, dtype=dtype, device=device) if second else None


def _rows_view(ws2d: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The 2-D workspace slice ``ws2d`` seen with the leading shape of the chunk ``like``."""
    return ws2d.view(*like.shape[:-1], ws2d.shape[-1])


def _load(src: torch.Tensor, ws: torch.Tensor, op: Callable[..., torch.Tensor], **kw) -> None:
    """``ws[:] = op(src.to(ws.dtype), **kw)`` in one pass when the dtypes agree, else copy then op in place."""
    dst = _rows_view(ws, src)
    if src.dtype == ws.dtype:
        op(src, out=dst, **kw)
    else:
        dst.copy_(src)
        op(dst, out=dst, **kw)


def _set_target(ws: torch.Tensor, local: torch.Tensor, in_block: torch.Tensor | None, value) -> None:
    """Write ``value`` (scalar or per row) at each row's target column, only for rows whose target is in this
    block (``in_block`` None: all rows)."""
    idx = local[:, None]
    if not isinstance(value, torch.Tensor):
        value = torch.full((ws.shape[0], 1), value, dtype=ws.dtype, device=ws.device)
    else:
        value = value[:, None].to(ws.dtype)
    if in_block is not None:
        value = torch.where(in_block[:, None], value, ws.gather(1, idx))
    ws.scatter_(1, idx, value)


# ------------------------------------------------------------------------------------------------------------
# Pass 1: the streaming state of every row (and, in eager mode, G while the chunk is hot).
# ------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Eager:
    """What the eager pass needs to write G in the forward."""

    out: torch.Tensor  # G buffer shaped like the logits (or the logits themselves, in place)
    coefficients: Callable[[RowStats, slice], rowmath.GradCoefficients]


def _block_state(
    src: torch.Tensor,
    ws: _Workspace,
    rows: int,
    c0: int,
    c1: int,
    target: torch.Tensor,
    zy: torch.Tensor,
    y_in_support: torch.Tensor,
    support_counts: Callable[[int, int], int],
    single: bool,
    excluded_in_block: Callable[[int, int], torch.Tensor | None],
) -> RowState:
    """Absorb columns ``[c0, c1)`` of ``rows`` rows into a fresh state (leaves ``exp`` in ``ws.b``).

    ``y_in_support`` is ``[y∈A]`` of these rows (float).
    """
    vb = c1 - c0
    wa = ws.a[:rows]
    wab = wa[:, :vb]
    _load(src, wab, torch.clamp, min=NEG_LARGE)
    if wa.shape[1] > vb:
        wa[:, vb:].fill_(NEG_LARGE)
    local = target - c0
    in_block = None if single else (local >= 0) & (local < vb)
    local = local.clamp(0, vb - 1)
    _set_target(wab, local, in_block, NEG_LARGE)

    groups = wa.view(rows, -1, _GROUP)
    gmax = groups.amax(2)
    g = gmax.argmax(1)
    mval = gmax.gather(1, g[:, None])[:, 0]
    inner = groups.gather(1, g[:, None, None].expand(rows, 1, _GROUP))[:, 0].argmax(1)
    amax_idx = g * _GROUP + inner + c0

    deg = mval <= NEG_LARGE  # no finite non-target column in this block
    m = torch.where(deg, torch.zeros_like(mval), mval)
    wa.sub_(m[:, None])

    # a = Σ_{i∈A, i≠y} (z_i − z_y), accumulated against m so a shared offset cancels exactly.
    _set_target(wab, local, in_block, 0.0)
    # torch.sum reduces pairwise (a matvec accumulates sequentially: 2e-5 relative on a 128k-term row).
    # The excluded columns, usually few, are zeroed for the sum and restored for the exponentials: summing
    # everything and subtracting them would cancel catastrophically when they hold −inf (clamped to −2¹⁰⁰) or
    # any very negative value, which is how a vocabulary is masked.
    ex_local = excluded_in_block(c0, c1)
    if ex_local is None:
        s_a = wab.sum(1)
    else:
        held = wab.index_select(1, ex_local)
        wab.index_fill_(1, ex_local, 0.0)
        s_a = wab.sum(1)
        wab.index_copy_(1, ex_local, held)
    y_in = y_in_support if in_block is None else y_in_support * in_block
    cnt = float(support_counts(c0, c1)) - y_in
    a = s_a - cnt * (zy - m)
    a = torch.where(s_a < NEG_LARGE_SUM, torch.full_like(a, float("-inf")), a)
    _set_target(wab, local, in_block, NEG_LARGE)

    wb = ws.b[:rows]
    torch.exp(wa, out=wb)
    d = wb.sum(1)
    s = wa.mul_(wb).sum(1)
    return RowState(m=m, d=d, s=s, a=a, amax_val=mval, amax_idx=amax_idx)


def stats_pass(logits: torch.Tensor, prep: Prepared, plan: Plan, eager: _Eager | None = None) -> RowStats:
    """Pass 1 over ``logits``: the ``RowStats`` of every row, unmasked; writes G when ``eager`` is given."""
    n = prep.valid.numel()
    dt = prep.dtype
    dev = logits.device
    v = prep.num_classes
    m_all = torch.empty(n, dtype=dt, device=dev)
    d_all = torch.empty(n, dtype=dt, device=dev)
    s_all = torch.empty(n, dtype=dt, device=dev)
    a_all = torch.empty(n, dtype=dt, device=dev)
    val_all = torch.empty(n, dtype=dt, device=dev)
    idx_all = torch.empty(n, dtype=torch.long, device=dev)
    zy_all = torch.empty(n, dtype=dt, device=dev)
    ws = _Workspace(plan, n, dt, dev)
    excluded = prep.support.ids

    def support_counts(c0: int, c1: int) -> int:
        return (c1 - c0) - (bisect.bisect_left(excluded, c1) - bisect.bisect_left(excluded, c0))

    single = len(plan.blocks) == 1
    ex_all = ids_tensor(excluded, dev) if excluded else None
    ex_cache: dict[tuple[int, int], torch.Tensor | None] = {}

    def excluded_in_block(c0: int, c1: int) -> torch.Tensor | None:
        if ex_all is None:
            return None
        if (c0, c1) not in ex_cache:
            lo, hi = bisect.bisect_left(excluded, c0), bisect.bisect_left(excluded, c1)
            ex_cache[(c0, c1)] = ex_all[lo:hi] - c0 if hi > lo else None
        return ex_cache[(c0, c1)]

    for ch in _chunks(logits, plan.rows_per_chunk):
        rows = ch.rows
        src = ch.view(logits)
        tgt = prep.target[ch.r0 : ch.r1]
        zy = src.gather(-1, tgt.view(*src.shape[:-1], 1)).reshape(-1).to(dt)
        y_in_support = prep.target_in_support[ch.r0 : ch.r1]
        state = None
        for c0, c1 in plan.blocks:
            st = _block_state(
                src[..., c0:c1],
                ws,
                rows,
                c0,
                c1,
                tgt,
                zy,
                y_in_support,
                support_counts,
                single,
                excluded_in_block,
            )
            if single:
                state = st
            else:
                st.m = torch.where(st.d > 0, st.m, torch.full_like(st.m, float("-inf")))
                state = st if state is None else rowmath.merge_states(state, st)
        if not single:
            state.m = torch.where(state.m == float("-inf"), torch.zeros_like(state.m), state.m)
        sl = slice(ch.r0, ch.r1)
        m_all[sl], d_all[sl], s_all[sl], a_all[sl] = state.m, state.d, state.s, state.a
        val_all[sl], idx_all[sl], zy_all[sl] = state.amax_val, state.amax_idx, zy
        if eager is not None:
            rs = rowmath.finalize(
                state.m,
                state.d,
                state.s,
                state.a,
                state.amax_val,
                state.amax_idx,
                zy,
                tgt,
                prep.support.count,
            )
            co = eager.coefficients(rs, sl)
            dst = ch.view(eager.out)
            if single:
                # ws.b holds e^{z − m}; p_j = e^{z_j − m}·e^{m − L¬}·(1 − p_y) = e^{z_j − m}·(1 − p_y)/d.
                scale = torch.where(state.d > 0, co.alpha / torch.where(state.d > 0, state.d, 1.0), 0.0)
                _write_grad(ws.b[:rows], dst, scale, None, None, co, tgt, None, prep, 0, v, sanitize=True)
            else:
                scale, beta = rowmath.shifted_coefficients(co, rs)
                _grad_chunk(src, dst, ws, rows, rs.shift, scale, beta, co, tgt, prep, plan, ch.r0, ch.r1)
    rs = rowmath.finalize(
        m_all, d_all, s_all, a_all, val_all, idx_all, zy_all, prep.target, prep.support.count
    )
    return rs


# ------------------------------------------------------------------------------------------------------------
# Pass 2: write G = q·(α + β·u) + γ·[j∈A], target column exact.
# ------------------------------------------------------------------------------------------------------------


def _write_grad(
    q: torch.Tensor,
    dst: torch.Tensor,
    scale: torch.Tensor,
    beta: torch.Tensor | None,
    u: torch.Tensor | None,
    co: rowmath.GradCoefficients,
    target: torch.Tensor,
    prep_block: tuple[torch.Tensor, torch.Tensor | None] | None,
    prep: Prepared,
    c0: int,
    c1: int,
    sanitize: bool = False,
) -> None:
    """Finish G for one block from ``q`` (workspace, overwritten) and store it into ``dst`` (logits dtype).

    ``scale`` multiplies q (α, or α/d in the eager fast path); with ``u`` given, ``q·(α + β·u)`` is formed.
    ``sanitize`` maps NaN/inf products to 0: in the eager path q comes from the unsanitised stats load, and an
    ignored row holding NaN or +inf must still get an exact zero gradient (its scale is 0).
    """
    vb = c1 - c0
    qb = q[:, :vb]
    if u is not None and beta is not None:
        ub = u[:, :vb]
        ub.mul_(beta[:, None]).add_(scale[:, None])
        qb.mul_(ub)
    else:
        qb.mul_(scale[:, None])
    if sanitize:
        qb.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    if co.gamma is not None:
        ind = prep.support.indicator[c0:c1]
        if prep.support.ids:
            qb.addr_(co.gamma, ind)
        else:
            qb.add_(co.gamma[:, None])
    if prep_block is None:
        local, in_block = target - c0, None
    else:
        local, in_block = prep_block
    _set_target(qb, local.clamp(0, vb - 1), in_block, co.g_target)
    dst.copy_(_rows_view(qb, dst))


def _grad_chunk(
    src: torch.Tensor,
    dst: torch.Tensor,
    ws: _Workspace,
    rows: int,
    shift: torch.Tensor,
    scale: torch.Tensor,
    beta: torch.Tensor | None,
    co: rowmath.GradCoefficients,
    target: torch.Tensor,
    prep: Prepared,
    plan: Plan,
    r0: int,
    r1: int,
) -> None:
    """G for rows ``[r0, r1)`` from the saved row constants, block by block (deferred mode's backward).

    ``G_j = e^{z_j − shift}·(scale + beta·(z_j − shift)) + γ[j∈A]`` (see ``rowmath.shifted_coefficients``).
    """
    validf = prep.valid[r0:r1].to(prep.dtype)[:, None]
    single = len(plan.blocks) == 1
    for c0, c1 in plan.blocks:
        vb = c1 - c0
        wa = ws.a[:rows, :vb]
        # NaN/inf only occur in bad or ignored rows; the sanitised copy keeps ignored rows' G an exact 0.
        _load(src[..., c0:c1], wa, torch.nan_to_num, nan=0.0, posinf=0.0, neginf=NEG_LARGE)
        wa.mul_(validf)
        wa.sub_(shift[:, None])
        wb = ws.b[:rows, :vb]
        torch.exp(wa, out=wb)
        if single:
            pb = None
        else:
            local = target - c0
            pb = (local, (local >= 0) & (local < vb))
        _write_grad(
            wb, dst[..., c0:c1], scale, beta, wa if beta is not None else None, co, target, pb, prep, c0, c1
        )


def grad_pass(
    logits: torch.Tensor,
    out: torch.Tensor,
    prep: Prepared,
    plan: Plan,
    rs: RowStats,
    co: rowmath.GradCoefficients,
) -> None:
    """Write G for every row into ``out`` (shaped like ``logits``; may be ``logits`` itself)."""
    n = prep.valid.numel()
    ws = _Workspace(plan, n, prep.dtype, logits.device)
    scale, beta = rowmath.shifted_coefficients(co, rs)
    for ch in _chunks(logits, plan.rows_per_chunk):
        sl = slice(ch.r0, ch.r1)
        rco = rowmath.GradCoefficients(
            alpha=co.alpha[sl],
            beta=None if co.beta is None else co.beta[sl],
            gamma=None if co.gamma is None else co.gamma[sl],
            g_target=co.g_target[sl],
        )
        # In place, src and dst are the same storage: each block is read into the workspace before it is written.
        _grad_chunk(
            ch.view(logits),
            ch.view(out),
            ws,
            ch.rows,
            rs.shift[sl],
            scale[sl],
            None if beta is None else beta[sl],
            rco,
            prep.target[sl],
            prep,
            plan,
            ch.r0,
            ch.r1,
        )


# ------------------------------------------------------------------------------------------------------------
# Masked outputs and the autograd Functions.
# ------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StatFields:
    """The masked per-row outputs of one pass, flat ``(n,)``: the fields of ``TokenStats`` without ``valid``.

    Float fields are exactly 0 at invalid rows and NaN at valid rows with an out-of-range target.
    """

    lse: torch.Tensor
    target_logit: torch.Tensor
    nll: torch.Tensor
    log1m_target_prob: torch.Tensor
    support_mean_logit: torch.Tensor
    entropy: torch.Tensor
    wrong_entropy: torch.Tensor
    support_gap: torch.Tensor
    argmax: torch.Tensor
    correct: torch.Tensor
    bad: torch.Tensor

    FLOATS = TokenStats.FLOAT_FIELDS


def masked_fields(prep: Prepared, argmax: torch.Tensor, **raw: torch.Tensor) -> StatFields:
    """``StatFields`` from raw (unmasked) per-row statistics; shared by every implementation.

    ``raw`` holds the float fields of ``StatFields`` by name. They become 0 at invalid rows and NaN at
    out-of-range targets; ``argmax`` becomes −1 at invalid rows; ``correct`` and ``bad`` (§3.7: a valid row
    with an out-of-range target or a non-finite lse / target logit) are derived here.
    """
    valid, oob = prep.valid, prep.out_of_range
    lse, zy = raw["lse"], raw["target_logit"]
    zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
    nan = torch.full((), float("nan"), dtype=lse.dtype, device=lse.device)
    floats = {k: torch.where(oob, nan, torch.where(valid, raw[k], zero)) for k in StatFields.FLOATS}
    argmax = torch.where(valid, argmax, torch.full_like(argmax, -1))
    return StatFields(
        **floats,
        argmax=argmax,
        correct=valid & ~oob & (argmax == prep.target),
        bad=valid & (oob | ~torch.isfinite(lse) | ~torch.isfinite(zy)),
    )


def finish(rs: RowStats, prep: Prepared) -> StatFields:
    """Mask the raw row statistics of a pass (``masked_fields``); the support mean is ``z_y + a/K``."""
    return masked_fields(
        prep,
        rs.argmax,
        lse=rs.lse,
        target_logit=rs.target_logit,
        nll=rs.nll,
        log1m_target_prob=rs.log1m,
        support_mean_logit=rs.target_logit + rs.support_gap,
        entropy=rs.entropy,
        wrong_entropy=rs.wrong_entropy,
        support_gap=rs.support_gap,
    )


def _masked_constants(rs: RowStats, valid: torch.Tensor) -> RowStats:
    """Row constants for the backward with invalid rows zeroed, so no NaN of an ignored row can leak."""
    zero = torch.zeros((), dtype=rs.lse.dtype, device=rs.lse.device)

    def m(x: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, x, zero)

    return RowStats(
        lse=m(rs.lse),
        target_logit=zero,
        nll=m(rs.nll),
        log1m=m(rs.log1m),
        support_gap=zero,
        entropy=m(rs.entropy),
        wrong_entropy=m(rs.wrong_entropy),
        argmax=rs.argmax,
        shift=m(rs.shift),
        log_d=m(rs.log_d),
        inv_d=m(rs.inv_d),
        p_y=m(rs.p_y),
        one_minus_p_y=m(rs.one_minus_p_y),
    )


def _mask_coefficients(co: rowmath.GradCoefficients, valid: torch.Tensor) -> rowmath.GradCoefficients:
    zero = torch.zeros((), dtype=co.alpha.dtype, device=co.alpha.device)

    def m(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else torch.where(valid, x, zero)

    return rowmath.GradCoefficients(m(co.alpha), m(co.beta), m(co.gamma), m(co.g_target))


def _check_once_differentiable() -> None:
    if torch.is_grad_enabled():
        raise LossInputError(_DOUBLE_BACKWARD_MESSAGE)


class TokenStatsFunction(torch.autograd.Function):
    """Deferred mode (§4.1): forward streams the statistics and saves row constants; backward is one pass.

    Outputs: the float fields of ``TokenStats`` (``FLOAT_FIELDS`` order), then argmax, correct, bad.
    """

    @staticmethod
    def forward(ctx, logits, prep: Prepared, plan: Plan, inplace: bool):
        rs = stats_pass(logits, prep, plan)
        f = finish(rs, prep)
        ctx.save_for_backward(logits)
        ctx.prep, ctx.plan, ctx.inplace = prep, plan, inplace
        ctx.rs = _masked_constants(rs, prep.valid)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(f.argmax, f.correct, f.bad)
        return tuple(getattr(f, k) for k in StatFields.FLOATS) + (f.argmax, f.correct, f.bad)

    @staticmethod
    def backward(ctx, g_lse, g_zy, g_nll, g_l1m, g_mean, g_h, g_hq, g_gap, *_):
        _check_once_differentiable()
        (logits,) = ctx.saved_tensors
        prep: Prepared = ctx.prep
        valid = prep.valid
        zero = torch.zeros((), dtype=prep.dtype, device=logits.device)

        def flat(g):
            return None if g is None else torch.where(valid, g.reshape(-1).to(prep.dtype), zero)

        g_lse, g_zy, g_nll, g_l1m, g_mean, g_h, g_hq, g_gap = map(
            flat, (g_lse, g_zy, g_nll, g_l1m, g_mean, g_h, g_hq, g_gap)
        )
        if g_gap is not None:  # support_gap = support mean − z_y
            g_mean = g_gap if g_mean is None else g_mean + g_gap
            g_zy = -g_gap if g_zy is None else g_zy - g_gap
        co = rowmath.stats_grad_coefficients(
            ctx.rs,
            prep.target_in_support,
            prep.num_support,
            g_lse=g_lse,
            g_zy=g_zy,
            g_nll=g_nll,
            g_l1m=g_l1m,
            g_mean=g_mean,
            g_h=g_h,
            g_hq=g_hq,
        )
        co = _mask_coefficients(co, valid)
        out = logits if ctx.inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad_pass(logits, out, prep, ctx.plan, ctx.rs, co)
        if ctx.inplace:
            torch.autograd.graph.increment_version(logits)
        return out, None, None, None


def fused_token_terms(f: StatFields, sm: Smoothing, z_loss: float) -> torch.Tensor:
    """Per-token ``CE_ε + λ·lse²`` from the fields: ``nll − ε_t·(K/K_t)·support_gap + λ·lse²`` (§3.3)."""
    loss = f.nll
    if sm.eps_t is not None:
        loss = rowmath.smoothed_nll(f.nll, f.support_gap, sm.eps_t * sm.k_ratio)
    if z_loss != 0.0:
        loss = loss + z_loss * f.lse * f.lse
    return loss


def _host_scalar(x) -> float | None:
    """The value of a float or of a CPU 0-d tensor, read without a device sync; None for device tensors.

    A CPU tensor lives in host memory, so reading it stalls nothing; numpy reads it without going through
    the dispatcher (no ``aten._local_scalar_dense``), so the no-sync guard stays meaningful for device reads.
    """
    if not isinstance(x, torch.Tensor):
        return float(x)
    if x.device.type != "cpu":
        return None
    try:
        return float(x.detach().numpy())
    except (ImportError, RuntimeError, TypeError):
        return None


class FusedTokenLossFunction(torch.autograd.Function):
    """Eager mode (§4.1): G for an upstream of ``grad_scale`` is written in the forward, chunk by chunk.

    Backward only checks the upstream: equal to ``grad_scale`` → G as is; else G is rescaled in place. A
    second backward (``retain_graph``) raises: the buffer was handed to autograd by the first.
    Outputs: loss, token_loss, then the ``StatFields`` in order (all but the loss non-differentiable).
    """

    @staticmethod
    def forward(
        ctx,
        logits,
        token_weight,
        prep: Prepared,
        plan: Plan,
        sm: Smoothing,
        z_loss: float,
        normalizer,
        grad_scale,
        inplace: bool,
    ):
        valid = prep.valid
        dt = prep.dtype
        zero = torch.zeros((), dtype=dt, device=logits.device)
        w = None if token_weight is None else torch.where(valid, token_weight.reshape(-1).to(dt), zero)
        coef = torch.where(valid, torch.ones((), dtype=dt, device=logits.device), zero) if w is None else w
        if isinstance(grad_scale, torch.Tensor):
            coef = coef * grad_scale.to(dt)
        elif grad_scale != 1.0:
            coef = coef * float(grad_scale)
        if normalizer is not None:
            coef = coef / normalizer.to(dt)
        if inplace:
            out = logits
        else:
            out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)

        def coefficients(rs: RowStats, sl: slice) -> rowmath.GradCoefficients:
            co = rowmath.fused_grad_coefficients(
                rs,
                coef[sl],
                None if sm.eps_t is None else sm.eps_t[sl],
                None if sm.eps_t is None else sm.eps_over_kt[sl],
                None if sm.eps_t is None else sm.target_in_at[sl],
                z_loss,
            )
            return _mask_coefficients(co, valid[sl])

        rs = stats_pass(logits, prep, plan, _Eager(out, coefficients))
        f = finish(rs, prep)
        token_loss = fused_token_terms(f, sm, z_loss)
        weighted = token_loss if w is None else token_loss * w
        loss = torch.where(valid, weighted, zero).sum()
        if normalizer is not None:
            loss = loss / normalizer.to(dt)
        if inplace:
            torch.autograd.graph.increment_version(logits)
        ctx.grad = out
        ctx.grad_scale = grad_scale
        ctx.has_weight_grad = token_weight is not None and ctx.needs_input_grad[1]
        if ctx.has_weight_grad:
            ctx.token_loss = token_loss
            ctx.valid = valid
            ctx.normalizer = normalizer
            ctx.weight_meta = (token_weight.shape, token_weight.dtype)
        outs = (token_loss,) + tuple(getattr(f, k) for k in StatFields.FLOATS) + (f.argmax, f.correct, f.bad)
        ctx.mark_non_differentiable(*outs)
        return (loss,) + outs

    @staticmethod
    def backward(ctx, g_loss, *_):
        _check_once_differentiable()
        grad = ctx.grad
        if grad is None:
            raise LossInputError(
                'fused_token_loss(grad_mode="forward") wrote its gradient in the forward and released it at the '
                'first backward; a second backward (retain_graph=True) needs fused_token_loss(grad_mode="backward") '
                '(or impl="torch" for kernels.cross_entropy and the loss modules)'
            )
        ctx.grad = None
        if g_loss is None:
            return (None,) * 9
        expected = _host_scalar(ctx.grad_scale)
        actual = _host_scalar(g_loss)
        if expected is not None and actual is not None:
            if actual != expected:
                grad.mul_(actual / expected)
        else:
            # Device scalars: one elementwise rescale (exactly ×1 when they agree), no host read.
            scale = (
                ctx.grad_scale if isinstance(ctx.grad_scale, torch.Tensor) else torch.tensor(ctx.grad_scale)
            )
            grad.mul_((g_loss / scale.to(device=g_loss.device, dtype=g_loss.dtype)).to(grad.dtype))
        g_w = None
        if ctx.has_weight_grad:
            zero = torch.zeros((), dtype=ctx.token_loss.dtype, device=ctx.token_loss.device)
            g_w = torch.where(ctx.valid, ctx.token_loss * g_loss.to(ctx.token_loss.dtype), zero)
            if ctx.normalizer is not None:
                g_w = g_w / ctx.normalizer.to(g_w.dtype)
            g_w = g_w.reshape(ctx.weight_meta[0]).to(ctx.weight_meta[1])
        return (grad if ctx.needs_input_grad[0] else None), g_w, None, None, None, None, None, None, None
