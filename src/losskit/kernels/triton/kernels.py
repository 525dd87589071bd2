"""Triton kernels of the ``triton`` implementation: device functions and ``@jit`` kernels.

One program handles ``ROWS`` rows as a ``(ROWS, BLOCK_V)`` tile and walks the vocabulary in ``BLOCK_V``-wide tiles.
The streaming state (m, d, s, a, argmax) is kept per lane (``d``, ``s``, ``a`` and the argmax candidates are ``(ROWS, BLOCK_V)``
arrays; the running max ``m`` is one value per row shared by the lanes), so each lane sums only ``V / BLOCK_V``
terms and the lanes are merged once per row at the end with plain sums. The target column is excluded from
``m``, ``d``, ``s`` and the argmax, and adds exactly 0 to ``a = Σ_{i∈A} (z_i − z_y)``.

The kernels compute what ``rowmath.finalize``, ``rowmath.stats_grad_coefficients``,
``rowmath.shifted_coefficients`` and ``rowmath.fused_grad_coefficients`` compute in torch (the ``chunked``
implementation), per row inside the program:

* ``_token_stats_kernel``: pass 1 only; writes the masked statistics and the backward's row constants.
* ``_token_grad_kernel``: deferred backward; folds the upstream gradients (per row or broadcast, any stride) into
  each row's coefficients and writes ``G_j = e^{z_j − m}(α' + β'(z_j − m)) + γ[j∈A]``, target column exact.
* ``_fused_loss_kernel``: eager mode; pass 1, then pass 2 over the same rows in reverse tile order (most recently
  read tiles first, from L2), writing G for the upstream ``grad_scale``.
* ``_grad_rescale_kernel``: the guarded rescale of eager mode's backward (returns at once when the actual
  upstream equals the expected one).

Device functions avoid libdevice (the interpreter has none): ``log1p`` is written out, and the per-row
exponentials ``p_y = e^{−sp₋}``, ``1 − p_y = e^{−sp₊}`` use a Cody–Waite split so that they keep full relative
precision even when the result is subnormal. −∞ logits are clamped to ``NEG_LARGE`` (as in ``chunked``) so that
every product ``e·(z − m)`` with ``e = 0`` is an exact 0; clamps are written with ``where`` so NaN propagates
(``maximum`` may drop NaN on the GPU) and a NaN logit still makes its row ``bad``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from losskit.kernels.rowmath import NEG_LARGE as _NEG_LARGE_VALUE

NEG_LARGE: tl.constexpr = tl.constexpr(_NEG_LARGE_VALUE)
_LN2_HI: tl.constexpr = tl.constexpr(0.693145751953125)  # ln 2 with 12 trailing zero bits: k·LN2_HI is exact
_LN2_LO: tl.constexpr = tl.constexpr(1.428606765330187e-06)
_LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
_BIG_INDEX: tl.constexpr = tl.constexpr(2**31 - 1)

# Rows of the constants buffer written by _token_stats_kernel for the deferred backward (fp32, 0 at invalid rows).
C_SHIFT, C_LOG_D, C_INV_D, C_P_Y, C_OM, C_NLL, C_LOG1M, C_H, C_HQ = range(9)
NUM_CONSTS = 9


@triton.jit
def _log1p(u):
    """``ln(1 + u)`` for ``u ≥ 0``: ``w = 1 + u``; ``u`` if ``w == 1`` else ``ln(w)·u/(w − 1)`` (max rel. err 2.8e-7)."""
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))


@triton.jit
def _is_nan(x):
    return x != x  # noqa: PLR0124 - the portable NaN test (no libdevice)


@triton.jit
def _softplus(x):
    """``max(x, 0) + log1p(e^{−|x|})``; ``±inf`` give ``inf``/``0``, NaN propagates through the second term."""
    return tl.where(x > 0.0, x, 0.0) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _exp_row(x):
    """``e^x`` for ``x ≤ 0`` with full relative precision down to subnormal results (per-row scalars only).

    ``x = k·ln2 + r`` with ``|r| ≤ ln2/2`` (Cody–Waite, exact ``k·LN2_HI``), ``e^x = e^r·2^{k₁}·2^{k₂}``; the two
    halves of ``2^k`` stay normal, so only the final product rounds into the subnormal range.
    """
    xc = tl.where(x < -200.0, -200.0, x)  # e^-200 is 0 in fp32; keeps k finite (x = −inf gives 0)
    k = tl.floor(xc * _LOG2E + 0.5)
    r = (xc - k * _LN2_HI) - k * _LN2_LO
    k1 = tl.floor(k * 0.5)
    e = tl.exp(r) * tl.exp2(k1) * tl.exp2(k - k1)
    return tl.where(x < -200.0, 0.0, e)


@triton.jit
def _row_offsets(r, T, sB, sT):
    """int64 element offset of flat row ``r`` of a ``(B, T, V)`` tensor with row strides ``sB``, ``sT``."""
    r64 = r.to(tl.int64)
    return (r64 // T) * sB + (r64 % T) * sT


@triton.jit
def _not_excluded(excl_ptr, c, cmask, HAS_EXCL: tl.constexpr):
    """``[c ∈ A]``: bit ``c`` of the packed exclusion bitmask is clear (always true without exclusions)."""
    if HAS_EXCL:
        word = tl.load(excl_ptr + (c >> 5), mask=cmask, other=0)
        return ((word >> (c & 31)) & 1) == 0
    else:
        return cmask


@triton.jit
def _sweep(x_ptr, xoff, live, y, zy, V, excl_ptr, BLOCK_V: tl.constexpr, ROWS: tl.constexpr,
           HAS_EXCL: tl.constexpr):
    """Pass 1 over ``ROWS`` rows: the merged state ``(m, d, s, a, Σ_A z, argmax value, argmax index)``.

    ``m`` is the max over non-target columns (``NEG_LARGE`` when none is finite), ``d = Σ e^{z−m}``,
    ``s = Σ e^{z−m}(z−m)`` (non-target, clamped), ``a = Σ_{i∈A, i≠y} (z_i − z_y)`` on the raw logits (−∞ in the
    support gives −∞), ``Σ_A z`` the plain support sum (the support mean needs it: ``z_y + a/K`` cancels when
    ``z_y`` is far from the mean, ``a/K`` itself stays exact under a common offset); the argmax candidate is the
    best non-target column (lowest index on ties, NaN first).
    """
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([ROWS], NEG_LARGE, tl.float32)
    d = tl.zeros([ROWS, BLOCK_V], tl.float32)
    s = tl.zeros([ROWS, BLOCK_V], tl.float32)
    a = tl.zeros([ROWS, BLOCK_V], tl.float32)
    sz = tl.zeros([ROWS, BLOCK_V], tl.float32)
    bv = tl.full([ROWS, BLOCK_V], float("-inf"), tl.float32)
    bi = tl.full([ROWS, BLOCK_V], _BIG_INDEX, tl.int32)
    y2 = y[:, None]
    zy2 = zy[:, None]
    for t in range(tl.cdiv(V, BLOCK_V)):
        c = t * BLOCK_V + cols
        cmask = c < V
        ld = live[:, None] & cmask[None, :]
        z = tl.load(x_ptr + xoff[:, None] + c[None, :], mask=ld, other=float("-inf"),
                    eviction_policy="evict_last").to(tl.float32)
        is_y = c[None, :] == y2
        drop = is_y | (z < NEG_LARGE)  # target column, −∞ logits and masked lanes (loaded as −∞)
        zc = tl.where(drop, NEG_LARGE, z)
        m_new = tl.maximum(m, tl.max(zc, axis=1))
        u = zc - m_new[:, None]
        e = tl.where(drop, 0.0, tl.exp(u))
        dm = (m - m_new)[:, None]
        r = tl.exp(dm)
        s = r * (s + dm * d) + e * u
        d = r * d + e
        m = m_new
        in_a = _not_excluded(excl_ptr, c, cmask, HAS_EXCL)[None, :] & ld
        a += tl.where(in_a & ~is_y, z - zy2, 0.0)
        sz += tl.where(in_a, z, 0.0)
        cand = tl.where(is_y | ~ld, float("-inf"), zc)
        take = (cand > bv) | (_is_nan(cand) & ~_is_nan(bv))
        bv = tl.where(take, cand, bv)
        bi = tl.where(take, c[None, :], bi)
    d_row = tl.sum(d, axis=1)
    s_row = tl.sum(s, axis=1)
    a_row = tl.sum(a, axis=1)
    sz_row = tl.sum(sz, axis=1)
    lane_nan = _is_nan(bv)
    has_nan = tl.max(lane_nan.to(tl.int32), axis=1) > 0
    vmax = tl.max(tl.where(lane_nan, float("-inf"), bv), axis=1)
    idx_max = tl.min(tl.where(bv == vmax[:, None], bi, _BIG_INDEX), axis=1)
    idx_nan = tl.min(tl.where(lane_nan, bi, _BIG_INDEX), axis=1)
    amax_val = tl.where(has_nan, float("nan"), vmax)
    amax_idx = tl.where(has_nan, idx_nan, idx_max)
    return m, d_row, s_row, a_row, sz_row, amax_val, amax_idx


@triton.jit
def _finalize(m, d, s, a, sz, amax_val, amax_idx, zy, y, K):
    """The closed-form statistics (as ``rowmath.finalize``), without cancellation.

    ``δ = (z_y − m) − ln d`` (never a difference of two large rounded sums), ``sp± = softplus(±δ)``,
    ``lse = m + max(ln d, z_y − m) + log1p(e^{−|δ|})``, ``nll = sp₋``, ``ln(1 − p_y) = −sp₊``,
    ``H(q) = ln d − s/d``, ``H(p) = p_y·sp₋ + (1 − p_y)(sp₊ + H(q))``; a degenerate row (d = 0) gives
    ``lse = z_y``, ``nll = 0``, ``H = H(q) = 0``. Returns the statistics and the backward's row constants.
    """
    has_wrong = d != 0.0  # NaN counts (keeps a NaN logit's row NaN, hence bad)
    shift = tl.where(has_wrong, m, 0.0)
    d_safe = tl.where(has_wrong, d, 1.0)
    log_d = tl.where(has_wrong, tl.log(d_safe), 0.0)
    inv_d = tl.where(has_wrong, 1.0 / d_safe, 0.0)
    rel_y = zy - shift
    ln_d = tl.where(has_wrong, log_d, float("-inf"))
    delta = tl.where(has_wrong, rel_y - ln_d, float("inf"))  # d = 0: p_y = 1 whatever z_y is (even −∞)
    sp_pos = _softplus(delta)
    sp_neg = _softplus(-delta)
    lse = tl.where(has_wrong, shift + tl.maximum(ln_d, rel_y) + _log1p(tl.exp(-tl.abs(delta))), zy)
    p_y = _exp_row(-sp_neg)
    om = _exp_row(-sp_pos)
    hq = tl.where(has_wrong, log_d - s * inv_d, 0.0)
    h = p_y * sp_neg + tl.where(om > 0.0, om * (sp_pos + hq), 0.0)
    k_safe = tl.where(K > 0.0, K, 1.0)
    a_over_k = tl.where(K > 0.0, a / k_safe, 0.0)
    mean = tl.where(K > 0.0, sz / k_safe, zy)
    zy_c = tl.where(zy < NEG_LARGE, NEG_LARGE, zy)
    y32 = y.to(tl.int32)
    y_wins = (zy_c > amax_val) | ((zy_c == amax_val) & (y32 < amax_idx))
    y_wins = y_wins | (_is_nan(zy) & (~_is_nan(amax_val) | (y32 < amax_idx)))
    argmax = tl.where(y_wins, y32, amax_idx)
    return lse, sp_neg, -sp_pos, a_over_k, mean, h, hq, argmax, shift, log_d, inv_d, p_y, om


@triton.jit
def _store_fields(r, rmask, valid, oob, zy, lse, nll, log1m, a_over_k, mean, h, hq, argmax, y,
                  lse_ptr, zy_ptr, nll_ptr, l1m_ptr, mean_ptr, h_ptr, hq_ptr, ak_ptr, amax_ptr, correct_ptr,
                  bad_ptr):
    """Masked outputs (as ``chunked.masked_fields``): 0 at invalid rows, NaN at out-of-range targets; argmax −1 at
    invalid rows; ``correct``; ``bad`` = valid and (out of range or non-finite lse / target logit)."""
    nan = float("nan")
    tl.store(lse_ptr + r, tl.where(oob, nan, tl.where(valid, lse, 0.0)), mask=rmask)
    tl.store(zy_ptr + r, tl.where(oob, nan, tl.where(valid, zy, 0.0)), mask=rmask)
    tl.store(nll_ptr + r, tl.where(oob, nan, tl.where(valid, nll, 0.0)), mask=rmask)
    tl.store(l1m_ptr + r, tl.where(oob, nan, tl.where(valid, log1m, 0.0)), mask=rmask)
    tl.store(mean_ptr + r, tl.where(oob, nan, tl.where(valid, mean, 0.0)), mask=rmask)
    tl.store(h_ptr + r, tl.where(oob, nan, tl.where(valid, h, 0.0)), mask=rmask)
    tl.store(hq_ptr + r, tl.where(oob, nan, tl.where(valid, hq, 0.0)), mask=rmask)
    tl.store(ak_ptr + r, tl.where(oob, nan, tl.where(valid, a_over_k, 0.0)), mask=rmask)
    am = tl.where(valid, argmax.to(tl.int64), -1)
    tl.store(amax_ptr + r, am, mask=rmask)
    tl.store(correct_ptr + r, valid & ~oob & (am == y), mask=rmask)
    finite = (tl.abs(lse) < float("inf")) & (tl.abs(zy) < float("inf"))
    tl.store(bad_ptr + r, valid & (oob | ~finite), mask=rmask)


@triton.jit
def _load_rows(tgt_ptr, valid_ptr, oob_ptr, x_ptr, pid, n, T, sB, sT, ROWS: tl.constexpr):
    """Row indices, validity, flags, clamped targets and ``z_y`` (loaded once, before the sweep)."""
    r = pid * ROWS + tl.arange(0, ROWS)
    rmask = r < n
    valid = tl.load(valid_ptr + r, mask=rmask, other=0) != 0
    oob = tl.load(oob_ptr + r, mask=rmask, other=0) != 0
    y = tl.load(tgt_ptr + r, mask=rmask, other=0)
    xoff = _row_offsets(r, T, sB, sT)
    zy = tl.load(x_ptr + xoff + y, mask=valid, other=0.0).to(tl.float32)
    return r, rmask, valid, oob, y, xoff, zy


@triton.jit
def _token_stats_kernel(
    x_ptr, T, sB, sT, n, V, tgt_ptr, valid_ptr, oob_ptr, excl_ptr, K,
    lse_ptr, zy_ptr, nll_ptr, l1m_ptr, mean_ptr, h_ptr, hq_ptr, ak_ptr, amax_ptr, correct_ptr, bad_ptr,
    const_ptr,
    BLOCK_V: tl.constexpr, ROWS: tl.constexpr, HAS_EXCL: tl.constexpr, WRITE_CONSTS: tl.constexpr,
):
    """Pass 1: every statistic of ``token_stats`` for ``ROWS`` rows, plus (``WRITE_CONSTS``) the backward's row constants
    ``const[k, r]`` (k = ``C_SHIFT`` … ``C_HQ``; 0 at invalid rows)."""
    pid = tl.program_id(0)
    r, rmask, valid, oob, y, xoff, zy = _load_rows(tgt_ptr, valid_ptr, oob_ptr, x_ptr, pid, n, T, sB, sT, ROWS)
    m, d, s, a, sz, av, ai = _sweep(x_ptr, xoff, valid, y, zy, V, excl_ptr, BLOCK_V, ROWS, HAS_EXCL)
    lse, nll, log1m, a_over_k, mean, h, hq, argmax, shift, log_d, inv_d, p_y, om = _finalize(
        m, d, s, a, sz, av, ai, zy, y, K)
    _store_fields(r, rmask, valid, oob, zy, lse, nll, log1m, a_over_k, mean, h, hq, argmax, y,
                  lse_ptr, zy_ptr, nll_ptr, l1m_ptr, mean_ptr, h_ptr, hq_ptr, ak_ptr, amax_ptr, correct_ptr,
                  bad_ptr)
    if WRITE_CONSTS:
        tl.store(const_ptr + C_SHIFT * n + r, tl.where(valid, shift, 0.0), mask=rmask)
        tl.store(const_ptr + C_LOG_D * n + r, tl.where(valid, log_d, 0.0), mask=rmask)
        tl.store(const_ptr + C_INV_D * n + r, tl.where(valid, inv_d, 0.0), mask=rmask)
        tl.store(const_ptr + C_P_Y * n + r, tl.where(valid, p_y, 0.0), mask=rmask)
        tl.store(const_ptr + C_OM * n + r, tl.where(valid, om, 0.0), mask=rmask)
        tl.store(const_ptr + C_NLL * n + r, tl.where(valid, nll, 0.0), mask=rmask)
        tl.store(const_ptr + C_LOG1M * n + r, tl.where(valid, log1m, 0.0), mask=rmask)
        tl.store(const_ptr + C_H * n + r, tl.where(valid, h, 0.0), mask=rmask)
        tl.store(const_ptr + C_HQ * n + r, tl.where(valid, hq, 0.0), mask=rmask)


@triton.jit
def _upstream(g_ptr, g_stride, r, live, HAS: tl.constexpr):
    """Per-row upstream gradient (0 at rows that are not live, and when the field is unused)."""
    if HAS:
        return tl.load(g_ptr + r.to(tl.int64) * g_stride, mask=live, other=0.0).to(tl.float32)
    else:
        return tl.zeros(r.shape, tl.float32)


@triton.jit
def _write_grad(x_ptr, xoff, out_ptr, ooff, rmask, live, y, shift, alpha, beta, gamma, g_target, V, excl_ptr,
                BLOCK_V: tl.constexpr, ROWS: tl.constexpr, HAS_EXCL: tl.constexpr, HAS_BETA: tl.constexpr,
                HAS_GAMMA: tl.constexpr, REVERSE: tl.constexpr):
    """Pass 2: ``G_j = e^{z_j − shift}(α + β(z_j − shift)) + γ[j∈A]`` for j ≠ y, ``G_y = g_target``; rows that
    are not live get exact zeros (they are not read). ``REVERSE`` walks the tiles last to first."""
    cols = tl.arange(0, BLOCK_V)
    nt = tl.cdiv(V, BLOCK_V)
    y2 = y[:, None]
    for k in range(nt):
        if REVERSE:
            t = nt - 1 - k
        else:
            t = k
        c = t * BLOCK_V + cols
        cmask = c < V
        ld = live[:, None] & cmask[None, :]
        z = tl.load(x_ptr + xoff[:, None] + c[None, :], mask=ld, other=float("-inf"),
                    eviction_policy="evict_first").to(tl.float32)
        drop = z < NEG_LARGE
        w = tl.where(drop, NEG_LARGE, z) - shift[:, None]
        e = tl.where(drop, 0.0, tl.exp(w))
        if HAS_BETA:
            g = e * (alpha[:, None] + beta[:, None] * w)
        else:
            g = e * alpha[:, None]
        if HAS_GAMMA:
            in_a = _not_excluded(excl_ptr, c, cmask, HAS_EXCL)
            g = g + tl.where(in_a[None, :], gamma[:, None], 0.0)
        g = tl.where(c[None, :] == y2, g_target[:, None], g)
        g = tl.where(ld, g, 0.0)
        st = rmask[:, None] & cmask[None, :]
        tl.store(out_ptr + ooff[:, None] + c[None, :], g.to(out_ptr.dtype.element_ty), mask=st,
                 eviction_policy="evict_first")


@triton.jit
def _token_grad_kernel(
    x_ptr, T, sB, sT, out_ptr, oB, oT, n, V, tgt_ptr, valid_ptr, excl_ptr, K, const_ptr,
    g_lse_ptr, s_lse, g_zy_ptr, s_zy, g_nll_ptr, s_nll, g_l1m_ptr, s_l1m, g_mean_ptr, s_mean, g_h_ptr, s_h,
    g_hq_ptr, s_hq, g_ak_ptr, s_ak,
    BLOCK_V: tl.constexpr, ROWS: tl.constexpr, HAS_EXCL: tl.constexpr,
    HAS_LSE: tl.constexpr, HAS_ZY: tl.constexpr, HAS_NLL: tl.constexpr, HAS_L1M: tl.constexpr,
    HAS_MEAN: tl.constexpr, HAS_H: tl.constexpr, HAS_HQ: tl.constexpr, HAS_AK: tl.constexpr,
    HAS_BETA: tl.constexpr, HAS_GAMMA: tl.constexpr,
):
    """Deferred backward: upstream gradients of the fields → per-row coefficients → one pass writing G.

    As ``rowmath.stats_grad_coefficients`` followed by ``rowmath.shifted_coefficients``; ``a/K`` (support mean
    − z_y) folds into ``g_mean`` and ``g_zy``. Unused fields are compile-time zeros.
    """
    pid = tl.program_id(0)
    r = pid * ROWS + tl.arange(0, ROWS)
    rmask = r < n
    valid = tl.load(valid_ptr + r, mask=rmask, other=0) != 0
    y = tl.load(tgt_ptr + r, mask=rmask, other=0)
    g_lse = _upstream(g_lse_ptr, s_lse, r, valid, HAS_LSE)
    g_zy = _upstream(g_zy_ptr, s_zy, r, valid, HAS_ZY)
    g_nll = _upstream(g_nll_ptr, s_nll, r, valid, HAS_NLL)
    g_l1m = _upstream(g_l1m_ptr, s_l1m, r, valid, HAS_L1M)
    g_mean = _upstream(g_mean_ptr, s_mean, r, valid, HAS_MEAN)
    g_h = _upstream(g_h_ptr, s_h, r, valid, HAS_H)
    g_hq = _upstream(g_hq_ptr, s_hq, r, valid, HAS_HQ)
    g_ak = _upstream(g_ak_ptr, s_ak, r, valid, HAS_AK)
    g_mean = g_mean + g_ak
    g_zy = g_zy - g_ak
    shift = tl.load(const_ptr + C_SHIFT * n + r, mask=valid, other=0.0)
    log_d = tl.load(const_ptr + C_LOG_D * n + r, mask=valid, other=0.0)
    inv_d = tl.load(const_ptr + C_INV_D * n + r, mask=valid, other=0.0)
    p_y = tl.load(const_ptr + C_P_Y * n + r, mask=valid, other=0.0)
    om = tl.load(const_ptr + C_OM * n + r, mask=valid, other=0.0)
    nll = tl.load(const_ptr + C_NLL * n + r, mask=valid, other=0.0)
    log1m = tl.load(const_ptr + C_LOG1M * n + r, mask=valid, other=0.0)
    h = tl.load(const_ptr + C_H * n + r, mask=valid, other=0.0)
    hq = tl.load(const_ptr + C_HQ * n + r, mask=valid, other=0.0)
    # A degenerate row (every non-target logit −∞: d = 0, so 1/d = 0) has ln(1 − p_y) = −∞ and H = H(q) = 0
    # whatever z_y is: those terms contribute exactly 0 there (no 0·∞), so its gradient stays finite.
    has_wrong = inv_d != 0.0
    g_lin = g_lse + g_nll
    alpha = om * g_lin
    g_target = g_lse + g_zy - g_lin * om
    beta = tl.zeros([ROWS], tl.float32)
    if HAS_H:
        alpha = alpha - tl.where(has_wrong, g_h * om * (h + log1m), 0.0)
        beta = beta - g_h * om
        g_target = g_target + g_h * p_y * (nll - h)
    if HAS_HQ:
        alpha = alpha - g_hq * hq
        beta = beta - g_hq
    if HAS_L1M:
        alpha = alpha + g_l1m * p_y
        g_target = g_target - tl.where(has_wrong, g_l1m * p_y, 0.0)
    gamma = tl.where(K > 0.0, g_mean / tl.where(K > 0.0, K, 1.0), 0.0)
    if HAS_GAMMA:
        if HAS_EXCL:
            y_in_a = _not_excluded(excl_ptr, y.to(tl.int32), rmask, HAS_EXCL)
            g_target = g_target + tl.where(y_in_a, gamma, 0.0)
        else:
            g_target = g_target + gamma
    # shifted_coefficients: q(α + βu) with u = w − ln d and q = e^w/d
    alpha_s = (alpha - beta * log_d) * inv_d
    beta_s = beta * inv_d
    xoff = _row_offsets(r, T, sB, sT)
    ooff = _row_offsets(r, T, oB, oT)
    _write_grad(x_ptr, xoff, out_ptr, ooff, rmask, valid, y, shift, alpha_s, beta_s, gamma,
                tl.where(valid, g_target, 0.0), V, excl_ptr, BLOCK_V, ROWS, HAS_EXCL, HAS_BETA, HAS_GAMMA, False)


@triton.jit
def _fused_loss_kernel(
    x_ptr, T, sB, sT, out_ptr, oB, oT, n, V, tgt_ptr, valid_ptr, oob_ptr, excl_ptr, K,
    w_ptr, grad_scale, gs_ptr, norm_ptr, eps_ptr, eko_ptr, tin_ptr, z_loss,
    row_loss_ptr, token_loss_ptr,
    lse_ptr, zy_ptr, nll_ptr, l1m_ptr, mean_ptr, h_ptr, hq_ptr, ak_ptr, amax_ptr, correct_ptr, bad_ptr,
    BLOCK_V: tl.constexpr, ROWS: tl.constexpr, HAS_EXCL: tl.constexpr, HAS_W: tl.constexpr,
    GS_PTR: tl.constexpr, HAS_NORM: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_Z: tl.constexpr,
):
    """Eager mode: stats and per-token loss in pass 1, G for the upstream ``grad_scale`` in pass 2.

    ``c_t = v_t·w_t·grad_scale/normalizer``; j ≠ y: ``G_j = c_t[(1 + 2λ·lse)·p_j − (ε_t/K_t)[j∈A]]``;
    ``G_y = c_t[ε_t − (1 − p_y) + 2λ·lse·p_y − (ε_t/K_t)[y∈A_t]]`` (as ``rowmath.fused_grad_coefficients``).
    Per token ``CE_ε + λ·lse² = nll − (ε_t/K_t)·a + λ·lse²`` (``token_loss``) and ``v_t·w_t·(…)`` (``row_loss``).
    """
    pid = tl.program_id(0)
    r, rmask, valid, oob, y, xoff, zy = _load_rows(tgt_ptr, valid_ptr, oob_ptr, x_ptr, pid, n, T, sB, sT, ROWS)
    m, d, s, a, sz, av, ai = _sweep(x_ptr, xoff, valid, y, zy, V, excl_ptr, BLOCK_V, ROWS, HAS_EXCL)
    lse, nll, log1m, a_over_k, mean, h, hq, argmax, shift, _, inv_d, p_y, om = _finalize(
        m, d, s, a, sz, av, ai, zy, y, K)
    _store_fields(r, rmask, valid, oob, zy, lse, nll, log1m, a_over_k, mean, h, hq, argmax, y,
                  lse_ptr, zy_ptr, nll_ptr, l1m_ptr, mean_ptr, h_ptr, hq_ptr, ak_ptr, amax_ptr, correct_ptr,
                  bad_ptr)
    # Per-token loss from the masked statistics (0 at invalid rows, NaN at out-of-range targets).
    nan = float("nan")
    nll_m = tl.where(oob, nan, tl.where(valid, nll, 0.0))
    lse_m = tl.where(oob, nan, tl.where(valid, lse, 0.0))
    a_m = tl.where(oob, nan, tl.where(valid, a, 0.0))
    loss = nll_m
    if HAS_SMOOTH:
        eps_t = tl.load(eps_ptr + r, mask=rmask, other=0.0)
        eko = tl.load(eko_ptr + r, mask=rmask, other=0.0)
        t_in = tl.load(tin_ptr + r, mask=rmask, other=0.0)
        loss = loss - tl.where(eps_t > 0.0, eko * a_m, 0.0)
    if HAS_Z:
        loss = loss + z_loss * lse_m * lse_m
    tl.store(token_loss_ptr + r, loss, mask=rmask)
    if HAS_W:
        w = tl.load(w_ptr + r, mask=valid, other=0.0).to(tl.float32)
    else:
        w = tl.full([ROWS], 1.0, tl.float32)
    tl.store(row_loss_ptr + r, tl.where(valid, w * loss, 0.0), mask=rmask)
    # Coefficients of G.
    if GS_PTR:
        gs = tl.load(gs_ptr).to(tl.float32)
    else:
        gs = grad_scale
    coef = w * gs
    if HAS_NORM:
        coef = coef / tl.load(norm_ptr).to(tl.float32)
    coef = tl.where(valid, coef, 0.0)
    g_target = -om
    if HAS_Z:
        zl = 1.0 + 2.0 * z_loss * lse
        g_target = g_target + 2.0 * z_loss * lse * p_y
    else:
        zl = tl.full([ROWS], 1.0, tl.float32)
    gamma = tl.zeros([ROWS], tl.float32)
    if HAS_SMOOTH:
        g_target = g_target + eps_t - eko * t_in
        gamma = -coef * eko
    alpha_s = coef * zl * om * inv_d  # p_j = e^{z_j − m}·(1 − p_y)/d
    ooff = _row_offsets(r, T, oB, oT)
    _write_grad(x_ptr, xoff, out_ptr, ooff, rmask, valid, y, shift, alpha_s, alpha_s, gamma,
                tl.where(valid, coef * g_target, 0.0), V, excl_ptr, BLOCK_V, ROWS, HAS_EXCL, False, HAS_SMOOTH,
                True)


@triton.jit
def _grad_rescale_kernel(g_ptr, T, sB, sT, n, V, up_ptr, expected, exp_ptr, EXP_PTR: tl.constexpr,
                         BLOCK_V: tl.constexpr, ROWS: tl.constexpr):
    """``G *= upstream / expected`` for ``ROWS`` rows, skipped entirely when the two scalars are equal."""
    up = tl.load(up_ptr).to(tl.float32)
    if EXP_PTR:
        ex = tl.load(exp_ptr).to(tl.float32)
    else:
        ex = expected
    scale = up / ex
    if scale != 1.0:
        pid = tl.program_id(0)
        r = pid * ROWS + tl.arange(0, ROWS)
        rmask = r < n
        off = _row_offsets(r, T, sB, sT)
        cols = tl.arange(0, BLOCK_V)
        for t in range(tl.cdiv(V, BLOCK_V)):
            c = t * BLOCK_V + cols
            msk = rmask[:, None] & (c < V)[None, :]
            ptr = g_ptr + off[:, None] + c[None, :]
            g = tl.load(ptr, mask=msk, other=0.0).to(tl.float32)
            tl.store(ptr, (g * scale).to(g_ptr.dtype.element_ty), mask=msk)
