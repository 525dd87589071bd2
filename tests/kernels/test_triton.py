"""The ``triton`` implementation under the Triton interpreter: the test matrix of the kernels.

Every case calls the Triton autograd Functions (or launchers) directly on the prepared inputs, wraps the outputs as
``kernels/__init__.py`` does, and compares them with the ``torch`` implementation in fp64 on the same rounded inputs
(the oracle), allowing the error of the ``torch`` implementation in the same dtype plus c_d·max(1, |ref|) (values)
or c_d·max_j|G_ref| per row (gradients). Shapes are small and BLOCK_V is forced to 32/64 so that rows span several
ragged tiles; ROWS is forced to 4 or 32 so that programs hold several rows (and a ragged last program).

On a CUDA machine the same tests run the compiled kernels on CUDA copies of the inputs.
"""

from __future__ import annotations

import importlib.util
import itertools
import random

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

import triton
import triton.language as tl

from losskit import kernels
from losskit.contract import FusedLoss, LossInputError, TokenStats
from losskit.kernels import chunked
from losskit.kernels.prepare import prepare, prepare_smoothing
from losskit.kernels.triton import (
    FusedOptions,
    FusedTokenLossFunction,
    LaunchConfig,
    TokenStatsFunction,
    default_config,
    exclusion_bitmask,
    fused_loss_bwd,
    token_stats_bwd,
    token_stats_fwd,
)
from losskit.kernels.triton import kernels as tk
from losskit.kernels.triton import launch as tl_launch

from ._oracle import FLOAT_FIELDS, assert_grad_close, assert_stats_close, assert_values_close
from .test_nosync import SyncGuard

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
StatFields = chunked.StatFields


# ---------------------------------------------------------------------------------------------------------------
# Calling the Triton path the way kernels/__init__.py does.
# ---------------------------------------------------------------------------------------------------------------


def _wrap(f: StatFields, prep, bad=None) -> TokenStats:
    shape = prep.lead_shape
    return TokenStats(
        valid=prep.valid.reshape(shape),
        **{k: getattr(f, k).reshape(shape) for k in FLOAT_FIELDS},
        argmax=f.argmax.reshape(shape),
        correct=f.correct.reshape(shape),
        bad=(f.bad if bad is None else bad).reshape(shape),
    )


def _prep(x, t, o, weight=None):
    return prepare(
        x, t, ignore_index=o.get("ignore_index", -100), mask=o.get("mask"),
        smoothing_exclude=o.get("ex", ()), token_weight=weight,
    )


def triton_stats(x, t, o, cfg, inplace=False) -> TokenStats:
    """``token_stats(impl="triton")``: deferred Function when grad is wanted, the launcher otherwise."""
    prep = _prep(x, t, o)
    if torch.is_grad_enabled() and x.requires_grad:
        f = StatFields(*TokenStatsFunction.apply(x, prep, cfg, inplace))
    else:
        f, _ = token_stats_fwd(x, prep, cfg)
    return _wrap(f, prep)


def _smoothing_bad(f: StatFields, prep, sm):
    if sm.eps_t is None:
        return f.bad
    return f.bad | (prep.valid & ~torch.isfinite(f.support_mean_logit))


def triton_fused(x, t, o, cfg, *, weight=None, normalizer=None, reduction="sum", eager=False, inplace=False,
                 grad_scale=1.0):
    """``fused_token_loss(impl="triton")``: eager Function, or deferred stats + ``chunked.fused_token_terms``."""
    prep = _prep(x, t, o, weight)
    sm = prepare_smoothing(prep, o.get("eps", 0.0), o.get("conv", "torch"), o.get("hard"), x.device)
    lam = o.get("lam", 0.0)
    if eager:
        opts = FusedOptions(prep, sm, lam, grad_scale, inplace, cfg)
        out = FusedTokenLossFunction.apply(x, weight, normalizer, opts)
        f = StatFields(*out[2:])
        return FusedLoss(out[0], out[1].reshape(prep.lead_shape), _wrap(f, prep, _smoothing_bad(f, prep, sm)))
    f = StatFields(*TokenStatsFunction.apply(x, prep, cfg, inplace))
    per_token = chunked.fused_token_terms(f, sm, lam)
    zero = torch.zeros((), device=x.device)
    wf = None if weight is None else torch.where(prep.valid, weight.reshape(-1).float(), zero)
    rows = torch.where(prep.valid, per_token if wf is None else per_token * wf, zero)
    if reduction == "none":
        loss = rows.reshape(prep.lead_shape)
    else:
        loss = rows.sum() if normalizer is None else rows.sum() / normalizer.float()
    stats = _wrap(f, prep, _smoothing_bad(f, prep, sm))
    return FusedLoss(loss, per_token.detach().reshape(prep.lead_shape), stats)


def torch_fused(x, t, o, *, weight=None, normalizer=None, reduction="sum"):
    return kernels.fused_token_loss(
        x, t, ignore_index=o.get("ignore_index", -100), mask=o.get("mask"), token_weight=weight,
        label_smoothing=o.get("eps", 0.0), smoothing_convention=o.get("conv", "torch"),
        smoothing_exclude=o.get("ex", ()), hard_target_ids=o.get("hard"), z_loss=o.get("lam", 0.0),
        normalizer=normalizer, reduction=reduction, impl="torch",
    )


def torch_stats(x, t, o):
    return kernels.token_stats(
        x, t, ignore_index=o.get("ignore_index", -100), mask=o.get("mask"), smoothing_exclude=o.get("ex", ()),
        impl="torch",
    )


def _cpu(x):
    return x if x is None or not isinstance(x, torch.Tensor) else x.cpu()


# ---------------------------------------------------------------------------------------------------------------
# The matrix.
# ---------------------------------------------------------------------------------------------------------------


def _make_logits(seed: int, v: int, n: int, dtype: torch.dtype, three_d: bool):
    """Random logits (``randn·3``; a shifted ``[:, :-1]`` view for 3-D) with one sampled row feature each:
    a ±1e4 offset, a target holding all the mass (margin 25–100 nats), or −∞ columns."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    if three_d:
        b = max(1, n // 3)
        base = torch.randn(b, n // b + 2, v, generator=g, dtype=torch.float64) * 3
        x64 = base[:, :-1]
    else:
        x64 = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    lead = x64.shape[:-1]
    target = torch.randint(0, v, lead, generator=g)
    rows = x64.reshape(-1, v) if not three_d else None
    nrows = target.numel()

    def row(i):
        return rows[i] if rows is not None else x64[i // lead[-1], i % lead[-1]]

    feature = rng.choice(["offset", "margin", "neginf", "none"])
    i = rng.randrange(nrows)
    y = int(target.reshape(-1)[i])
    if feature == "offset":
        row(i).add_(rng.choice([1e4, -1e4]))
    elif feature == "margin":
        row(i)[y] = row(i).max() + rng.choice([25.0, 40.0, 100.0])
    elif feature == "neginf" and v > 2:
        cols = torch.randint(0, v, (max(1, v // 10),), generator=g)
        row(i)[cols] = float("-inf")
        row(i)[y] = 0.5
    else:
        feature = "none"
    return x64.to(dtype), target, feature


def _options(seed: int, v: int, target: torch.Tensor, feature: str):
    rng = random.Random(seed + 7)
    t = target.clone()
    flat = t.view(-1)
    ignore_index = rng.choice([-100, -100, 0, None])
    if ignore_index == -100 and flat.numel() > 1:
        flat[rng.randrange(flat.numel())] = -100
    mask = None
    if rng.random() < 0.4:
        mask = torch.rand(t.shape, generator=torch.Generator().manual_seed(seed)) > 0.3
    eps = rng.choice([0.0, 0.1])
    if feature == "neginf":
        eps = 0.0  # −inf inside the support makes the smoothed loss +inf (tested separately)
    ex = []
    if v > 2 and rng.random() < 0.6:
        ex = sorted({rng.randrange(v) for _ in range(3)})
        if rng.random() < 0.5:
            ex = sorted(set(ex) | {int(target.reshape(-1)[0])})  # E containing a target
    hard = ex[:1] if ex and rng.random() < 0.3 else None
    return {
        "ignore_index": ignore_index, "mask": mask, "eps": eps, "conv": rng.choice(["torch", "fairseq"]),
        "ex": ex, "hard": hard, "lam": rng.choice([0.0, 1e-3]),
    }, t


def _config(v: int, n: int, case: int) -> LaunchConfig:
    """Forced small tiles: 32 (V ≤ 123) or 64 columns, the widest V only at N = 1 (65 tiles cost the interpreter
    ~0.5 s per launch); otherwise 1024-wide tiles, ragged at V = 4099. ROWS alternates between 4 and 32."""
    if v <= 123:
        block = 32
    elif v <= 1000 or n == 1:
        block = 64
    else:
        block = 1024
    return LaunchConfig(block_v=block, rows=4 if case % 2 else 32)


CASES = []
for _i, (_v, _n) in enumerate(itertools.product((2, 123, 1000, 4099), (1, 3, 17))):
    CASES.append((_v, _n, DTYPES[_i % 3], _i % 3 == 1))
    CASES.append((_v, _n, DTYPES[(_i + 1) % 3], _i % 4 == 0))


def _to_dev(t):
    return None if t is None else t.to(DEV)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_token_stats_matrix(case):
    v, n, dtype, three_d = CASES[case]
    logits, target, feature = _make_logits(case, v, n, dtype, three_d)
    o, t = _options(case, v, target, feature)
    cfg = _config(v, n, case)
    x64 = logits.detach().double().requires_grad_()
    ref = torch_stats(x64, t, o)
    xb = logits.detach().clone().requires_grad_()
    base = torch_stats(xb, t, o)
    dev_o = {**o, "mask": _to_dev(o["mask"])}
    xt = logits.detach().clone().to(DEV).requires_grad_()
    got = triton_stats(xt, t.to(DEV), dev_o, cfg)
    got_cpu = TokenStats(**{k: getattr(got, k).cpu() for k in vars(got)})
    what = f"case {case} (V={v} N={n} {dtype} 3d={three_d} {feature} {cfg}) "
    assert_stats_close(got_cpu, ref, base, dtype, what)
    assert torch.equal(got_cpu.argmax, ref.argmax), what + "argmax"
    assert torch.equal(got_cpu.correct, ref.correct), what + "correct"
    g = torch.Generator().manual_seed(case)
    weights = {name: torch.randn(ref.lse.shape, generator=g, dtype=torch.float64) for name in FLOAT_FIELDS}

    def combo(stats, device=None):
        total = 0
        for name, r in weights.items():
            finite = torch.isfinite(getattr(ref, name)).to(device or "cpu")
            total = total + torch.where(finite, r.to(device or "cpu") * getattr(stats, name).double(), 0.0).sum()
        return total

    combo(ref).backward()
    combo(base).backward()
    combo(got, DEV).backward()
    assert xt.grad.dtype == dtype
    assert_grad_close(xt.grad.cpu(), x64.grad, xb.grad, dtype, what + "grad")
    assert bool((xt.grad.cpu()[~ref.valid] == 0).all()), "ignored rows must get an exact zero gradient"


@pytest.mark.parametrize("case", range(len(CASES)))
def test_fused_loss_matrix(case):
    v, n, dtype, three_d = CASES[case]
    logits, target, feature = _make_logits(case + 1000, v, n, dtype, three_d)
    o, t = _options(case + 1000, v, target, feature)
    cfg = _config(v, n, case + 1)
    rng = random.Random(case)
    eager = rng.random() < 0.5
    reduction = "none" if not eager and rng.random() < 0.5 else "sum"
    weighted = rng.random() < 0.6
    w_grad = weighted and rng.random() < 0.5
    upstream = rng.choice(["one", "half", "device"]) if reduction == "sum" else "per_token"
    inplace = rng.random() < 0.3
    gen = torch.Generator().manual_seed(case)
    w0 = torch.rand(target.shape, generator=gen, dtype=torch.float64) + 0.5 if weighted else None
    normalizer = torch.tensor(7.0) if reduction == "sum" else None
    per_token_up = torch.randn(target.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def backward(res, device):
        if upstream == "one":
            res.loss.backward()
        elif upstream == "half":
            res.loss.backward(torch.tensor(0.5, dtype=res.loss.dtype, device=device))
        elif upstream == "device":
            res.loss.backward(torch.tensor(1.75, dtype=res.loss.dtype, device=device))
        else:
            res.loss.backward(per_token_up.to(device=device, dtype=res.loss.dtype))

    def run_torch(x, wdtype):
        w = None if w0 is None else w0.to(wdtype).clone().requires_grad_(w_grad)
        res = torch_fused(x, t, o, weight=w, normalizer=None if normalizer is None else normalizer.to(wdtype),
                          reduction=reduction)
        backward(res, torch.device("cpu"))
        return res, w

    x64 = logits.detach().double().requires_grad_()
    ref, w64 = run_torch(x64, torch.float64)
    xb = logits.detach().clone().requires_grad_()
    base, wb = run_torch(xb, torch.float32)

    leaf = logits.detach().clone().to(DEV).requires_grad_()
    xt = leaf * 1.0 if inplace else leaf  # in place needs a non-leaf producer (the step's own buffer)
    wt = None if w0 is None else w0.float().to(DEV).requires_grad_(w_grad)
    dev_o = {**o, "mask": _to_dev(o["mask"])}
    got = triton_fused(xt, t.to(DEV), dev_o, cfg, weight=wt, normalizer=_to_dev(normalizer), reduction=reduction,
                       eager=eager, inplace=inplace)
    backward(got, DEV)
    what = f"case {case} (V={v} N={n} {dtype} {feature} eager={eager} {reduction} {upstream} inplace={inplace}) "
    assert_values_close(got.loss.detach().cpu(), ref.loss.detach(), base.loss.detach(), dtype, what + "loss")
    assert_values_close(got.token_loss.cpu(), ref.token_loss, base.token_loss, dtype, what + "token_loss")
    got_stats = TokenStats(**{k: getattr(got.stats, k).cpu() for k in vars(got.stats)})
    assert_stats_close(got_stats, ref.stats, base.stats, dtype, what)
    assert_grad_close(leaf.grad.cpu(), x64.grad, xb.grad, dtype, what + "grad")
    if w_grad:
        assert_values_close(wt.grad.cpu(), w64.grad, wb.grad, torch.float32, what + "token_weight grad")


# ---------------------------------------------------------------------------------------------------------------
# Bad values, degenerate rows, offsets, masked vocabularies.
# ---------------------------------------------------------------------------------------------------------------

CFG = LaunchConfig(block_v=32, rows=4)


def test_out_of_range_target_sets_bad_and_nan_without_crash():
    x = torch.randn(4, 40, device=DEV)
    t = torch.tensor([1, 40, -3, -100], device=DEV)
    for eager in (False, True):
        xx = x.clone().requires_grad_()
        res = triton_fused(xx, t, {}, CFG, eager=eager, reduction="sum")
        assert res.stats.bad.tolist() == [False, True, True, False]
        assert torch.isnan(res.token_loss[1:3]).all() and torch.isfinite(res.token_loss[[0, 3]]).all()
        assert torch.isnan(res.stats.nll[1:3]).all() and res.stats.nll[3] == 0
        assert torch.isnan(res.loss)
        res.loss.backward()  # no crash; the gradient of a bad row is unspecified
        assert torch.isfinite(xx.grad[[0, 3]]).all() and (xx.grad[3] == 0).all()
    s = triton_stats(x, t, {}, CFG)
    assert s.bad.tolist() == [False, True, True, False]
    assert s.argmax[3] == -1 and not s.correct[1] and not s.correct[2]


def test_all_rows_ignored_gives_exact_zeros_even_with_nan():
    x = torch.full((5, 33), float("nan"), device=DEV)
    t = torch.full((5,), -100, device=DEV)
    o = {"eps": 0.1, "lam": 1e-3}
    for eager in (False, True):
        xx = x.clone().requires_grad_()
        res = triton_fused(xx, t, o, CFG, eager=eager, normalizer=torch.tensor(1.0, device=DEV))
        assert res.loss.item() == 0.0 and res.loss.requires_grad
        res.loss.backward()
        assert torch.equal(xx.grad, torch.zeros_like(x))
        assert not res.stats.bad.any()
        for name in FLOAT_FIELDS:
            assert torch.equal(getattr(res.stats, name), torch.zeros(5, device=DEV))
        assert (res.stats.argmax == -1).all()


def test_neg_inf_in_support_with_smoothing_gives_inf_and_bad():
    x = torch.randn(3, 70, device=DEV)
    x[0, 40] = float("-inf")
    x[1, 0] = float("-inf")  # excluded column: legal
    t = torch.tensor([1, 2, 3], device=DEV)
    o = {"eps": 0.1, "ex": [0]}
    for eager in (False, True):
        res = triton_fused(x.clone().requires_grad_(), t, o, CFG, eager=eager, reduction="sum")
        assert res.token_loss[0] == float("inf") and res.stats.bad.tolist() == [True, False, False]
        assert torch.isfinite(res.token_loss[1:]).all()
    plain = triton_fused(x.clone().requires_grad_(), t, {}, CFG)
    assert not plain.stats.bad.any() and torch.isfinite(plain.token_loss).all()


@pytest.mark.parametrize("value", [float("-inf"), -1e9])
@pytest.mark.parametrize("eager", [False, True])
def test_excluded_column_at_neg_inf_or_huge_negative_does_not_disturb_the_smoothed_loss(value, eager):
    """Σ over the support is accumulated over the support only (never as all minus excluded)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 100, generator=g)
    x[:, [0, 63]] = value
    t = torch.tensor([5, 17, 64, 99])
    o = {"eps": 0.1, "ex": [0, 63], "lam": 1e-3}
    for conv in ("torch", "fairseq"):
        oc = {**o, "conv": conv}
        x64 = x.double().requires_grad_()
        ref = torch_fused(x64, t, oc)
        ref.loss.backward()
        xt = x.detach().clone().to(DEV).requires_grad_()
        got = triton_fused(xt, t.to(DEV), oc, CFG, eager=eager)
        got.loss.backward()
        torch.testing.assert_close(got.token_loss.cpu().double(), ref.token_loss, rtol=4e-6, atol=4e-6)
        assert not got.stats.bad.any()
        tol = 4e-6 * x64.grad.abs().max()
        assert (xt.grad.cpu().double() - x64.grad).abs().max() <= tol


def test_degenerate_row_all_other_logits_neg_inf():
    x = torch.full((2, 70), float("-inf"), device=DEV)
    x[0, 2] = 3.0
    x[1] = torch.randn(70, device=DEV)
    t = torch.tensor([2, 1], device=DEV)
    s = triton_stats(x, t, {}, CFG)
    assert s.lse[0] == 3.0 and s.nll[0] == 0 and s.log1m_target_prob[0] == float("-inf")
    assert s.entropy[0] == 0 and s.wrong_entropy[0] == 0 and s.argmax[0] == 2 and not s.bad[0]
    for eager in (False, True):
        xx = x.clone().requires_grad_()
        triton_fused(xx, t, {}, CFG, eager=eager).loss.backward()
        assert torch.isfinite(xx.grad).all(), "degenerate row: finite gradient"
        assert torch.equal(xx.grad[0], torch.zeros(70, device=DEV)), "plain CE of a certain row has zero gradient"
        xs = x.clone().requires_grad_()
        st = triton_stats(xs, t, {}, CFG)
        (st.lse + st.nll + st.entropy + st.wrong_entropy + st.support_mean_logit).sum().backward()
        assert torch.isfinite(xs.grad).all()
        xe = x.clone().requires_grad_()
        triton_fused(xe, t, {"eps": 0.1, "lam": 1e-3}, CFG, eager=eager).loss.backward()
        assert torch.isfinite(xe.grad).all()


@pytest.mark.parametrize("offset", [3e4, -3e4])
def test_common_offset_keeps_statistics_and_gradients_accurate(offset):
    """T7: a common offset up to 3e4 in fp32 (ulp 2e-3) leaves nll, H, H(q), ln(1 − p_y), the smoothed CE and G
    within c_fp32 of the fp64 oracle on the same rounded inputs, without the allowance for the fp32 reference."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(6, 300, generator=g) * 3 + offset).float()
    t = torch.randint(0, 300, (6,), generator=g)
    o = {"eps": 0.1, "ex": [7]}
    x64 = x.double().requires_grad_()
    ref = torch_fused(x64, t, o)
    ref.loss.backward()
    for eager in (False, True):
        xt = x.detach().clone().to(DEV).requires_grad_()
        got = triton_fused(xt, t.to(DEV), o, CFG, eager=eager)
        got.loss.backward()
        for name in ("nll", "entropy", "wrong_entropy", "log1m_target_prob"):
            torch.testing.assert_close(getattr(got.stats, name).cpu().double(), getattr(ref.stats, name),
                                       rtol=0, atol=4e-6, msg=name)
        torch.testing.assert_close(got.token_loss.cpu().double(), ref.token_loss, rtol=0, atol=4e-6)
        tol = 4e-6 * x64.grad.abs().amax(1, keepdim=True)
        assert ((xt.grad.cpu().double() - x64.grad).abs() <= tol).all()


def test_argmax_ties_take_the_lowest_index():
    x = torch.zeros(3, 70, device=DEV)
    x[1, [5, 40]] = 2.0
    x[2, [9, 66]] = 1.0
    t = torch.tensor([30, 40, 66], device=DEV)
    s = triton_stats(x, t, {}, CFG)
    assert s.argmax.tolist() == torch.argmax(x, dim=-1).tolist() == [0, 5, 9]
    assert s.correct.tolist() == [False, False, False]


# ---------------------------------------------------------------------------------------------------------------
# Precision suite (interpreted at V = 4099) against a 50-digit mpmath reference.
# ---------------------------------------------------------------------------------------------------------------

PV = 4099
MARGINS = (0.0, 5.0, 15.0, 25.0, 40.0, 100.0)
P_EPS, P_LAM = 0.1, 1e-4


def _mp_reference(row: torch.Tensor, y: int) -> dict:
    import mpmath

    with mpmath.workdps(50):
        vals, counts = torch.unique(torch.cat([row[:y], row[y + 1 :]]), return_counts=True)
        zy = mpmath.mpf(float(row[y]))
        zs = [(mpmath.mpf(float(v)), int(c)) for v, c in zip(vals, counts)]
        m = max(z for z, _ in zs)
        d = mpmath.fsum(c * mpmath.exp(z - m) for z, c in zs)
        s = mpmath.fsum(c * mpmath.exp(z - m) * (z - m) for z, c in zs)
        lneg = m + mpmath.log(d)
        lse = lneg + mpmath.log1p(mpmath.exp(zy - lneg))
        nll = lse - zy
        p_y, om = mpmath.exp(-nll), mpmath.exp(lneg - lse)
        hq = mpmath.log(d) - s / d
        sum_z = mpmath.fsum(c * z for z, c in zs) + zy
        return {
            "nll": nll, "log1m_target_prob": lneg - lse, "wrong_entropy": hq, "lse": lse, "one_minus_p_y": om,
            "entropy": p_y * nll + om * ((lse - lneg) + hq),
            "smoothed": nll - P_EPS * (sum_z / PV - zy),
            "g_y": P_EPS - om + 2 * P_LAM * lse * p_y - P_EPS / PV,
            "g_y_plain": -om,
        }


@pytest.fixture(scope="module")
def precision_case():
    g = torch.Generator().manual_seed(0)
    levels = (torch.randn(997, generator=g) * 2).float()
    x = levels[torch.randint(0, 997, (len(MARGINS), PV), generator=g)]
    t = torch.randint(0, PV, (len(MARGINS),), generator=g)
    for r, margin in enumerate(MARGINS):
        x[r, t[r]] = x[r].max() + margin
    return x, t, [_mp_reference(x[r], int(t[r])) for r in range(len(MARGINS))]


def _rel(got: float, ref) -> float:
    ref = float(ref)
    return abs(got) if ref == 0.0 else abs(got - ref) / abs(ref)


PCFG = LaunchConfig(block_v=1024, rows=8)
FP32_TINY = torch.finfo(torch.float32).tiny


def test_precision_statistics_and_target_gradient(precision_case):
    x, t, refs = precision_case
    xd, td = x.to(DEV), t.to(DEV)
    s = triton_stats(xd, td, {}, PCFG)
    plain = triton_fused(xd, td, {"eps": P_EPS}, PCFG, reduction="none")
    for r, margin in enumerate(MARGINS):
        ref = refs[r]
        checks = {"lse": s.lse[r], "log1m_target_prob": s.log1m_target_prob[r],
                  "wrong_entropy": s.wrong_entropy[r], "smoothed": plain.token_loss[r]}
        if float(ref["one_minus_p_y"]) > FP32_TINY:
            checks.update(nll=s.nll[r], entropy=s.entropy[r])
        for name, got in checks.items():
            err = _rel(float(got), ref[name])
            assert err <= 2e-5, f"margin {margin}: {name} relative error {err:.3g}"
    for eager in (False, True):
        for o, key in (({"eps": P_EPS, "lam": P_LAM}, "g_y"), ({}, "g_y_plain")):
            xx = xd.clone().requires_grad_()
            triton_fused(xx, td, o, PCFG, eager=eager).loss.backward()
            gy = xx.grad.gather(1, td[:, None])[:, 0].cpu()
            for r, margin in enumerate(MARGINS):
                want = float(refs[r][key])
                err = _rel(float(gy[r]), want)
                ok = err <= 1e-5 or (abs(want) < FP32_TINY and abs(float(gy[r]) - want) <= 2.0**-149)
                assert ok, f"margin {margin} ({key}, eager={eager}): G_y relative error {err:.3g}"


def test_precision_naive_control_fails(precision_case):
    """Control: fp32 ``softmax − onehot`` misses the G_y bound (the check above is sensitive)."""
    x, t, refs = precision_case
    p_y = torch.log_softmax(x, dim=-1).gather(1, t[:, None])[:, 0].exp()
    assert max(_rel(float(p_y[r] - 1.0), refs[r]["g_y_plain"]) for r in range(len(MARGINS))) > 1e-5


def test_portable_log1p_and_row_exp_match_numpy():
    """The device functions that replace libdevice: log1p to 2.8e-7 relative, e^x to full precision (subnormal
    results included)."""
    @triton.jit
    def probe(u_ptr, x_ptr, o1_ptr, o2_ptr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(o1_ptr + i, tk._log1p(tl.load(u_ptr + i)))
        tl.store(o2_ptr + i, tk._exp_row(tl.load(x_ptr + i)))

    u = torch.cat([torch.logspace(-12, 0, 62), torch.tensor([0.0, 1e-30])]).float().to(DEV)
    x = -torch.linspace(0, 103, 64).float().to(DEV)
    o1, o2 = torch.empty_like(u), torch.empty_like(x)
    probe[(1,)](u, x, o1, o2, BLOCK=64)
    want1 = torch.log1p(u.double().cpu())
    rel1 = ((o1.cpu().double() - want1).abs() / want1.clamp_min(1e-300)).nan_to_num(0.0)
    assert rel1.max() <= 3e-7
    want2 = torch.exp(x.cpu().double())
    err2 = (o2.cpu().double() - want2).abs()
    ok = (err2 <= 2e-7 * want2) | (err2 <= 2.0**-149)
    assert ok.all(), (x[~ok.to(x.device)], o2[~ok.to(x.device)])


# ---------------------------------------------------------------------------------------------------------------
# Gradient modes and the in-place contract.
# ---------------------------------------------------------------------------------------------------------------

MODE_OPTS = {"eps": 0.1, "ex": [0, 5], "lam": 1e-3}


def _mode_inputs(dtype=torch.float32, n=9, v=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, v, generator=g) * 3).to(dtype).to(DEV)
    t = torch.randint(0, v, (n,), generator=g).to(DEV)
    t[2] = -100
    w = (torch.rand(n, generator=g) + 0.5).to(DEV)
    return x, t, w


def _mode_grad(x, t, w, eager, upstream, inplace=False, grad_scale=1.0):
    leaf = x.clone().requires_grad_()
    xx = leaf * 1.0 if inplace else leaf
    res = triton_fused(xx, t, MODE_OPTS, CFG, weight=w, normalizer=torch.tensor(4.0, device=DEV), eager=eager,
                       inplace=inplace, grad_scale=grad_scale)
    res.loss.backward(upstream)
    return leaf.grad, res


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("upstream", [1.0, 0.5, 2.5])
def test_eager_equals_deferred(dtype, upstream):
    x, t, w = _mode_inputs(dtype)
    up = torch.tensor(upstream, device=DEV)
    ge, re = _mode_grad(x, t, w, True, up)
    gd, rd = _mode_grad(x, t, w, False, up)
    x64 = x.cpu().double().requires_grad_()
    ref = torch_fused(x64, t.cpu(), MODE_OPTS, weight=w.cpu().double(), normalizer=torch.tensor(4.0).double())
    ref.loss.backward(up.cpu().double())
    assert_grad_close(ge.cpu(), x64.grad, gd.cpu(), dtype, "eager vs deferred")
    assert_grad_close(gd.cpu(), x64.grad, ge.cpu(), dtype, "deferred vs eager")
    assert abs(re.loss.item() - rd.loss.item()) <= 1e-6 * max(1.0, abs(rd.loss.item()))


def test_grad_scale_device_scalar_and_matching_upstream_skip_rescale():
    x, t, w = _mode_inputs()
    g1, _ = _mode_grad(x, t, w, True, torch.tensor(0.25, device=DEV), grad_scale=torch.tensor(0.25, device=DEV))
    g2, _ = _mode_grad(x, t, w, False, torch.tensor(0.25, device=DEV))
    assert_grad_close(g1.cpu(), g2.cpu().double(), g2.cpu(), torch.float32, "grad_scale")
    g3, _ = _mode_grad(x, t, w, True, torch.tensor(0.25, device=DEV), grad_scale=0.25)
    assert torch.equal(g1, g3)


def test_rescale_kernel_is_a_no_op_when_upstream_matches_and_scales_otherwise():
    g = torch.randn(5, 70, device=DEV).to(torch.bfloat16)[:, :-1]  # a strided view
    before = g.clone()
    fused_loss_bwd(g, torch.tensor(0.5, device=DEV), 0.5, CFG)
    assert torch.equal(g, before)
    fused_loss_bwd(g, torch.tensor(1.0, device=DEV), torch.tensor(0.5, device=DEV), CFG)
    assert torch.equal(g, (before.float() * 2).to(torch.bfloat16))


def test_reduction_none_takes_a_per_token_upstream():
    x, t, w = _mode_inputs()
    up = torch.randn(9, device=DEV)
    xt = x.clone().requires_grad_()
    triton_fused(xt, t, MODE_OPTS, CFG, weight=w, reduction="none").loss.backward(up)
    x64 = x.cpu().double().requires_grad_()
    torch_fused(x64, t.cpu(), MODE_OPTS, weight=w.cpu().double(), reduction="none").loss.backward(up.cpu().double())
    assert_grad_close(xt.grad.cpu(), x64.grad, x64.grad.float(), torch.float32, "per-token upstream")


def test_second_eager_backward_raises():
    x, t, _ = _mode_inputs()
    xx = x.clone().requires_grad_()
    loss = triton_fused(xx, t, MODE_OPTS, CFG, eager=True).loss
    loss.backward(retain_graph=True)
    with pytest.raises(LossInputError, match='grad_mode="backward"'):
        loss.backward()
    xd = x.clone().requires_grad_()
    loss = triton_fused(xd, t, MODE_OPTS, CFG).loss
    loss.backward(retain_graph=True)
    loss.backward()


@pytest.mark.parametrize("eager", [False, True])
def test_double_backward_raises_pointing_to_torch_impl(eager):
    x, t, _ = _mode_inputs()
    xx = x.clone().requires_grad_()
    loss = triton_fused(xx, t, MODE_OPTS, CFG, eager=eager).loss
    with pytest.raises(LossInputError, match='impl="torch"'):
        torch.autograd.grad(loss, xx, create_graph=True)


@pytest.mark.parametrize("eager", [False, True])
@pytest.mark.parametrize("three_d", [False, True])
def test_inplace_off_leaves_logits_bitwise_unchanged(eager, three_d):
    x, t, _ = _mode_inputs(torch.bfloat16)
    if three_d:
        x = torch.randn(3, 4, 37).to(torch.bfloat16).to(DEV)[:, :-1]
        t = torch.randint(0, 37, (3, 3)).to(DEV)
    xx = x.clone().requires_grad_()
    before = xx.detach().clone()
    triton_fused(xx, t, MODE_OPTS, CFG, eager=eager).loss.backward()
    assert torch.equal(xx.detach().view(torch.int16), before.view(torch.int16))


@pytest.mark.parametrize("eager", [False, True])
@pytest.mark.parametrize("three_d", [False, True])
def test_inplace_writes_grad_into_logits_and_bumps_version(eager, three_d):
    x, t, w = _mode_inputs()
    if three_d:
        x = (torch.randn(3, 4, 37) * 3).to(DEV)
        t = torch.randint(0, 37, (3, 4)).to(DEV)
        w = (torch.rand(3, 4) + 0.5).to(DEV)
    expected, _ = _mode_grad(x, t, w, eager, torch.tensor(1.0, device=DEV))
    leaf = x.clone().requires_grad_()
    z = leaf * 1.0
    v0 = z._version
    res = triton_fused(z, t, MODE_OPTS, CFG, weight=w, normalizer=torch.tensor(4.0, device=DEV), eager=eager,
                       inplace=True)
    if eager:
        assert z._version > v0  # G already sits in z's storage
    res.loss.backward()
    assert z._version > v0
    torch.testing.assert_close(leaf.grad, expected, rtol=0, atol=0)
    torch.testing.assert_close(z.detach(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("eager", [False, True])
def test_inplace_second_consumer_gets_pytorch_inplace_error(eager):
    x, t, _ = _mode_inputs()
    leaf = x.clone().requires_grad_()
    z = leaf * 1.0
    other = (z.exp() * z).sum()  # saves z for its backward
    loss = triton_fused(z, t, MODE_OPTS, CFG, eager=eager, inplace=True).loss
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()


def test_token_weight_gradient_is_free_in_eager_mode():
    x, t, w = _mode_inputs()
    grads = []
    for eager in (True, False):
        ww = w.clone().requires_grad_()
        triton_fused(x.clone().requires_grad_(), t, MODE_OPTS, CFG, weight=ww, eager=eager,
                     normalizer=torch.tensor(3.0, device=DEV)).loss.backward()
        grads.append(ww.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-7)
    assert grads[0][2] == 0  # ignored row


def test_unused_fields_cost_nothing_and_give_zero_gradient():
    x, t, _ = _mode_inputs()
    xx = x.clone().requires_grad_()
    s = triton_stats(xx, t, {}, CFG)
    (s.lse.sum() * 0).backward()  # only lse used, with a zero upstream
    assert torch.equal(xx.grad, torch.zeros_like(x))


def test_launchers_are_bitwise_deterministic():
    x, t, w = _mode_inputs(torch.bfloat16)
    g1, r1 = _mode_grad(x, t, w, True, torch.tensor(1.0, device=DEV))
    g2, r2 = _mode_grad(x, t, w, True, torch.tensor(1.0, device=DEV))
    assert torch.equal(g1, g2) and torch.equal(r1.loss, r2.loss)


# ---------------------------------------------------------------------------------------------------------------
# No host syncs, compile, bitmask, configs and argument checks.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(DEV.type != "cpu", reason="the dispatch-mode guard is the CPU stand-in for sync debug mode")
def test_every_launcher_and_function_runs_without_host_sync():
    """Raw launchers (what the custom ops run: the guard does not see inside an op) and both Functions, every
    mode, in place or not, with float and device-scalar grad_scale."""
    x, t, w = _mode_inputs(n=7, v=41)
    o = {"ex": [1, 2], "eps": 0.1, "lam": 1e-4}
    prep = _prep(x, t, o)
    sm = prepare_smoothing(prep, 0.1, "torch", None, x.device)
    ex = exclusion_bitmask(prep.support.ids, 41, x.device)  # warm the cache (built once, outside the step)
    with SyncGuard():
        ex = exclusion_bitmask(prep.support.ids, 41, x.device)
        outs = tl_launch.launch_token_stats(x, prep.target, prep.valid, prep.out_of_range, ex, prep.num_support,
                                            True, CFG)
        g = torch.empty_like(x)
        tl_launch.launch_token_grad(x, g, prep.target, prep.valid, ex, prep.num_support, outs[11],
                                    [torch.ones(7).expand(7)] * 8, CFG)
        tl_launch.launch_fused_loss(x, g, prep.target, prep.valid, prep.out_of_range, ex, prep.num_support, w, 1.0,
                                    torch.tensor(0.5), torch.tensor(3.0), sm.eps_t, sm.eps_over_kt, sm.target_in_at,
                                    1e-3, CFG)
        tl_launch.launch_grad_rescale(g, torch.tensor(0.25), 0.5, None, CFG)
        for eager, inplace, scale in itertools.product((False, True), (False, True), (0.5, torch.tensor(0.5))):
            leaf = x.clone().requires_grad_()
            ww = w.clone().requires_grad_()
            res = triton_fused(leaf * 1.0, t, o, CFG, weight=ww, normalizer=torch.tensor(5.0), eager=eager,
                               inplace=inplace, grad_scale=scale)
            res.loss.backward()
            _ = res.stats.bad.any()  # flags stay on device
        xs = x.clone().requires_grad_()
        s = triton_stats(xs, t, o, CFG)
        (s.lse + s.nll + s.entropy + s.wrong_entropy + s.log1m_target_prob + s.support_mean_logit).sum().backward()


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_torch_compile_of_a_step_equals_eager():
    """The launchers are custom ops with fake implementations: a compiled step traces through both Functions
    (``aot_eager`` here; the GPU test uses inductor) and gives the eager result."""
    x, t, w = _mode_inputs(n=6, v=41)

    def step(leaf):
        z = leaf * 1.0
        res = triton_fused(z, t, MODE_OPTS, CFG, weight=w, normalizer=torch.tensor(4.0, device=DEV), eager=True)
        s = triton_stats(z, t, MODE_OPTS, CFG)
        return res.loss + 0.1 * s.wrong_entropy.sum()

    xe = x.clone().requires_grad_()
    le = step(xe)
    le.backward()
    xc = x.clone().requires_grad_()
    lc = torch.compile(step, backend="aot_eager", fullgraph=False)(xc)
    lc.backward()
    assert torch.equal(lc, le) and torch.equal(xc.grad, xe.grad)


def test_exclusion_bitmask_bits_and_cache():
    m = exclusion_bitmask((0, 31, 32, 99), 100, DEV)
    assert m.dtype == torch.int32 and m.shape == (4,)
    words = [int(w) & 0xFFFFFFFF for w in m.cpu()]
    assert words == [1 | (1 << 31), 1, 0, 1 << 3]
    assert exclusion_bitmask((0, 31, 32, 99), 100, DEV) is m  # built once per (ids, V, device)
    assert exclusion_bitmask((), 100, DEV) is None


def test_config_table_and_checks():
    for v in (2, 1000, 4096, 4097, 32000, 128256, 256000):
        cfg = default_config(v, torch.bfloat16, "cuda")
        assert cfg.rows * cfg.block_v <= 4096 and cfg.rows * cfg.block_v <= 256 * cfg.num_warps  # registers
    small = default_config(1000, torch.bfloat16, "cuda")
    assert small.block_v == 1024 and small.rows == 4
    assert default_config(4099, torch.float32, "cpu").block_v == 1024
    with pytest.raises(LossInputError, match="block_v"):
        LaunchConfig(block_v=48)
    with pytest.raises(LossInputError, match="rows"):
        LaunchConfig(block_v=32, rows=0)
    with pytest.raises(LossInputError, match="65536"):
        LaunchConfig(block_v=65536, rows=2)


def test_bad_logits_are_rejected_with_clear_errors():
    t = torch.tensor([0, 1], device=DEV)
    x64 = torch.randn(2, 5, dtype=torch.float64, device=DEV)
    with pytest.raises(LossInputError, match="fp64"):
        token_stats_fwd(x64, _prep(x64, t, {}))
    xs = torch.randn(5, 2, device=DEV).t()  # class stride 2
    with pytest.raises(LossInputError, match="stride 1"):
        token_stats_fwd(xs, _prep(xs, t, {}))
    with pytest.raises(LossInputError, match="LaunchConfig"):
        x = torch.randn(2, 5, device=DEV)
        token_stats_fwd(x, _prep(x, t, {}), config=(32, 4))


def test_empty_batch_launches_nothing():
    x = torch.randn(0, 7, device=DEV, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long, device=DEV)
    res = triton_fused(x, t, {}, CFG, eager=True)
    res.loss.backward()
    assert res.loss.item() == 0.0 and x.grad.shape == (0, 7)
    f, consts = token_stats_fwd(x.detach(), _prep(x, t, {}), CFG, save_constants=True)
    assert f.lse.shape == (0,) and consts.shape[1] == 0
    g = token_stats_bwd(x.detach(), _prep(x, t, {}), consts, [None] * 8, inplace=False, config=CFG)
    assert g.shape == (0, 7)


def test_matrix_covers_every_v_n_dtype_and_3d():
    assert {(v, n) for v, n, _, _ in CASES} == set(itertools.product((2, 123, 1000, 4099), (1, 3, 17)))
    assert {d for _, _, d, _ in CASES} == set(DTYPES)
    assert {v for v, _, _, three_d in CASES if three_d} == {2, 123, 1000, 4099}
