"""The chunked implementation against the fp64 oracle: the section 5 matrix of spec/kernels.md (sampled).

Every case compares ``impl="chunked"`` in dtype d with the ``torch`` implementation in fp64 on the same
rounded inputs (the oracle), allowing the error of the ``torch`` implementation in d plus c_d·max(1, |ref|)
(values) or c_d·max_j|G_ref| per row (gradients).
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from losskit import kernels
from losskit.contract import LossInputError

from ._oracle import FLOAT_FIELDS, assert_grad_close, assert_stats_close, assert_values_close

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _make_case(seed: int, v: int, n: int, dtype: torch.dtype, three_d: bool):
    """Random logits/targets exercising one sample of the §5 feature list."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    if three_d:
        b = max(1, n // 3)
        t_len = n // b + 1
        base = torch.randn(b, t_len + 1, v, generator=g, dtype=torch.float64) * 3
        logits64 = base[:, :-1]  # a shifted view: rows are not one stride apart across the batch
    else:
        logits64 = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    lead = logits64.shape[:-1]
    target = torch.randint(0, v, lead, generator=g)
    flat_t = target.view(-1)
    logits64.reshape(-1, v) if not three_d else None
    features = {}
    nrows = flat_t.numel()

    # Per-row features, chosen at random rows.
    def rowview(i):
        return logits64[i // lead[-1], i % lead[-1]] if three_d else logits64[i]

    if rng.random() < 0.5 and nrows > 1:
        i = rng.randrange(nrows)
        rowview(i).mul_(0).add_(torch.randn(v, generator=g, dtype=torch.float64)).add_(
            rng.choice([1e4, -1e4])
        )
        features["offset"] = i
    if rng.random() < 0.6:
        i = rng.randrange(nrows)
        margin = rng.choice([25.0, 40.0, 100.0])
        r = rowview(i)
        r[int(flat_t[i])] = r.max() + margin
        features["margin"] = i
    if rng.random() < 0.5 and v > 2:
        cols = torch.randint(0, v, (max(1, v // 10),), generator=g)
        i = rng.randrange(nrows)
        r = rowview(i)
        keep = int(flat_t[i])
        r[cols] = float("-inf")
        r[keep] = 0.5
        features["neginf"] = (i, cols)
    logits = logits64.to(dtype)
    return logits, target, features


def _ids_for(v: int, target: torch.Tensor, rng: random.Random, with_target: bool):
    ex = sorted({rng.randrange(v) for _ in range(min(3, v - 1))}) if v > 2 else [0]
    if with_target:
        ex = sorted(set(ex) | {int(target.reshape(-1)[0])})
    return ex


CASES = []
_rng = random.Random(1234)
for v, n in itertools.product((2, 123, 1000, 4099), (1, 3, 17)):
    for dtype in DTYPES:
        if _rng.random() < 0.45:
            CASES.append((v, n, dtype, _rng.random() < 0.4))
# Make sure every V and dtype appears with 3-D views.
CASES += [(123, 17, torch.float32, True), (4099, 3, torch.bfloat16, True), (2, 17, torch.float16, True)]


def _case_options(seed: int, v: int, target: torch.Tensor):
    rng = random.Random(seed)
    lead = target.shape
    mask = None
    ignore_index = rng.choice([-100, -100, 0, None])
    t = target.clone()
    flat = t.view(-1)
    if ignore_index == -100 and flat.numel() > 1:
        flat[rng.randrange(flat.numel())] = -100
    if rng.random() < 0.4:
        mask = torch.rand(lead, generator=torch.Generator().manual_seed(seed)) > 0.3
    eps = rng.choice([0.0, 0.1])
    conv = rng.choice(["torch", "fairseq"])
    ex = [] if rng.random() < 0.4 or v <= 2 else _ids_for(v, target, rng, rng.random() < 0.5)
    lam = rng.choice([0.0, 1e-3])
    chunk = rng.choice([None, 4 * v * 2, 4 * 50])  # default, two rows per chunk, vocab blocks of 50 columns
    return {
        "ignore_index": ignore_index,
        "mask": mask,
        "eps": eps,
        "conv": conv,
        "ex": ex,
        "lam": lam,
        "chunk": chunk,
    }, t


def _stats(x, t, o, impl, **kw):
    return kernels.token_stats(
        x,
        t,
        ignore_index=o["ignore_index"],
        mask=o["mask"],
        smoothing_exclude=o["ex"],
        impl=impl,
        chunk_bytes=o["chunk"] if impl == "chunked" else None,
        **kw,
    )


def _random_combo(stats, weights):
    """Σ_k Σ_t r_kt·field_k over finite reference entries (a random upstream for every field)."""
    total = 0
    for name, (r, finite) in weights.items():
        total = total + torch.where(finite, r * getattr(stats, name).double(), 0.0).sum()
    return total


@pytest.mark.parametrize("case", range(len(CASES)))
def test_token_stats_matrix(case):
    v, n, dtype, three_d = CASES[case]
    logits, target, _ = _make_case(case, v, n, dtype, three_d)
    o, t = _case_options(case, v, target)
    x64 = logits.detach().double().requires_grad_()
    ref = _stats(x64, t, o, "torch")
    xb = logits.detach().clone().requires_grad_()
    base = _stats(xb, t, o, "torch")
    xc = logits.detach().clone().requires_grad_()
    got = _stats(xc, t, o, "chunked")
    assert_stats_close(got, ref, base, dtype, f"case {case} ")
    assert torch.equal(got.argmax, ref.argmax)
    assert torch.equal(got.correct, ref.correct)
    g = torch.Generator().manual_seed(case)
    weights = {}
    for name in FLOAT_FIELDS:
        r = torch.randn(ref.lse.shape, generator=g, dtype=torch.float64)
        weights[name] = (r, torch.isfinite(getattr(ref, name)))
    _random_combo(ref, weights).backward()
    _random_combo(base, weights).backward()
    _random_combo(got, weights).backward()
    assert xc.grad.dtype == dtype
    assert_grad_close(xc.grad, x64.grad, xb.grad, dtype, f"case {case} grad")
    invalid = ~ref.valid
    assert bool((xc.grad[invalid] == 0).all()), "ignored rows must get an exact zero gradient"


@pytest.mark.parametrize("case", range(len(CASES)))
def test_fused_loss_matrix(case):
    v, n, dtype, three_d = CASES[case]
    logits, target, feats = _make_case(case + 1000, v, n, dtype, three_d)
    o, t = _case_options(case + 1000, v, target)
    if o["eps"] > 0 and "neginf" in feats:
        o["eps"] = 0.0  # −inf inside the support makes the smoothed loss +inf (tested separately)
    rng = random.Random(case)
    mode = rng.choice(["auto", "forward", "backward"])
    reduction = "none" if mode == "backward" and rng.random() < 0.5 else "sum"
    weighted = rng.random() < 0.6
    w_grad = weighted and rng.random() < 0.5
    upstream = rng.choice(["one", "half", "device"]) if reduction == "sum" else "per_token"
    inplace = rng.random() < 0.3
    hard = None if rng.random() < 0.7 or not o["ex"] else o["ex"][:1]
    g = torch.Generator().manual_seed(case)
    w0 = torch.rand(target.shape, generator=g, dtype=torch.float64) + 0.5 if weighted else None
    normalizer = torch.tensor(7.0) if reduction == "sum" else None

    def run(x, impl, wdtype):
        w = None if w0 is None else w0.to(wdtype).clone().requires_grad_(w_grad)
        in_place = inplace and impl == "chunked"
        res = kernels.fused_token_loss(
            x.clone() if in_place else x,  # in place needs a non-leaf producer (its G flows back to x)
            t,
            ignore_index=o["ignore_index"],
            mask=o["mask"],
            token_weight=w,
            label_smoothing=o["eps"],
            smoothing_convention=o["conv"],
            smoothing_exclude=o["ex"],
            hard_target_ids=hard,
            z_loss=o["lam"],
            normalizer=None
            if normalizer is None
            else normalizer.to(torch.float64 if wdtype == torch.float64 else torch.float32),
            reduction=reduction,
            grad_mode=mode if impl == "chunked" else "auto",
            inplace_grad=in_place,
            impl=impl,
            chunk_bytes=o["chunk"] if impl == "chunked" else None,
        )
        if upstream == "one":
            res.loss.backward()
        elif upstream == "half":
            res.loss.backward(torch.tensor(0.5, dtype=res.loss.dtype))
        elif upstream == "device":
            res.loss.backward(torch.tensor(1.75, dtype=res.loss.dtype))
        else:
            up = torch.randn(res.loss.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
            res.loss.backward(up.to(res.loss.dtype))
        return res, w

    x64 = logits.detach().double().requires_grad_()
    ref, w64 = run(x64, "torch", torch.float64)
    xb = logits.detach().clone().requires_grad_()
    base, wb = run(xb, "torch", torch.float32)
    xc = logits.detach().clone().requires_grad_()
    got, wc = run(xc, "chunked", torch.float32)
    what = f"case {case} ({mode}, {reduction}, {upstream}, inplace={inplace}) "
    assert_values_close(got.loss.detach(), ref.loss.detach(), base.loss.detach(), dtype, what + "loss")
    assert_values_close(got.token_loss, ref.token_loss, base.token_loss, dtype, what + "token_loss")
    assert_stats_close(got.stats, ref.stats, base.stats, dtype, what)
    grad_c = xc.grad
    assert_grad_close(grad_c, x64.grad, xb.grad, dtype, what + "grad")
    if w_grad:
        assert_values_close(wc.grad, w64.grad, wb.grad, torch.float32, what + "token_weight grad")


def test_out_of_range_target_sets_bad_and_nan_without_crash():
    x = torch.randn(4, 10, requires_grad=True)
    t = torch.tensor([1, 10, -3, -100])
    res = kernels.fused_token_loss(x, t, impl="chunked", reduction="none", grad_mode="backward")
    assert res.stats.bad.tolist() == [False, True, True, False]
    assert torch.isnan(res.token_loss[1:3]).all() and torch.isfinite(res.token_loss[[0, 3]]).all()
    assert torch.isnan(res.stats.nll[1:3]).all() and res.stats.nll[3] == 0
    res.loss.sum().backward()  # no crash; the gradient of a bad row is unspecified
    s = kernels.token_stats(x.detach(), t, impl="chunked")
    assert s.bad.tolist() == [False, True, True, False]
    assert s.argmax[3] == -1 and not s.correct[1]


def test_all_rows_ignored_gives_exact_zeros_even_with_nan():
    x = torch.full((5, 33), float("nan")).requires_grad_()
    t = torch.full((5,), -100)
    for mode in ("forward", "backward"):
        x.grad = None
        res = kernels.fused_token_loss(x, t, impl="chunked", grad_mode=mode, label_smoothing=0.1, z_loss=1e-3)
        assert res.loss.item() == 0.0 and res.loss.requires_grad
        res.loss.backward()
        assert torch.equal(x.grad, torch.zeros_like(x))
        assert not res.stats.bad.any()
        for name in FLOAT_FIELDS:
            assert torch.equal(getattr(res.stats, name), torch.zeros(5))
        assert (res.stats.argmax == -1).all()


def test_neg_inf_in_support_with_smoothing_gives_inf_and_bad():
    x = torch.randn(3, 9)
    x[0, 4] = float("-inf")
    x[1, 0] = float("-inf")  # excluded column: legal
    t = torch.tensor([1, 2, 3])
    res = kernels.fused_token_loss(
        x, t, impl="chunked", label_smoothing=0.1, smoothing_exclude=[0], reduction="none"
    )
    assert res.token_loss[0] == float("inf") and res.stats.bad.tolist() == [True, False, False]
    assert torch.isfinite(res.token_loss[1:]).all()
    plain = kernels.fused_token_loss(x, t, impl="chunked", reduction="none")
    assert not plain.stats.bad.any() and torch.isfinite(plain.token_loss).all()


def test_degenerate_row_all_other_logits_neg_inf():
    x = torch.full((2, 6), float("-inf"), dtype=torch.float64)
    x[0, 2] = 3.0
    x[1] = torch.randn(6, dtype=torch.float64)
    t = torch.tensor([2, 1])
    for impl in ("torch", "chunked"):
        s = kernels.token_stats(x, t, impl=impl)
        assert s.lse[0] == 3.0 and s.nll[0] == 0 and s.log1m_target_prob[0] == float("-inf")
        assert s.entropy[0] == 0 and s.wrong_entropy[0] == 0 and s.argmax[0] == 2 and not s.bad[0]


def test_gradcheck_fp64_token_stats_fields_and_fused_loss():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[0, 1, -100], [4, 1, 2]])
    for chunk in (None, 4 * 2 * 8):  # whole rows, and vocab blocks of 2 columns
        for name in FLOAT_FIELDS:

            def f(z, name=name, chunk=chunk):
                return getattr(
                    kernels.token_stats(z, t, smoothing_exclude=[1], impl="chunked", chunk_bytes=chunk), name
                )

            torch.autograd.gradcheck(f, (x,))
        w = torch.rand(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
        # Eager mode hands its one gradient buffer to the first backward, and gradcheck backpropagates twice
        # through one graph; eager is compared with deferred in test_modes.py instead.
        for eps, conv, mode, red in itertools.product(
            (0.0, 0.1), ("torch", "fairseq"), ("backward",), ("sum", "none")
        ):

            def loss(z, w, eps=eps, conv=conv, mode=mode, red=red, chunk=chunk):
                return kernels.fused_token_loss(
                    z,
                    t,
                    token_weight=w,
                    label_smoothing=eps,
                    smoothing_convention=conv,
                    smoothing_exclude=[1],
                    z_loss=1e-2,
                    reduction=red,
                    grad_mode=mode,
                    impl="chunked",
                    chunk_bytes=chunk,
                    normalizer=torch.tensor(3.0, dtype=torch.float64) if red == "sum" else None,
                ).loss

            torch.autograd.gradcheck(loss, (x, w))


def test_entropy_of_wrong_answers_is_independent_of_target_logit():
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 3, 6, 2])
    kernels.token_stats(x, t, impl="chunked").wrong_entropy.sum().backward()
    assert torch.equal(x.grad.gather(1, t[:, None]), torch.zeros(4, 1, dtype=torch.float64))


def test_bad_arguments_name_the_argument():
    x, t = torch.randn(2, 5), torch.tensor([0, 1])
    with pytest.raises(LossInputError, match="chunk_bytes"):
        kernels.token_stats(x, t, impl="chunked", chunk_bytes=0)
    with pytest.raises(LossInputError, match="smoothing_exclude"):
        kernels.token_stats(x, t, impl="chunked", smoothing_exclude=[7])
    with pytest.raises(LossInputError, match="grad_mode"):
        kernels.fused_token_loss(x, t, impl="chunked", grad_mode="eager")
    with pytest.raises(LossInputError, match="reduction"):
        kernels.fused_token_loss(x, t, impl="chunked", reduction="mean")
    with pytest.raises(LossInputError, match="normalizer"):
        kernels.fused_token_loss(x, t, impl="chunked", reduction="none", normalizer=2.0)
    with pytest.raises(LossInputError, match="grad_mode"):
        kernels.fused_token_loss(x, t, impl="chunked", reduction="none", grad_mode="forward")
    with pytest.raises(LossInputError, match="label_smoothing"):
        kernels.fused_token_loss(x, t, impl="chunked", label_smoothing=1.0)
    with pytest.raises(LossInputError, match="hard_target_ids"):
        kernels.fused_token_loss(x, t, impl="chunked", label_smoothing=0.1, hard_target_ids=[9])
    with pytest.raises(LossInputError, match="grad_scale"):
        kernels.fused_token_loss(x, t, impl="chunked", grad_scale=0.0)
    with pytest.raises(LossInputError, match="target"):
        kernels.token_stats(x, torch.tensor([0]), impl="chunked")
