"""``kernels.rowmath``: the per-row closed forms of the streaming implementations, against plain torch (fp64).

The oracles here are written from the definitions in the notation header of ``rowmath.py`` (dense
``log_softmax``, ``logsumexp`` and autograd over ``(n, V)`` rows, and 50-digit mpmath where float64 itself is
not accurate enough); none of them calls the streaming code.
"""

from __future__ import annotations

import itertools
import math

import mpmath
import pytest
import torch

from losskit.kernels.rowmath import (
    NEG_LARGE_SUM,
    RowState,
    RowTargets,
    finalize,
    fused_grad_coefficients,
    merge_states,
    shifted_coefficients,
    smoothed_nll,
    softplus,
    stats_grad_coefficients,
)

F64 = torch.float64
NINF = float("-inf")


# ---- softplus ----------------------------------------------------------------------------------------------


def _mp_softplus(x: float) -> float:
    with mpmath.workdps(50):
        return float(mpmath.log1p(mpmath.exp(mpmath.mpf(x))))


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_softplus_is_accurate_everywhere(dtype):
    xs = [-1e30, -800.0, -745.0, -100.0, -40.0, -37.5, -20.0, -3.0, -1e-3, -1e-300, 0.0, 1e-300, 1e-3, 0.5,
          3.0, 17.0, 20.0, 36.0, 40.0, 100.0, 1e4, 1e30]
    x = torch.tensor(xs, dtype=dtype)
    got = softplus(x)
    assert got.dtype == dtype
    tiny = torch.finfo(dtype).tiny
    rel = 4 * torch.finfo(dtype).eps
    for xi, gi in zip(x.tolist(), got.tolist(), strict=True):
        want = _mp_softplus(xi)
        if want < tiny:  # below the smallest normal the rounded input decides; only 0/subnormal is right
            assert 0.0 <= gi <= 2 * tiny, (xi, gi, want)
        else:
            assert abs(gi - want) <= rel * want, (xi, gi, want)
    # the case log(1 + exp(x)) gets wrong: 4.2e-18, not 0
    assert softplus(torch.tensor(-40.0, dtype=dtype)).item() == pytest.approx(math.exp(-40.0), rel=rel)
    assert torch.log1p(torch.exp(torch.tensor(-40.0, dtype=F64))).item() > 0  # (log1p itself is fine)
    assert torch.log(1 + torch.exp(torch.tensor(-40.0, dtype=F64))).item() == 0.0


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.float16, torch.bfloat16])
def test_softplus_of_infinities_and_nan(dtype):
    got = softplus(torch.tensor([float("inf"), NINF, float("nan")], dtype=dtype))
    assert got[0].item() == float("inf") and got[1].item() == 0.0 and math.isnan(got[2].item())


# ---- the state oracle --------------------------------------------------------------------------------------


def block_state(z: torch.Tensor, y: torch.Tensor, cols: torch.Tensor, support: torch.Tensor) -> RowState:
    """The RowState of rows ``z`` (n, V) over the column subset ``cols``, straight from its definition.

    Non-target columns of the block only; ``m = −inf`` and ``d = s = 0`` when none is finite; ``a`` and
    ``support_sum`` over the support columns of the block; the argmax over the block's non-target columns
    (−inf counts as the smallest value, ``amax_val = −inf`` for an empty block, lowest index on ties).
    """
    n = z.shape[0]
    sub = z[:, cols]
    nt = cols[None, :] != y[:, None]
    zc = torch.where(nt, sub, NINF)
    m = zc.amax(1) if cols.numel() else torch.full((n,), NINF, dtype=z.dtype)
    ref = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(zc - ref[:, None])
    d = e.sum(1)
    s = torch.where(e > 0, e * (zc - ref[:, None]), torch.zeros_like(e)).sum(1)
    in_a = support[cols][None, :] & nt
    zy = z.gather(1, y[:, None])
    a = torch.where(in_a, sub - zy, torch.zeros_like(sub)).sum(1)
    support_sum = torch.where(in_a, sub, torch.zeros_like(sub)).sum(1)
    if cols.numel():
        amax_val, pos = zc.max(1)  # first occurrence on ties
        amax_idx = cols[pos]
    else:
        amax_val, amax_idx = torch.full((n,), NINF, dtype=z.dtype), torch.zeros(n, dtype=torch.long)
    return RowState(m=m, d=d, s=s, a=a, support_sum=support_sum, amax_val=amax_val, amax_idx=amax_idx)


def final_state(z, y, support):
    """One-shot state over all columns, with the 0 stand-in for m = −inf that ``finalize`` reads it with."""
    st = block_state(z, y, torch.arange(z.shape[1]), support)
    st.m = torch.where(torch.isfinite(st.m), st.m, torch.zeros_like(st.m))
    return st


def assert_states_equal(got: RowState, want: RowState):
    assert torch.equal(got.m, want.m)
    for name in ("d", "s", "a"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-12, atol=1e-12, msg=name)
    inf = torch.isinf(want.support_sum)
    assert bool((got.support_sum[inf] < NEG_LARGE_SUM).all()) or bool(torch.isinf(got.support_sum[inf]).all())
    torch.testing.assert_close(got.support_sum[~inf], want.support_sum[~inf], rtol=1e-12, atol=1e-12)
    assert torch.equal(got.amax_val, want.amax_val)
    assert torch.equal(got.amax_idx, want.amax_idx)


def random_rows(seed, n=6, v=23, *, ties=False, neg_inf_block=None):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=F64) * 3
    if ties:
        z = z.round()  # integer logits: many ties for the argmax
    y = torch.randint(0, v, (n,), generator=g)
    if neg_inf_block is not None:
        c0, c1 = neg_inf_block
        z[:, c0:c1] = NINF
        z[torch.arange(n), y] = torch.randn(n, generator=g, dtype=F64)  # the target stays finite
    return z, y


# ---- merge_states ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_merge_of_any_split_equals_the_one_shot_state(seed, ties):
    v = 23
    z, y = random_rows(seed, v=v, ties=ties, neg_inf_block=(5, 11) if seed % 2 else None)
    g = torch.Generator().manual_seed(100 + seed)
    support = torch.rand(v, generator=g) > 0.2
    cuts = sorted(torch.randperm(v - 1, generator=g)[: 1 + seed % 4].add(1).tolist())
    bounds = [0, *cuts, v]
    if seed % 2:
        bounds = sorted({*bounds, 5, 11})  # one block holds only −inf columns (target columns aside)
    state = None
    for c0, c1 in itertools.pairwise(bounds):
        st = block_state(z, y, torch.arange(c0, c1), support)
        state = st if state is None else merge_states(state, st)
    assert_states_equal(state, block_state(z, y, torch.arange(v), support))


def test_a_block_of_only_minus_inf_contributes_nothing():
    z, y = random_rows(3, v=12)
    z[:, 4:8] = NINF
    keep = (y < 4) | (y >= 8)
    z, y = z[keep], y[keep]
    support = torch.ones(12, dtype=torch.bool)
    support[4:8] = False  # outside the support, so a and support_sum stay finite
    left = block_state(z, y, torch.arange(0, 4), support)
    dead = block_state(z, y, torch.arange(4, 8), support)
    right = block_state(z, y, torch.arange(8, 12), support)
    assert bool((dead.m == NINF).all()) and bool((dead.d == 0).all()) and bool((dead.s == 0).all())
    for pair in ((left, dead), (dead, left)):
        merged = merge_states(*pair)
        assert not any(bool(torch.isnan(getattr(merged, f)).any()) for f in ("m", "d", "s", "a"))
        assert_states_equal(merged, left)
    both_dead = merge_states(dead, dead)
    assert bool((both_dead.m == NINF).all()) and bool((both_dead.d == 0).all())
    assert bool((both_dead.s == 0).all())
    whole = block_state(z, y, torch.arange(12), support)
    assert_states_equal(merge_states(merge_states(left, dead), right), whole)


def test_merge_keeps_the_first_index_on_ties_and_nan_wins_the_argmax():
    zeros = [torch.zeros(3, dtype=F64) for _ in range(5)]
    one = RowState(*zeros, amax_val=torch.tensor([2.0, 2.0, float("nan")], dtype=F64),
                   amax_idx=torch.tensor([1, 1, 3]))
    two = RowState(*zeros, amax_val=torch.tensor([2.0, float("nan"), 5.0], dtype=F64),
                   amax_idx=torch.tensor([7, 8, 9]))
    merged = merge_states(one, two)
    assert merged.amax_idx.tolist() == [1, 8, 3]  # tie: first; NaN beats a number, as torch.argmax


# ---- finalize ----------------------------------------------------------------------------------------------


def dense_stats(z, y, support):
    """Every closed form of ``finalize`` from log_softmax in float64 (rows with a finite target logit)."""
    v = z.shape[1]
    lp = z.log_softmax(1)
    lse = z.logsumexp(1)
    zy = z.gather(1, y[:, None])[:, 0]
    onehot = torch.nn.functional.one_hot(y, v).bool()
    zw = z.masked_fill(onehot, NINF)
    lneg = zw.logsumexp(1)
    q = zw.softmax(1)
    logq = zw.log_softmax(1).masked_fill(onehot, 0.0)  # q_y = 0: a 0·(−inf) would poison the gradient
    hq = -torch.where(q > 0, q * logq, torch.zeros_like(q)).sum(1)
    hq = torch.where(torch.isfinite(lneg), hq, torch.zeros_like(hq))
    p = lp.exp()
    h = -torch.where(p > 0, p * lp, torch.zeros_like(p)).sum(1)
    k = int(support.sum())
    return {
        "lse": lse,
        "target_logit": zy,
        "nll": -lp.gather(1, y[:, None])[:, 0],
        "log1m": lneg - lse,
        "support_gap": (z[:, support] - zy[:, None]).mean(1),
        "support_mean": z[:, support].sum(1) / k,
        "entropy": h,
        "wrong_entropy": hq,
        "argmax": z.argmax(1),
        "p_y": p.gather(1, y[:, None])[:, 0],
        "one_minus_p_y": torch.where(onehot, torch.zeros_like(p), p).sum(1),
    }


def run_finalize(z, y, support):
    st = final_state(z, y, support)
    rows = RowTargets(target_logit=z.gather(1, y[:, None])[:, 0], target=y, in_support=support[y].to(z.dtype),
                      num_support=int(support.sum()))
    return finalize(st, rows)


def assert_finalize_matches(rs, ref, atol=1e-12):
    for name, want in ref.items():
        got = getattr(rs, name)
        if name == "argmax":
            assert torch.equal(got, want), name
        else:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=atol, msg=name)


@pytest.mark.parametrize(("n", "v", "scale", "offset"),
                         [(7, 2, 1.0, 0.0), (9, 5, 3.0, 0.0), (5, 64, 8.0, 0.0), (6, 33, 2.0, 1e4),
                          (4, 300, 0.01, -50.0)])
@pytest.mark.parametrize("excluded", [(), (0, 1)])
def test_finalize_equals_the_dense_log_softmax_forms(n, v, scale, offset, excluded):
    g = torch.Generator().manual_seed(n * v)
    z = torch.randn(n, v, generator=g, dtype=F64) * scale + offset
    y = torch.randint(0, v, (n,), generator=g)
    support = torch.ones(v, dtype=torch.bool)
    if excluded and v > 2:
        support[list(excluded)] = False
    rs = run_finalize(z, y, support)
    # with an offset of 1e4 the inputs are rounded to 2e-12: that is the float64 reference's error too
    assert_finalize_matches(rs, dense_stats(z, y, support), atol=1e-12 if offset == 0 else 1e-10)
    lneg = z.masked_fill(torch.nn.functional.one_hot(y, v).bool(), NINF).logsumexp(1)
    torch.testing.assert_close(rs.log_d + rs.shift, lneg, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(rs.inv_d, torch.exp(rs.shift - lneg), rtol=1e-12, atol=0)


def test_finalize_argmax_is_the_lowest_index_on_ties_target_included():
    z = torch.tensor([[1.0, 3.0, 3.0, 0.0], [3.0, 1.0, 3.0, 3.0], [2.0, 2.0, 2.0, 2.0], [0.0, 5.0, 1.0, 5.0]],
                     dtype=F64)
    y = torch.tensor([2, 2, 3, 3])
    rs = run_finalize(z, y, torch.ones(4, dtype=torch.bool))
    assert rs.argmax.tolist() == z.argmax(1).tolist() == [1, 0, 0, 1]


def test_finalize_degenerate_rows():
    """Every non-target logit −inf: lse = z_y, nll = 0, ln(1 − p_y) = −inf, H = H(q) = 0, argmax = y."""
    z = torch.full((3, 5), NINF, dtype=F64)
    y = torch.tensor([0, 2, 4])
    z[torch.arange(3), y] = torch.tensor([-3.0, 0.0, 1e4], dtype=F64)
    support = torch.ones(5, dtype=torch.bool)
    support[4] = False
    rs = run_finalize(z, y, support)
    zy = z[torch.arange(3), y]
    assert torch.equal(rs.lse, zy) and torch.equal(rs.nll, torch.zeros(3, dtype=F64))
    assert bool((rs.log1m == NINF).all())
    zero, one = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
    assert torch.equal(rs.entropy, zero) and torch.equal(rs.wrong_entropy, zero)
    assert rs.argmax.tolist() == y.tolist()
    assert torch.equal(rs.p_y, one) and torch.equal(rs.one_minus_p_y, zero)
    assert torch.equal(rs.inv_d, zero) and torch.equal(rs.log_d, zero)
    # the support holds −inf columns: the mean and the gap are −inf, never NaN
    assert bool((rs.support_mean == NINF).all()) and bool((rs.support_gap == NINF).all())


def _mp_row(row: list[float], y: int) -> dict[str, float]:
    with mpmath.workdps(50):
        z = [mpmath.mpf(x) for x in row]
        lse = mpmath.log(mpmath.fsum(mpmath.exp(x) for x in z))
        p = [mpmath.exp(x - lse) for x in z]
        wrong = mpmath.fsum(p[i] for i in range(len(z)) if i != y)
        q = [p[i] / wrong for i in range(len(z)) if i != y]
        return {
            "lse": float(lse),
            "nll": float(lse - z[y]),
            "log1m": float(mpmath.log(wrong)),
            "entropy": float(-mpmath.fsum(pi * mpmath.log(pi) for pi in p)),
            "wrong_entropy": float(-mpmath.fsum(qi * mpmath.log(qi) for qi in q)),
            "one_minus_p_y": float(wrong),
        }


@pytest.mark.parametrize("margin", [40.0, 80.0])
@pytest.mark.parametrize("offset", [0.0, 3e3])
def test_finalize_keeps_relative_precision_at_a_large_margin(margin, offset):
    """Target ``margin`` nats above the rest: nll ≈ 1e-17·V, 1 − p_y and H tiny; float64 log_softmax returns 0
    for nll (lse − z_y cancels), the closed forms keep every digit (checked against 50-digit mpmath)."""
    g = torch.Generator().manual_seed(int(margin))
    v, y = 17, 6
    z = (torch.randn(1, v, generator=g, dtype=F64) + offset)
    z[0, y] = z[0].max() + margin
    rs = run_finalize(z, torch.tensor([y]), torch.ones(v, dtype=torch.bool))
    ref = _mp_row(z[0].tolist(), y)
    for name, want in ref.items():
        got = getattr(rs, name).item()
        tol = 1e-13 * max(abs(want), 1e-300) if name != "lse" else 1e-15 * abs(want)
        assert abs(got - want) <= tol, (name, got, want)
    assert z.log_softmax(1)[0, y].item() == 0.0  # what the naive form would report as nll


# ---- smoothed_nll ------------------------------------------------------------------------------------------


def dense_smoothed_ce(z, y, eps_t, support, convention):
    """−Σ_c q_c·log_softmax(z)_c with q = (1 − ε_t)·onehot(y) + ε_t/K_t·[c ∈ A_t].

    ``A_t = A`` ("torch") or ``A \\ {y}`` ("fairseq"), ``K_t = |A_t|``.
    """
    v = z.shape[1]
    onehot = torch.nn.functional.one_hot(y, v).to(z.dtype)
    a_t = support[None, :].to(z.dtype).expand(len(y), v).clone()
    if convention == "fairseq":
        a_t = a_t * (1 - onehot)
    k_t = a_t.sum(1, keepdim=True)
    q = (1 - eps_t[:, None]) * onehot + eps_t[:, None] / k_t * a_t
    return -(q * z.log_softmax(1)).sum(1)


@pytest.mark.parametrize("convention", ["torch", "fairseq"])
@pytest.mark.parametrize(("v", "excluded"), [(3, ()), (11, (2, 5)), (50, (0,))])
def test_smoothed_nll_equals_the_dense_smoothed_cross_entropy(convention, v, excluded):
    g = torch.Generator().manual_seed(v)
    n = 12
    z = torch.randn(n, v, generator=g, dtype=F64) * 2
    y = torch.randint(0, v, (n,), generator=g)
    if excluded:
        y[:2] = excluded[0]  # targets outside the support
    support = torch.ones(v, dtype=torch.bool)
    support[list(excluded)] = False
    k = int(support.sum())
    eps_t = torch.rand(n, generator=g, dtype=F64) * 0.9
    eps_t[-3:] = 0.0  # hard rows
    zy = z.gather(1, y[:, None])
    nll = -z.log_softmax(1).gather(1, y[:, None])[:, 0]
    gap = (z[:, support] - zy).mean(1)
    k_t = torch.full((n,), float(k), dtype=F64) if convention == "torch" else k - support[y].to(F64)
    got = smoothed_nll(nll, gap, eps_t * k / k_t)
    want = dense_smoothed_ce(z, y, eps_t, support, convention)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if convention == "torch" and not excluded:
        ce = torch.nn.functional.cross_entropy
        ref = torch.stack([ce(z[i:i + 1], y[i:i + 1], label_smoothing=float(eps_t[i])) for i in range(n)])
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_smoothed_nll_hard_rows_ignore_an_infinite_gap():
    nll = torch.tensor([0.5, 1.5, 2.0], dtype=F64)
    gap = torch.tensor([NINF, NINF, 0.25], dtype=F64)
    got = smoothed_nll(nll, gap, torch.tensor([0.0, 0.1, 0.2], dtype=F64))
    assert got[0].item() == 0.5 and got[1].item() == float("inf")
    assert got[2].item() == pytest.approx(1.95, rel=1e-15)


# ---- gradient coefficients ---------------------------------------------------------------------------------


def grad_from_coefficients(co, rs, z, y, support):
    """G (n, V) from coefficients, in both forms: u = z − L¬ (the definition) and w = z − m (shifted)."""
    v = z.shape[1]
    onehot = torch.nn.functional.one_hot(y, v).bool()
    lneg = rs.shift + rs.log_d
    u = z - lneg[:, None]
    q = torch.exp(u)
    beta = torch.zeros_like(co.alpha) if co.beta is None else co.beta
    gamma = torch.zeros_like(co.alpha) if co.gamma is None else co.gamma
    in_a = support[None, :].to(z.dtype)
    direct = q * (co.alpha[:, None] + beta[:, None] * u) + gamma[:, None] * in_a
    direct = torch.where(onehot, co.g_target[:, None], direct)
    scale, beta_w = shifted_coefficients(co, rs)
    w = z - rs.shift[:, None]
    bw = torch.zeros_like(scale) if beta_w is None else beta_w
    shifted = torch.exp(w) * (scale[:, None] + bw[:, None] * w) + gamma[:, None] * in_a
    shifted = torch.where(onehot, co.g_target[:, None], shifted)
    return direct, shifted


STAT_GRADS = ("g_lse", "g_zy", "g_nll", "g_l1m", "g_mean", "g_h", "g_hq")


@pytest.mark.parametrize("used",
                         [STAT_GRADS, ("g_nll",), ("g_h", "g_hq"), ("g_mean", "g_l1m", "g_zy"), ("g_lse",)],
                         ids=lambda u: "+".join(x[2:] for x in u))
@pytest.mark.parametrize(("v", "excluded"), [(4, ()), (19, (0, 7))])
def test_stats_grad_coefficients_equal_dense_autograd(used, v, excluded):
    g = torch.Generator().manual_seed(v + len(used))
    n = 8
    z = torch.randn(n, v, generator=g, dtype=F64) * 2
    y = torch.randint(0, v, (n,), generator=g)
    support = torch.ones(v, dtype=torch.bool)
    support[list(excluded)] = False
    ups = {k: (torch.randn(n, generator=g, dtype=F64) if k in used else None) for k in STAT_GRADS}
    x = z.clone().requires_grad_(True)
    ref = dense_stats(x, y, support)
    fields = {"g_lse": "lse", "g_zy": "target_logit", "g_nll": "nll", "g_l1m": "log1m",
              "g_mean": "support_mean", "g_h": "entropy", "g_hq": "wrong_entropy"}
    total = sum((ups[k] * ref[fields[k]]).sum() for k in used)
    (dense,) = torch.autograd.grad(total, x)
    rs = run_finalize(z, y, support)
    co = stats_grad_coefficients(rs, support[y].to(F64), int(support.sum()), **ups)
    assert (co.beta is None) == ("g_h" not in used and "g_hq" not in used)
    assert (co.gamma is None) == ("g_mean" not in used)
    direct, shifted = grad_from_coefficients(co, rs, z, y, support)
    torch.testing.assert_close(direct, dense, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(shifted, dense, rtol=1e-10, atol=1e-12)


def test_stats_grad_coefficients_of_a_degenerate_row_are_finite_and_zero():
    z = torch.full((2, 4), NINF, dtype=F64)
    y = torch.tensor([1, 3])
    z[0, 1], z[1, 3] = 0.5, -2.0
    support = torch.ones(4, dtype=torch.bool)
    rs = run_finalize(z, y, support)
    ones = torch.ones(2, dtype=F64)
    co = stats_grad_coefficients(rs, ones, 4, g_lse=None, g_zy=None, g_nll=ones, g_l1m=ones, g_mean=None,
                                 g_h=ones, g_hq=ones)
    for t in (co.alpha, co.beta, co.g_target):
        assert bool(torch.isfinite(t).all())
    # nll ≡ 0, H ≡ 0, H(q) ≡ 0 and ln(1 − p_y) ≡ −inf on such a row: no gradient reaches the target logit
    assert torch.equal(co.g_target, torch.zeros(2, dtype=F64))


@pytest.mark.parametrize("convention", ["torch", "fairseq"])
@pytest.mark.parametrize("z_loss", [0.0, 1e-3, 0.5])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_fused_grad_coefficients_equal_dense_autograd(convention, z_loss, eps):
    g = torch.Generator().manual_seed(int(z_loss * 1000) + int(eps * 10))
    n, v = 9, 13
    z = torch.randn(n, v, generator=g, dtype=F64) * 2
    y = torch.randint(0, v, (n,), generator=g)
    support = torch.ones(v, dtype=torch.bool)
    support[[3, 4]] = False
    y[:2] = 3  # hard rows (target excluded): ε_t = 0
    coef = torch.rand(n, generator=g, dtype=F64) + 0.5
    coef[-1] = 0.0
    eps_t = torch.where(support[y], torch.full((n,), eps, dtype=F64), torch.zeros(n, dtype=F64))
    x = z.clone().requires_grad_(True)
    per_row = dense_smoothed_ce(x, y, eps_t, support, convention) + z_loss * x.logsumexp(1) ** 2
    (dense,) = torch.autograd.grad((coef * per_row).sum(), x)
    rs = run_finalize(z, y, support)
    k = int(support.sum())
    if eps == 0.0:
        eps_arg = over_kt = target_in_at = None
    else:
        in_s = support[y].to(F64)
        k_t = torch.full((n,), float(k), dtype=F64) if convention == "torch" else k - in_s
        eps_arg = eps_t
        over_kt = torch.where(eps_t > 0, eps_t / k_t, torch.zeros_like(eps_t))
        target_in_at = in_s if convention == "torch" else torch.zeros_like(in_s)
    co = fused_grad_coefficients(rs, coef, eps_arg, over_kt, target_in_at, z_loss)
    assert co.beta is None and (co.gamma is None) == (eps == 0.0)
    direct, shifted = grad_from_coefficients(co, rs, z, y, support)
    torch.testing.assert_close(direct, dense, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(shifted, dense, rtol=1e-10, atol=1e-13)
    assert torch.equal(direct[-1], torch.zeros(v, dtype=F64))
