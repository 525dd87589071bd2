"""Numerics every implementation must honour, against an independent fp64 plain-torch oracle.

* A common logit offset (up to ±3e4 in fp32) changes nothing beyond fp32 rounding of the inputs: nll and the
  statistics within 2e-5 relative, the target gradient within 1e-5 relative, every gradient within the per-row
  rule, as ``F.cross_entropy`` manages.
* An excluded smoothing column holding −inf or any very negative value does not disturb the smoothed loss.
* A degenerate row (every non-target logit −inf) has finite gradients: zeros, except the exactly defined
  ``[j = y]`` of lse and of the target logit; it does not poison the other rows.
* ``inplace_grad=True`` on a leaf that requires grad (or on a view of one) is refused like torch refuses it.

The oracle here is written out with plain torch in float64 and never imports losskit.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from losskit import kernels
from losskit.contract import LossInputError
from losskit.losses import LabelSmoothedCrossEntropy

IMPLS = ("chunked", "torch")
NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------------------
# The oracle: plain torch, float64.
# ---------------------------------------------------------------------------------------------------------


def oracle_stats(z: torch.Tensor, t: torch.Tensor, exclude=()) -> dict[str, torch.Tensor]:
    """Per-row statistics of ``(n, V)`` float64 logits with every non-target row non-degenerate."""
    z = z.double()
    lp = z.log_softmax(-1)
    lse = z.logsumexp(-1)
    zy = z.gather(1, t[:, None])[:, 0]
    zq = z.scatter(1, t[:, None], NEG_INF)
    lq = zq.log_softmax(-1)
    support = torch.ones(z.shape[1], dtype=torch.bool)
    support[list(exclude)] = False
    zero = torch.zeros((), dtype=z.dtype)
    # nll and ln(1 − p_y) as softplus of (L¬ − z_y): −log_softmax would round a tiny nll to the ulp of lse
    lneg = zq.logsumexp(-1)
    nll = torch.logaddexp(lneg - zy, zero)
    log1m = -torch.logaddexp(zy - lneg, zero)
    wrong_entropy = -(lq.exp() * torch.where(lq == NEG_INF, zero, lq)).sum(-1)
    # H(p) grouped as p_y·nll + (1 − p_y)(−ln(1 − p_y) + H(q)): −Σ p·log_softmax loses a tiny entropy in the
    # rounding of log p_y near 0 even in float64
    entropy = torch.exp(-nll) * nll + torch.where(log1m > NEG_INF, torch.exp(log1m) * (wrong_entropy - log1m), zero)
    assert torch.allclose(entropy, -(lp.exp() * torch.where(lp == NEG_INF, zero, lp)).sum(-1), atol=1e-9)
    return {
        "lse": lse,
        "target_logit": zy,
        "nll": nll,
        "log1m_target_prob": log1m,
        "support_mean_logit": torch.where(support, z, zero).sum(-1) / int(support.sum()),
        "entropy": entropy,
        "wrong_entropy": wrong_entropy,
    }


def oracle_nll_grad(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """∂nll/∂z = p − onehot(y), with the target entry written −(1 − p_y) = −exp(ln(1 − p_y)) (p_y − 1 would
    round to the float64 ulp of 1 when the target holds almost all the mass)."""
    z = z.double()
    g = z.softmax(-1)
    log1m = oracle_stats(z, t)["log1m_target_prob"]
    return g.scatter(1, t[:, None], -torch.exp(log1m)[:, None])


def oracle_smoothed_ce(z: torch.Tensor, t: torch.Tensor, eps: float, exclude=(), convention="torch"):
    """Dense label-smoothed CE per row: −Σ_c q_c·log p_c with q built explicitly."""
    z = z.double()
    v = z.shape[1]
    lp = z.log_softmax(-1)
    support = torch.ones(v, dtype=torch.bool)
    support[list(exclude)] = False
    q = torch.zeros_like(lp)
    for r, y in enumerate(t.tolist()):
        cols = support.clone()
        if convention == "fairseq":
            cols[y] = False
        eps_r = 0.0 if y in set(exclude) else eps
        q[r, cols] = eps_r / int(cols.sum())
        q[r, y] += 1 - eps_r
    return -torch.where(q > 0, q * lp, torch.zeros((), dtype=lp.dtype)).sum(-1)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (x.double() - ref).abs() / ref.abs().clamp_min(1e-300)


# ---------------------------------------------------------------------------------------------------------
# 1. Shift invariance.
# ---------------------------------------------------------------------------------------------------------


def _logits(n, v, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    t = torch.randint(0, v, (n,), generator=g)
    return z, t


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("offset", "n", "v", "chunk"),
    [
        (1e3, 7, 1000, None),
        (1e4, 64, 1000, None),
        (-1e4, 5, 4099, None),
        (3e4, 33, 517, None),
        (-3e4, 9, 2000, 4 * 300),  # vocab blocks of 300 columns
        (2e4, 17, 128, 4 * 128 * 2),  # two rows per chunk
    ],
)
def test_common_offset_keeps_stats_and_gradients_precise(impl, offset, n, v, chunk):
    z0, t = _logits(n, v, seed=int(abs(offset)) + v)
    z0[0, t[0]] += 40.0  # one row where the target holds almost all the mass
    x = (z0 + offset).float()  # the rounded fp32 inputs are what every implementation sees
    ref = oracle_stats(x.double(), t)
    g_ref = oracle_nll_grad(x, t)
    xf = x.clone().requires_grad_()
    F.cross_entropy(xf, t, reduction="sum").backward()

    xk = x.clone().requires_grad_()
    kw = {"chunk_bytes": chunk} if impl == "chunked" else {}
    stats = kernels.token_stats(xk, t, impl=impl, **kw)
    assert rel_err(stats.nll, ref["nll"]).max() <= 2e-5
    for name in ("lse", "log1m_target_prob", "wrong_entropy", "support_mean_logit", "target_logit"):
        assert rel_err(getattr(stats, name), ref[name]).max() <= 2e-5, name
    # H(p) where 1 − p_y is in the fp32 normal range; the torch impl's −Σ p·log p (log_softmax) is the plain
    # formula, exact in shift but not for an entropy near 0, where it loses log p_y ≈ 0 to rounding.
    normal = ref["log1m_target_prob"] > -80
    if impl == "torch":
        normal &= ref["entropy"] > 1e-3
    assert rel_err(stats.entropy[normal], ref["entropy"][normal]).max() <= 2e-5
    stats.nll.sum().backward()
    rows = torch.arange(n)
    gy = xk.grad[rows, t].double()
    assert rel_err(gy, g_ref[rows, t]).max() <= 1e-5
    # per row: err ≤ err(F.cross_entropy in fp32) + 4e-6·max_j|G_ref|
    err = (xk.grad.double() - g_ref).abs()
    base = (xf.grad.double() - g_ref).abs()
    tol = base + 4e-6 * g_ref.abs().amax(1, keepdim=True)
    assert bool((err <= tol).all()), float((err - tol).max())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("offset", "eps", "conv", "lam"), [(1e4, 0.1, "torch", 0.0), (-3e4, 0.2, "fairseq", 1e-4),
                                                          (3e4, 0.1, "torch", 1e-4)])
def test_common_offset_keeps_the_fused_loss_precise(impl, offset, eps, conv, lam):
    z0, t = _logits(23, 700, seed=5)
    x = (z0 + offset).float()
    ex = [3, 11]
    ref = oracle_smoothed_ce(x.double(), t, eps, ex, conv) + lam * x.double().logsumexp(-1) ** 2
    xk = x.clone().requires_grad_()
    got = kernels.cross_entropy(xk, t, label_smoothing=eps, smoothing_convention=conv, smoothing_exclude=ex,
                                z_loss=lam, reduction="none", impl=impl)
    assert rel_err(got, ref).max() <= 2e-5
    x64 = x.double().requires_grad_()
    (oracle_smoothed_ce(x64, t, eps, ex, conv) + lam * x64.logsumexp(-1) ** 2).sum().backward()
    got.sum().backward()
    rows = torch.arange(len(t))
    assert rel_err(xk.grad[rows, t], x64.grad[rows, t]).max() <= 1e-5
    tol = 4e-6 * x64.grad.abs().amax(1, keepdim=True) * 4
    assert bool(((xk.grad.double() - x64.grad).abs() <= tol).all())


def test_common_offset_in_the_smoothing_modifier():
    from losskit.modifiers import create_loss_modifier_pipeline

    z0, t = _logits(12, 300, seed=9)
    for offset in (0.0, 1e4, -2e4):
        x = (z0 + offset).float().reshape(3, 4, 300)
        pipe = create_loss_modifier_pipeline({
            "loss_modifiers_enabled": True, "target_smoothing_enabled": True, "target_smoothing_factor": 0.1,
            "target_smoothing_special_tokens": [0, 7],
        })
        out = pipe.compute(x, t.reshape(3, 4))
        ref = oracle_smoothed_ce(x.reshape(-1, 300).double(), t, 0.1, [0, 7]).mean()
        assert rel_err(out.loss.detach(), ref) <= 2e-5, offset
        smoothed = pipe.get_all_metrics()["loss_modifiers/TargetSmoothingModifier.smoothed_loss"]
        assert rel_err(smoothed, ref) <= 2e-5, offset


# ---------------------------------------------------------------------------------------------------------
# 2. Excluded columns holding −inf or very negative values.
# ---------------------------------------------------------------------------------------------------------


def test_issue_reproducer_excluded_neg_inf_column():
    z = torch.tensor([[0.3, -1.2, 2.0, 0.5, NEG_INF]])
    t = torch.tensor([1])
    ref = oracle_smoothed_ce(z, t, 0.1, [4])
    assert abs(float(ref) - 3.4091992) < 1e-6
    for impl in IMPLS:
        got = kernels.cross_entropy(z, t, label_smoothing=0.1, smoothing_exclude=[4], impl=impl)
        assert rel_err(got, ref) <= 1e-6, impl


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("value", [NEG_INF, -1e30, -1e9, -1e4])
@pytest.mark.parametrize(("v", "n_ex", "chunk", "dtype"), [
    (5, 1, None, torch.float32),
    (123, 4, None, torch.float32),
    (1000, 17, 4 * 96, torch.float32),  # vocab blocks: excluded ids spread over several blocks
    (1000, 200, 4 * 1000 * 3, torch.bfloat16),
    (4099, 3, None, torch.float16),
])
def test_excluded_columns_with_extreme_values_do_not_move_the_smoothed_loss(impl, value, v, n_ex, chunk, dtype):
    g = torch.Generator().manual_seed(v + n_ex)
    n = 6
    z = (torch.randn(n, v, generator=g) * 2).to(dtype).double()
    ex = sorted(torch.randperm(v, generator=g)[:n_ex].tolist())
    kept = torch.tensor(sorted(set(range(v)) - set(ex)))
    t = kept[torch.randint(0, len(kept), (n,), generator=g)]
    t[0] = ex[0]  # a hard-target row (its target is excluded: ε_t = 0)
    z[:, ex] = value
    z[0, ex[0]] = 1.5  # the target column of that row stays finite
    x = z.to(dtype)
    kw = {"chunk_bytes": chunk} if impl == "chunked" else {}
    for conv in ("torch", "fairseq"):
        ref = oracle_smoothed_ce(x.double(), t, 0.1, ex, conv)
        xk = x.clone().requires_grad_()
        got = kernels.cross_entropy(xk, t, label_smoothing=0.1, smoothing_convention=conv, smoothing_exclude=ex,
                                    reduction="none", impl=impl, **kw)
        tol = {torch.float32: 4e-6, torch.float16: 2e-5, torch.bfloat16: 2e-5}[dtype]
        assert rel_err(got, ref).max() <= tol, conv
        got.sum().backward()
        assert torch.isfinite(xk.grad).all()
        # the same rows without the extreme columns' influence on smoothing: the excluded set's values only
        # enter through the softmax, so the gradient on the support matches the dense oracle
        x64 = x.double().requires_grad_()
        oracle_smoothed_ce(x64, t, 0.1, ex, conv).sum().backward()
        err = (xk.grad.double() - torch.nan_to_num(x64.grad)).abs()
        c_d = {torch.float32: 4e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
        assert float(err.max()) <= 2 * c_d * float(x64.grad.abs().max())
    stats = kernels.token_stats(x, t, smoothing_exclude=ex, impl=impl, **kw)
    support = torch.ones(v, dtype=torch.bool)
    support[ex] = False
    mean_ref = x.double()[:, support].mean(-1)
    # summed as the logits are: a target logit far from the mean (here an excluded target at an extreme
    # value) does not cost precision
    tol = 1e-5 * mean_ref.abs().clamp_min(1.0)
    assert bool(((stats.support_mean_logit.double() - mean_ref).abs() <= tol).all())


def test_excluded_extreme_columns_through_the_module_and_the_modifier():
    from losskit.modifiers import create_loss_modifier_pipeline

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 50, generator=g)
    t = torch.randint(2, 50, (2, 5), generator=g)
    x[..., 0] = NEG_INF
    x[..., 1] = -1e9
    ref = oracle_smoothed_ce(x.reshape(-1, 50), t.reshape(-1), 0.1, [0, 1]).mean()
    module = LabelSmoothedCrossEntropy(epsilon=0.1, smoothing_exclude=[0, 1])
    assert rel_err(module(x, t).detach(), ref) <= 4e-6
    pipe = create_loss_modifier_pipeline({
        "loss_modifiers_enabled": True, "target_smoothing_enabled": True, "target_smoothing_factor": 0.1,
        "target_smoothing_special_tokens": [0, 1],
    })
    out = pipe.compute(x, t)
    assert rel_err(out.loss.detach(), ref) <= 4e-6
    smoothed = pipe.get_all_metrics()["loss_modifiers/TargetSmoothingModifier.smoothed_loss"]
    assert rel_err(smoothed, ref) <= 4e-6


# ---------------------------------------------------------------------------------------------------------
# 3. Degenerate rows.
# ---------------------------------------------------------------------------------------------------------

FIELDS = ("lse", "target_logit", "nll", "log1m_target_prob", "support_mean_logit", "entropy", "wrong_entropy")


def _with_degenerate_rows(n, v, dtype, rows, seed=0, three_d=False):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    t = torch.randint(0, v, (n,), generator=g)
    for r in rows:
        z[r] = NEG_INF
        z[r, t[r]] = float(torch.randn((), generator=g)) * 3
    return z.to(dtype), t


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("n", "v", "rows", "dtype", "chunk"), [
    (3, 6, [0], torch.float64, None),
    (5, 123, [1, 4], torch.float32, None),
    (8, 1000, [0, 3, 7], torch.float32, 4 * 128),  # vocab blocks
    (4, 2, [2], torch.bfloat16, None),  # V = 2
    (6, 77, [0, 1, 2, 3, 4, 5], torch.float16, 4 * 77 * 2),  # every row degenerate
])
def test_degenerate_rows_have_finite_gradients_for_every_statistic(impl, n, v, rows, dtype, chunk):
    x, t = _with_degenerate_rows(n, v, dtype, rows, seed=n * v)
    kw = {"chunk_bytes": chunk} if impl == "chunked" else {}
    deg = torch.zeros(n, dtype=torch.bool)
    deg[rows] = True
    s = kernels.token_stats(x, t, impl=impl, **kw)
    zy = x.double()[torch.arange(n), t]
    assert torch.equal(s.lse[deg].double(), zy[deg]) and bool((s.nll[deg] == 0).all())
    assert bool((s.log1m_target_prob[deg] == NEG_INF).all())
    assert bool((s.entropy[deg] == 0).all()) and bool((s.wrong_entropy[deg] == 0).all())
    assert not s.bad.any()
    ok = ~deg
    ref = oracle_stats(x.double()[ok], t[ok])
    for name in FIELDS:
        xk = x.clone().requires_grad_()
        field = getattr(kernels.token_stats(xk, t, impl=impl, **kw), name)
        w = torch.linspace(0.5, 1.5, n, dtype=field.dtype)
        torch.where(torch.isfinite(field), field * w, torch.zeros((), dtype=field.dtype)).sum().backward()
        grad = xk.grad.double()
        assert torch.isfinite(grad).all(), name
        expected = torch.zeros(int(deg.sum()), v, dtype=torch.float64)
        if name in ("lse", "target_logit"):
            expected[torch.arange(len(rows)), t[deg]] = w[deg].double()
        # support_mean_logit is −inf on a degenerate row (its −inf columns are in the support), so the
        # where above keeps it out of the sum and its gradient is 0 like the others
        c_d = {torch.float64: 1e-12, torch.float32: 4e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
        assert torch.allclose(grad[deg], expected, atol=1e-6, rtol=2 * c_d), name
        if ok.any() and dtype in (torch.float32, torch.float64):
            x64 = x.double()[ok].requires_grad_()
            (oracle_stats(x64, t[ok])[name] * w[ok].double()).sum().backward()
            assert torch.allclose(grad[ok], x64.grad, atol=1e-5, rtol=1e-4), name
        assert torch.isfinite(ref[name]).all() or name == "log1m_target_prob"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("lam", "reduction", "weighted"), [(0.0, "mean", False), (1e-3, "sum", True),
                                                           (0.0, "none", True), (1e-3, "mean", False)])
def test_degenerate_rows_cross_entropy_matches_torch(impl, lam, reduction, weighted):
    # (With label smoothing a degenerate row is an error: its −inf columns lie in the smoothing support.)
    x, t = _with_degenerate_rows(7, 40, torch.float32, [2, 5], seed=11)
    w = torch.rand(7, generator=torch.Generator().manual_seed(1)) + 0.5 if weighted else None
    xk = x.clone().requires_grad_()
    loss = kernels.cross_entropy(xk, t, token_weight=w, z_loss=lam, reduction=reduction, impl=impl)
    loss.sum().backward()
    x64 = x.double().requires_grad_()
    per = F.cross_entropy(x64, t, reduction="none") + lam * x64.logsumexp(-1) ** 2
    if w is not None:
        per = per * w.double()
    ref = {"mean": per.sum() / (7 if w is None else w.double().sum()), "sum": per.sum(), "none": per}[reduction]
    ref.sum().backward()
    assert torch.allclose(loss.double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(xk.grad).all()
    assert torch.allclose(xk.grad.double(), x64.grad, atol=1e-6, rtol=1e-5)
    if lam == 0 and w is None:
        xt = x.clone().requires_grad_()
        F.cross_entropy(xt, t, reduction=reduction).sum().backward()
        assert torch.allclose(xk.grad, xt.grad, atol=1e-7)


@pytest.mark.parametrize("mode", ["forward", "backward"])
def test_degenerate_rows_in_the_fused_loss_with_weights(mode):
    x, t = _with_degenerate_rows(6, 33, torch.float32, [0, 4], seed=2)
    w = torch.rand(6) + 0.5
    xk = x.clone().requires_grad_()
    res = kernels.fused_token_loss(xk, t, token_weight=w, z_loss=1e-3, normalizer=4.0, grad_mode=mode,
                                   impl="chunked")
    res.loss.backward()
    assert torch.isfinite(xk.grad).all()
    x64 = x.double().requires_grad_()
    ((F.cross_entropy(x64, t, reduction="none") + 1e-3 * x64.logsumexp(-1) ** 2) * w.double()).sum().div(4).backward()
    assert torch.allclose(xk.grad.double(), x64.grad, atol=1e-6)


def test_entropy_modifier_pipeline_survives_a_degenerate_row():
    from losskit.modifiers import create_loss_modifier_pipeline

    x, t = _with_degenerate_rows(8, 50, torch.float32, [3], seed=4)
    x = x.reshape(2, 4, 50)
    t = t.reshape(2, 4)
    pipe = create_loss_modifier_pipeline({
        "loss_modifiers_enabled": True, "entropy_modifier_enabled": True, "target_smoothing_enabled": True,
        "target_smoothing_factor": 0.0, "mask_ratio_weight_enabled": True,
    })
    for diff in (False, True):
        for m in pipe.modifiers:
            m.differentiable_weights = diff
        xk = x.clone().requires_grad_()
        pipe.compute(xk, t).loss.backward()
        assert torch.isfinite(xk.grad).all(), diff


# ---------------------------------------------------------------------------------------------------------
# 4. In place on a leaf.
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["cross_entropy", "fused_token_loss", "token_stats"])
@pytest.mark.parametrize("view", [False, True])
def test_inplace_grad_on_a_leaf_that_requires_grad_is_refused(entry, view):
    leaf = torch.randn(2, 4, 9, requires_grad=True)
    before = leaf.detach().clone()
    x = leaf[:, :-1] if view else leaf
    t = torch.randint(0, 9, x.shape[:-1])
    fn = getattr(kernels, entry)
    with pytest.raises(LossInputError, match="inplace_grad") as info:
        fn(x, t, inplace_grad=True, impl="chunked")
    assert "leaf" in str(info.value)
    assert torch.equal(leaf.detach(), before)


def test_inplace_grad_on_non_leaf_logits_and_without_grad_still_works():
    leaf = torch.randn(3, 9, requires_grad=True)
    t = torch.tensor([1, 2, 3])
    for x in (leaf * 1.0, (leaf * 2.0)[:, :]):
        loss = kernels.cross_entropy(x, t, inplace_grad=True, impl="chunked")
        loss.backward()
    ref = leaf.detach().clone().requires_grad_()
    (F.cross_entropy(ref, t) + F.cross_entropy(ref * 2.0, t)).backward()
    assert torch.allclose(leaf.grad, ref.grad, atol=1e-6)
    # a leaf that does not require grad has no gradient to write: nothing is modified, nothing refused
    plain = torch.randn(3, 9)
    keep = plain.clone()
    kernels.cross_entropy(plain, t, inplace_grad=True, impl="chunked")
    assert torch.equal(plain, keep)


@pytest.mark.parametrize(("impl", "chunk"), list(itertools.product(IMPLS, [None])))
def test_ordinary_rows_unchanged_next_to_degenerate_ones(impl, chunk):
    x, t = _with_degenerate_rows(9, 64, torch.float32, [4], seed=8)
    keep = torch.ones(9, dtype=torch.bool)
    keep[4] = False
    a = kernels.cross_entropy(x, t, reduction="none", impl=impl)
    b = kernels.cross_entropy(x[keep], t[keep], reduction="none", impl=impl)
    assert torch.allclose(a[keep], b) and a[4] == 0


def test_inplace_grad_on_a_leaf_under_no_grad_writes_nothing_and_is_allowed():
    leaf = torch.randn(3, 9, requires_grad=True)
    keep = leaf.detach().clone()
    with torch.no_grad():
        out = kernels.cross_entropy(leaf, torch.tensor([1, 2, 3]), inplace_grad=True, impl="chunked")
    assert torch.isfinite(out) and torch.equal(leaf.detach(), keep)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("offset", [0.0, 1e4, -3e4])
def test_support_gap_is_exact_in_shift_per_token(impl, offset):
    z0, t = _logits(40, 300, seed=13)
    x = (z0 + offset).float()
    ex = [0, 7]
    support = torch.ones(300, dtype=torch.bool)
    support[ex] = False
    x64 = x.double()
    ref = (x64 - x64[torch.arange(40), t][:, None])[:, support].mean(-1)
    s = kernels.token_stats(x, t, smoothing_exclude=ex, impl=impl)
    assert rel_err(s.support_gap, ref).max() <= 1e-5


def test_smoothing_modifier_is_exact_in_shift_per_token():
    from losskit.modifiers import create_loss_modifier_pipeline

    z0, t = _logits(16, 300, seed=9)
    pipe = create_loss_modifier_pipeline({
        "loss_modifiers_enabled": True, "target_smoothing_enabled": True, "target_smoothing_factor": 0.3,
        "target_smoothing_special_tokens": [0, 7], "target_smoothing_convention": "fairseq",
    })
    for offset in (1e4, 3e4):
        for i in range(16):  # one token per call: no averaging hides a per-token error
            x = (z0[i : i + 1] + offset).float().reshape(1, 1, 300)
            out = pipe.compute(x, t[i : i + 1].reshape(1, 1))
            ref = oracle_smoothed_ce(x.reshape(1, 300).double(), t[i : i + 1], 0.3, [0, 7], "fairseq")[0]
            assert rel_err(out.loss.detach(), ref) <= 2e-5, (offset, i)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("margin", [25.0, 40.0, 100.0, -60.0])
@pytest.mark.parametrize("chunk", [None, 4 * 100])
def test_support_mean_is_precise_when_the_target_logit_is_far_from_it(impl, margin, chunk):
    z0, t = _logits(9, 500, seed=int(abs(margin)))
    z0[torch.arange(9), t] = margin
    x = z0.float()
    ex = [1, 2, 3]
    support = torch.ones(500, dtype=torch.bool)
    support[ex] = False
    ref = x.double()[:, support].mean(-1)
    kw = {"chunk_bytes": chunk} if impl == "chunked" else {}
    s = kernels.token_stats(x, t, smoothing_exclude=ex, impl=impl, **kw)
    assert bool(((s.support_mean_logit.double() - ref).abs() <= 4e-6 * ref.abs().clamp_min(1.0)).all())
