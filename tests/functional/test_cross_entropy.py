"""functional.cross_entropy, entropy, wrong_answer_entropy (spec/modifiers.md §1, acceptance 1, 7, 8, 11, 14, 15).

Oracles: pinned numbers of the spec, mpmath at 50 digits, ``torch.nn.functional.cross_entropy``, and a test-only
dense ``-Σ q log p`` (the library itself never builds the dense target distribution).
"""

from __future__ import annotations

import itertools
import math
import warnings

import mpmath
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from losskit.contract import CrossEntropyParts, EmptyBatchWarning, LossInputError, StepCounts
from losskit.functional import (
    check_label_smoothing,
    cross_entropy,
    entropy,
    exclude_ids,
    smoothing_support,
    wrong_answer_entropy,
)

F64 = {"rtol": 1e-12, "atol": 1e-14}
F32 = {"rtol": 1e-5, "atol": 1e-7}
SEED_ROW = [2.0, 1.0, 4.0, 0.5]  # seed 000's entropy example, target 2


def tol(dtype):
    return F64 if dtype == torch.float64 else F32


def rand_case(shape, num_classes, dtype=torch.float64, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, num_classes, generator=g, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, num_classes, shape, generator=g)
    return logits, target


# --------------------------------------------------------------------------------------------------------
# Test-only oracles
# --------------------------------------------------------------------------------------------------------


def dense_smoothed_ce(logits, target, eps, convention, excluded, valid):
    """-Σ_c q_c log p_c with the dense target distribution q of spec/modifiers.md §1.3 (test oracle only)."""
    num_classes = logits.shape[-1]
    lp = torch.log_softmax(logits.double(), -1)
    tc = torch.where(valid, target, 0)
    onehot = F.one_hot(tc, num_classes).double()
    support = torch.ones(num_classes, dtype=torch.bool)
    support[list(excluded)] = False
    k = int(support.sum())
    if convention == "torch":
        smooth = support.double().expand_as(onehot) / k
    else:
        smooth = (support.double() * (1 - onehot)) / (k - 1)
    q = (1 - eps) * onehot + eps * smooth
    hard = ~support[tc]
    q = torch.where(hard[..., None], onehot, q)
    loss = -(q * lp).sum(-1)
    return torch.where(valid, loss, 0.0)


def mp_row_stats(row, y):
    """(lse, CE, H(p), H(q), ln(1-p_y)) of one logits row at 50 digits."""
    mpmath.mp.dps = 50
    z = [mpmath.mpf(v) for v in row]
    lse = mpmath.log(sum(mpmath.exp(v) for v in z))
    p = [mpmath.exp(v - lse) for v in z]
    h = -sum(pi * mpmath.log(pi) for pi in p)
    wrong = 1 - p[y]
    q = [p[j] / wrong for j in range(len(z)) if j != y]
    hq = -sum(qi * mpmath.log(qi) for qi in q)
    return float(lse), float(lse - z[y]), float(h), float(hq), float(mpmath.log(wrong))


# --------------------------------------------------------------------------------------------------------
# Acceptance 1: the seed entropy token
# --------------------------------------------------------------------------------------------------------


def test_seed_entropy_token_fp64_pinned_and_mpmath():
    logits = torch.tensor([SEED_ROW], dtype=torch.float64)
    target = torch.tensor([2])
    lse, ce, h, hq, l1m = mp_row_stats(SEED_ROW, 2)
    got_hq = wrong_answer_entropy(logits, target)
    got_h = entropy(logits)
    got_ce = cross_entropy(logits, target)
    parts = cross_entropy(logits, target, z_loss=1.0, return_parts=True)
    got_lse = parts.z_loss.sqrt()
    # Pinned numbers of spec/modifiers.md §4.1 (6 decimals) ...
    assert round(got_hq.item(), 6) == 0.905959 and round(got_hq.item(), 4) == 0.9060
    assert round(got_h.item(), 6) == 0.627587
    assert round(got_ce.item(), 6) == 0.195007
    assert round(got_lse.item(), 6) == 4.195007
    assert round(l1m, 6) == -1.730638
    # ... and the exact values.
    torch.testing.assert_close(got_hq, torch.tensor([hq], dtype=torch.float64), **F64)
    torch.testing.assert_close(got_h, torch.tensor([h], dtype=torch.float64), **F64)
    torch.testing.assert_close(got_ce, torch.tensor(ce, dtype=torch.float64), **F64)
    torch.testing.assert_close(got_lse, torch.tensor(lse, dtype=torch.float64), **F64)
    # ln(1 - p_y) enters through the entropy grouping rule H(p) = p_y·CE + (1-p_y)(-ln(1-p_y) + H(q)).
    p_y = math.exp(-got_ce.item())
    regrouped = p_y * got_ce.item() + (1 - p_y) * (-l1m + got_hq.item())
    assert regrouped == pytest.approx(got_h.item(), rel=1e-12)


def test_seed_entropy_token_fp32_within_1e6():
    logits = torch.tensor([SEED_ROW], dtype=torch.float32)
    target = torch.tensor([2])
    _, ce, h, hq, _ = mp_row_stats(SEED_ROW, 2)
    hq32 = wrong_answer_entropy(logits, target)
    assert hq32.dtype == torch.float32
    assert abs(hq32.item() - hq) < 1e-6
    assert abs(entropy(logits).item() - h) < 1e-6
    assert abs(cross_entropy(logits, target).item() - ce) < 1e-6


# --------------------------------------------------------------------------------------------------------
# Acceptance 8: closed forms
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("convention", "excluded", "expected"),
    [
        ("torch", (), 0.407507),
        ("fairseq", (), 0.478341),
        ("torch", (0,), 0.411674),
        ("fairseq", (0,), 0.520007),
    ],
)
def test_seed_token_smoothing_pinned(convention, excluded, expected):
    logits = torch.tensor([SEED_ROW], dtype=torch.float64)
    target = torch.tensor([2])
    got = cross_entropy(
        logits, target, label_smoothing=0.1, smoothing_convention=convention, smoothing_exclude=excluded
    )
    assert round(got.item(), 6) == expected
    ref = dense_smoothed_ce(logits, target, 0.1, convention, excluded, torch.ones(1, dtype=torch.bool))
    torch.testing.assert_close(got, ref.mean(), **F64)


def test_seed_token_z_loss_pinned():
    logits = torch.tensor([SEED_ROW], dtype=torch.float64)
    target = torch.tensor([2])
    parts = cross_entropy(logits, target, z_loss=1e-4, return_parts=True)
    assert round(parts.z_loss.item(), 8) == 0.00175981
    lse = torch.logsumexp(logits, -1)
    torch.testing.assert_close(parts.z_loss, (1e-4 * lse**2).squeeze(), **F64)
    torch.testing.assert_close(parts.loss, parts.nll + parts.z_loss, **F64)


@pytest.mark.parametrize(("convention", "expected"), [("torch", 0.361773), ("fairseq", 0.431088)])
def test_notebook_distribution_pinned(convention, expected):
    # Seed 004: p = [0.8, 0.1, 0.1], y = 0, ε = 0.1; plain CE is -ln 0.8.
    logits = torch.tensor([[0.8, 0.1, 0.1]], dtype=torch.float64).log()
    target = torch.tensor([0])
    got = cross_entropy(logits, target, label_smoothing=0.1, smoothing_convention=convention)
    assert round(got.item(), 6) == expected
    assert round(cross_entropy(logits, target).item(), 6) == 0.223144


def test_fairseq_equals_eps_over_v_minus_1_rule():
    logits, target = rand_case((4, 6), 9, seed=3)
    eps, v = 0.2, 9
    lp = torch.log_softmax(logits, -1)
    nll = -lp.gather(-1, target[..., None]).squeeze(-1)
    ref = (1 - eps - eps / (v - 1)) * nll + eps / (v - 1) * (-lp).sum(-1)
    got = cross_entropy(logits, target, label_smoothing=eps, smoothing_convention="fairseq", reduction="none")
    torch.testing.assert_close(got, ref, **F64)


@pytest.mark.parametrize("convention", ["torch", "fairseq"])
@pytest.mark.parametrize("excluded", [(), (0, 1, 2)])
@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_closed_form_equals_dense_target(convention, excluded, eps):
    logits, target = rand_case((3, 7), 10, seed=11)
    target[0, :3] = torch.tensor([0, 1, 2])  # hard special targets
    target[2, 4] = -100
    valid = target != -100
    ref = dense_smoothed_ce(logits, target, eps, convention, excluded, valid)
    kw = {"label_smoothing": eps, "smoothing_convention": convention, "smoothing_exclude": excluded}
    got = cross_entropy(logits, target, reduction="none", **kw)
    torch.testing.assert_close(got, ref, **F64)
    torch.testing.assert_close(cross_entropy(logits, target, reduction="sum", **kw), ref.sum(), **F64)
    torch.testing.assert_close(cross_entropy(logits, target, **kw), ref.sum() / valid.sum(), **F64)
    if excluded:
        # Special targets keep the hard target: their loss is plain CE.
        plain = cross_entropy(logits, target, reduction="none")
        torch.testing.assert_close(got[0, :3], plain[0, :3], **F64)


def test_excluded_columns_may_be_minus_inf_with_smoothing():
    # A masked special column gets no smoothing mass, so -inf there is legal even at ε > 0.
    logits, target = rand_case((2, 5), 6, seed=5)
    target = target.clamp(min=1)
    logits[..., 0] = float("-inf")
    logits.requires_grad_(True)
    got = cross_entropy(logits, target, label_smoothing=0.1, smoothing_exclude=[0], reduction="none")
    finite = logits.detach().clone()
    finite[..., 0] = -1e4  # exp(-1e4) = 0 in fp64: same distribution, finite dense oracle
    ref = dense_smoothed_ce(finite, target, 0.1, "torch", (0,), torch.ones_like(target, dtype=torch.bool))
    torch.testing.assert_close(got, ref, **F64)
    got.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[..., 0] == 0).all()


# --------------------------------------------------------------------------------------------------------
# Acceptance 7: torch parity
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(13,), (3, 5)])
@pytest.mark.parametrize("ignore_index", [-100, 0, 5])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_torch_parity_value_and_gradient(eps, ignore_index, shape, dtype):
    num_classes = 7
    logits, target = rand_case(shape, num_classes, dtype=dtype, seed=abs(ignore_index) + int(eps * 10))
    flat = target.view(-1)
    flat[::4] = ignore_index  # some ignored positions, with the ignore value itself (-100 or a class id)
    for reduction in ("none", "sum", "mean"):
        ours_in = logits.clone().requires_grad_(True)
        ref_in = logits.clone().requires_grad_(True)
        ours = cross_entropy(
            ours_in, target, ignore_index=ignore_index, label_smoothing=eps, reduction=reduction
        )
        ref = F.cross_entropy(
            ref_in.flatten(0, -2),
            target.flatten(),
            ignore_index=ignore_index,
            label_smoothing=eps,
            reduction=reduction,
        )
        assert ours.dtype == dtype
        assert ours.shape == (shape if reduction == "none" else ())
        torch.testing.assert_close(ours.reshape(ref.shape), ref, **tol(dtype))
        g = torch.linspace(0.5, 1.5, ours.numel(), dtype=dtype).reshape(ours.shape)
        ours.backward(g)
        ref.backward(g.reshape(ref.shape))
        torch.testing.assert_close(ours_in.grad, ref_in.grad, **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_class_weighted_parity(reduction, dtype):
    logits, target = rand_case((4, 6), 5, dtype=dtype, seed=21)
    target[1, 2:] = -100
    cw = torch.tensor([0.5, 2.0, 1.0, 0.25, 3.0], dtype=dtype)
    ours_in = logits.clone().requires_grad_(True)
    ref_in = logits.clone().requires_grad_(True)
    ours = cross_entropy(
        ours_in, target, token_weight=cw[target.clamp(min=0)], normalize="weights", reduction=reduction
    )
    ref = F.cross_entropy(ref_in.flatten(0, 1), target.flatten(), weight=cw, reduction=reduction)
    torch.testing.assert_close(ours.reshape(ref.shape), ref, **tol(dtype))
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(ours_in.grad, ref_in.grad, **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_fp32(dtype):
    logits, target = rand_case((3, 4), 9, dtype=torch.float32, seed=8)
    half = logits.to(dtype).requires_grad_(True)
    got = cross_entropy(half, target, label_smoothing=0.1)
    assert got.dtype == torch.float32
    ref = F.cross_entropy(half.detach().float().flatten(0, 1), target.flatten(), label_smoothing=0.1)
    torch.testing.assert_close(got, ref, **F32)
    got.backward()
    assert half.grad.dtype == dtype
    assert entropy(half).dtype == torch.float32
    assert wrong_answer_entropy(half, target).dtype == torch.float32


def test_mask_and_ignore_index_combine():
    logits, target = rand_case((3, 6), 8, seed=4)
    target[0, 0] = -100
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 3:] = False
    mask[0, 0] = False
    got = cross_entropy(logits, target, mask=mask, reduction="none")
    valid = mask & (target != -100)
    ref = F.cross_entropy(logits.flatten(0, 1), torch.where(valid, target, -100).flatten(), reduction="none")
    torch.testing.assert_close(got.flatten(), ref, **F64)
    mean = cross_entropy(logits, target, mask=mask)
    torch.testing.assert_close(mean, ref.sum() / valid.sum(), **F64)


def test_ignore_index_none_ignores_nothing():
    logits, target = rand_case((2, 3), 5, seed=6)
    target[0, 0] = 4
    got = cross_entropy(logits, target, ignore_index=None)
    torch.testing.assert_close(got, F.cross_entropy(logits.flatten(0, 1), target.flatten()), **F64)


def test_int32_targets_accepted():
    logits, target = rand_case((2, 3), 5, seed=7)
    torch.testing.assert_close(cross_entropy(logits, target.int()), cross_entropy(logits, target), **F64)


def test_token_weight_and_z_loss_reference():
    logits, target = rand_case((3, 4), 6, seed=12)
    target[2, 1:] = -100
    valid = target != -100
    u = torch.rand(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.5
    lam, eps = 0.01, 0.2
    lp = torch.log_softmax(logits, -1)
    tc = target.clamp(min=0)
    nll = -lp.gather(-1, tc[..., None]).squeeze(-1)
    ce_eps = (1 - eps) * nll + eps * (-lp.mean(-1))
    zl = lam * torch.logsumexp(logits, -1) ** 2
    per = torch.where(valid, u * (ce_eps + zl), 0.0)
    kw = {"token_weight": u, "label_smoothing": eps, "z_loss": lam}
    torch.testing.assert_close(cross_entropy(logits, target, reduction="none", **kw), per, **F64)
    torch.testing.assert_close(cross_entropy(logits, target, reduction="sum", **kw), per.sum(), **F64)
    torch.testing.assert_close(cross_entropy(logits, target, **kw), per.sum() / valid.sum(), **F64)
    torch.testing.assert_close(
        cross_entropy(logits, target, normalize="weights", **kw), per.sum() / u[valid].sum(), **F64
    )
    sc = StepCounts(tokens=torch.tensor(40), sequences=torch.tensor(3))
    torch.testing.assert_close(
        cross_entropy(logits, target, normalize="global_tokens", step_counts=sc, **kw), per.sum() / 40, **F64
    )
    parts = cross_entropy(logits, target, return_parts=True, **kw)
    assert isinstance(parts, CrossEntropyParts)
    n = valid.sum()
    torch.testing.assert_close(parts.nll, torch.where(valid, u * nll, 0.0).sum() / n, **F64)
    torch.testing.assert_close(parts.smooth, torch.where(valid, u * (ce_eps - nll), 0.0).sum() / n, **F64)
    torch.testing.assert_close(parts.z_loss, torch.where(valid, u * zl, 0.0).sum() / n, **F64)
    torch.testing.assert_close(parts.loss, parts.nll + parts.smooth + parts.z_loss, **F64)
    assert parts.num_valid.dtype == torch.int64 and int(parts.num_valid) == int(n)


def test_parts_without_smoothing_have_zero_smooth_term():
    logits, target = rand_case((2, 3), 5, seed=13)
    logits.requires_grad_(True)
    parts = cross_entropy(logits, target, reduction="none", return_parts=True)
    assert parts.smooth.shape == (2, 3) and (parts.smooth == 0).all()
    assert (parts.z_loss == 0).all()
    torch.testing.assert_close(parts.loss, parts.nll, **F64)


# --------------------------------------------------------------------------------------------------------
# Entropies
# --------------------------------------------------------------------------------------------------------


def test_entropies_against_dense_reference():
    logits, target = rand_case((3, 5), 7, seed=14)
    target[1, 1] = -100
    valid = target != -100
    p = torch.softmax(logits, -1)
    h = -(p * p.log()).sum(-1)
    onehot = F.one_hot(target.clamp(min=0), 7).bool()
    q = torch.where(onehot, 0.0, p) / (1 - p.gather(-1, target.clamp(min=0)[..., None]))
    hq = -(torch.where(onehot, 0.0, q * q.log())).sum(-1)
    torch.testing.assert_close(entropy(logits), h, **F64)
    torch.testing.assert_close(entropy(logits, target), torch.where(valid, h, 0.0), **F64)
    torch.testing.assert_close(wrong_answer_entropy(logits, target), torch.where(valid, hq, 0.0), **F64)
    torch.testing.assert_close(wrong_answer_entropy(logits, target, reduction="sum"), hq[valid].sum(), **F64)
    torch.testing.assert_close(
        wrong_answer_entropy(logits, target, reduction="mean"), hq[valid].mean(), **F64
    )
    torch.testing.assert_close(entropy(logits, target, reduction="mean"), h[valid].mean(), **F64)
    mask = valid.clone()
    mask[0, 0] = False
    torch.testing.assert_close(entropy(logits, mask=mask, reduction="sum"), h[mask].sum(), **F64)


def test_wrong_answer_entropy_independent_of_target_logit():
    # spec/modifiers.md §4.10: non-target logits [0, 1, 2] give H(q) = 0.832396 at every z_y.
    for zy in (0.0, 20.0, 50.0, 100.0, 1e4):
        for dtype in (torch.float64, torch.float32):
            logits = torch.tensor([[zy, 0.0, 1.0, 2.0]], dtype=dtype)
            got = wrong_answer_entropy(logits, torch.tensor([0]))
            assert got.item() == pytest.approx(0.832396, abs=1e-6)
            assert torch.isfinite(got).all()


def test_wrong_answer_entropy_grad_at_target_exactly_zero():
    logits, target = rand_case((2, 3), 5, seed=15)
    logits[0, 0, target[0, 0]] = 60.0  # p_y -> 1: still exact and finite
    logits.requires_grad_(True)
    wrong_answer_entropy(logits, target).sum().backward()
    at_target = logits.grad.gather(-1, target[..., None])
    assert (at_target == 0).all()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad != 0).sum() == 2 * 3 * 4


def test_entropies_with_minus_inf_columns():
    row = torch.tensor([[1.0, float("-inf"), 0.5, float("-inf")]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0])
    finite = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    h = entropy(row)
    torch.testing.assert_close(h, entropy(finite), **F64)
    hq = wrong_answer_entropy(row, target)
    assert hq.item() == 0.0  # one finite non-target logit: q is a point mass
    (h + hq).sum().backward()
    assert torch.isfinite(row.grad).all()
    assert row.grad[0, 1] == 0 and row.grad[0, 3] == 0


def test_wrong_answer_entropy_zero_only_without_finite_wrong_logit():
    logits = torch.tensor(
        [[3.0, float("-inf"), float("-inf")], [3.0, -30.0, float("-inf")], [3.0, -30.0, -30.0]],
        dtype=torch.float64,
        requires_grad=True,
    )
    target = torch.tensor([0, 0, 0])
    hq = wrong_answer_entropy(logits, target)
    assert hq[0] == 0 and hq[1] == 0  # a single wrong class has zero entropy too
    assert hq[2].item() == pytest.approx(math.log(2), rel=1e-12)
    hq.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_wrong_answer_entropy_out_of_range_target_is_nan_not_crash():
    logits, target = rand_case((4,), 5, seed=16)
    target[1] = 9
    target[2] = -100
    got = wrong_answer_entropy(logits, target)
    assert torch.isnan(got[1]) and got[2] == 0 and torch.isfinite(got[[0, 3]]).all()


# --------------------------------------------------------------------------------------------------------
# Acceptance 11: gradcheck (fp64), B=2, T=3, V=5
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize(("eps", "convention"), [(0.0, "torch"), (0.1, "torch"), (0.1, "fairseq")])
def test_gradcheck_cross_entropy(eps, convention, reduction):
    logits, target = rand_case((2, 3), 5, seed=17, scale=1.0)
    target[0, 1] = 1  # a hard special target
    target[1, 2] = -100
    logits.requires_grad_(True)
    weight = torch.rand(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    weight.requires_grad_(True)
    for normalize in ("tokens", "weights") if reduction == "mean" else ("tokens",):

        def fn(z, u, normalize=normalize):
            return cross_entropy(
                z,
                target,
                token_weight=u,
                label_smoothing=eps,
                smoothing_convention=convention,
                smoothing_exclude={1},
                z_loss=1e-2,
                reduction=reduction,
                normalize=normalize,
            )

        assert torch.autograd.gradcheck(fn, (logits, weight))
        if reduction == "sum" and normalize == "tokens":
            # The oracle is twice differentiable (the custom kernels are not; they point here).
            assert torch.autograd.gradgradcheck(fn, (logits, weight))


def test_gradcheck_entropies():
    logits, target = rand_case((2, 3), 5, seed=18, scale=1.0)
    target[1, 0] = -100
    logits.requires_grad_(True)
    for reduction in ("none", "mean"):
        assert torch.autograd.gradcheck(lambda z, r=reduction: entropy(z, target, reduction=r), (logits,))
        assert torch.autograd.gradcheck(
            lambda z, r=reduction: wrong_answer_entropy(z, target, reduction=r), (logits,)
        )
    assert torch.autograd.gradgradcheck(lambda z: wrong_answer_entropy(z, target), (logits,))


def test_entropy_gradients_match_closed_forms():
    # spec/kernels.md §3.4: ∂H(p) = -p_j(z_j - lse + H); ∂H(q) = -q_j(z_j - L¬ + H_q) for j ≠ y, 0 at y.
    logits, target = rand_case((6,), 5, seed=19)
    z = logits.clone().requires_grad_(True)
    entropy(z).sum().backward()
    p = torch.softmax(logits, -1)
    h = -(p * p.log()).sum(-1, keepdim=True)
    torch.testing.assert_close(z.grad, -p * (logits - torch.logsumexp(logits, -1, keepdim=True) + h), **F64)
    z = logits.clone().requires_grad_(True)
    wrong_answer_entropy(z, target).sum().backward()
    onehot = F.one_hot(target, 5).bool()
    zq = logits.masked_fill(onehot, float("-inf"))
    lnot = torch.logsumexp(zq, -1, keepdim=True)
    q = torch.softmax(zq, -1)
    hq = -(torch.where(onehot, 0.0, q * torch.log(q))).sum(-1, keepdim=True)
    ref = torch.where(onehot, 0.0, -q * (logits - lnot + hq))
    torch.testing.assert_close(z.grad, ref, **F64)


# --------------------------------------------------------------------------------------------------------
# Acceptance 14: the all-invalid batch
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_all_invalid_mean_is_graph_connected_zero(eps):
    logits = torch.randn(2, 3, 5, dtype=torch.float64)
    logits[0, 1] = float("nan")
    logits[1, 2, 3] = float("inf")
    logits.requires_grad_(True)
    target = torch.full((2, 3), -100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = cross_entropy(logits, target, label_smoothing=eps, z_loss=1e-3)
    empties = [w for w in caught if issubclass(w.category, EmptyBatchWarning)]
    assert len(empties) == 1
    assert str(empties[0].message) == "no valid target positions; loss is 0"
    assert empties[0].filename == __file__  # points at the caller
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert (logits.grad == 0).all()


def test_all_invalid_every_reduction_no_nan():
    logits = torch.full((4, 3), float("nan"), requires_grad=True)
    target = torch.full((4,), 7)
    with pytest.warns(EmptyBatchWarning):
        none = cross_entropy(logits, target, ignore_index=7, reduction="none", label_smoothing=0.2)
    assert (none == 0).all()
    with pytest.warns(EmptyBatchWarning):
        total = cross_entropy(logits, target, ignore_index=7, reduction="sum")
    (none.sum() + total).backward()
    assert (logits.grad == 0).all()


def test_nan_in_ignored_rows_does_not_leak():
    logits, target = rand_case((2, 4), 6, seed=22)
    target[1, 1] = -100
    logits[1, 1] = float("nan")
    logits.requires_grad_(True)
    u = torch.ones(2, 4, dtype=torch.float64)
    u[1, 1] = float("nan")
    loss = cross_entropy(
        logits, target, token_weight=u, label_smoothing=0.1, z_loss=1e-3, normalize="weights"
    )
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[1, 1] == 0).all()
    for fn in (entropy, wrong_answer_entropy):
        z = logits.detach().clone().requires_grad_(True)
        out = fn(z, target)
        assert out[1, 1] == 0 and torch.isfinite(out).all()
        out.sum().backward()
        assert torch.isfinite(z.grad).all() and (z.grad[1, 1] == 0).all()


def test_no_warning_with_valid_positions():
    logits, target = rand_case((2, 3), 4, seed=23)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = cross_entropy(logits, target)
    torch.testing.assert_close(out, F.cross_entropy(logits.flatten(0, 1), target.flatten()))


# --------------------------------------------------------------------------------------------------------
# Acceptance 15: bad input
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bad", "word"), [(float("nan"), "NaN"), (float("inf"), "inf")])
def test_nonfinite_logits_in_valid_row_raise(bad, word):
    logits, target = rand_case((2, 9), 5, seed=24)
    logits[1, 7, 3] = bad
    with pytest.raises(LossInputError) as info:
        cross_entropy(logits, target)
    msg = str(info.value)
    assert "logits" in msg and word in msg and "(b=1, t=7)" in msg


def test_nonfinite_logits_2d_position():
    logits, target = rand_case((6,), 5, seed=25)
    logits[4, 0] = float("nan")
    with pytest.raises(LossInputError, match=r"logits.*NaN.*\(b=4, t=0\)"):
        cross_entropy(logits, target)


def test_minus_inf_non_target_ok_without_smoothing_raises_with_smoothing():
    logits, target = rand_case((2, 3), 5, seed=26)
    col = (target[0, 2].item() + 1) % 5
    logits[0, 2, col] = float("-inf")
    logits.requires_grad_(True)
    loss = cross_entropy(logits, target)
    ref = F.cross_entropy(logits.detach().flatten(0, 1), target.flatten())
    torch.testing.assert_close(loss, ref, **F64)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 2, col] == 0
    with pytest.raises(LossInputError) as info:
        cross_entropy(logits, target, label_smoothing=0.1)
    msg = str(info.value)
    assert "logits" in msg and "smoothing_exclude" in msg and "(b=0, t=2)" in msg and f"column {col}" in msg
    # Excluding that column makes it legal again.
    cross_entropy(logits, target, label_smoothing=0.1, smoothing_exclude=[col])


def test_minus_inf_at_target_raises():
    logits, target = rand_case((2, 3), 5, seed=27)
    logits[1, 0, target[1, 0]] = float("-inf")
    with pytest.raises(LossInputError, match=r"logits.*-inf at the target.*\(b=1, t=0\)"):
        cross_entropy(logits, target)


@pytest.mark.parametrize("value", [5, 17, -3])
def test_target_out_of_range_raises(value):
    logits, target = rand_case((2, 3), 5, seed=28)
    target[0, 1] = value
    with pytest.raises(LossInputError, match=rf"target.*V=5.*first {value} at \(b=0, t=1\)"):
        cross_entropy(logits, target)


def test_out_of_range_target_at_ignored_position_is_fine():
    logits, target = rand_case((2, 3), 5, seed=29)
    mask = torch.ones(2, 3, dtype=torch.bool)
    target[0, 0] = 99
    mask[0, 0] = False
    out = cross_entropy(logits, target, mask=mask)
    torch.testing.assert_close(out, F.cross_entropy(logits[mask], target[mask]))


# --------------------------------------------------------------------------------------------------------
# Bad arguments
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"reduction": "avg"}, r"reduction.*'avg'"),
        ({"normalize": "batch"}, r"normalize.*'batch'"),
        ({"label_smoothing": 1.0}, r"label_smoothing.*\[0, 1\).*1\.0"),
        ({"label_smoothing": -0.1}, r"label_smoothing"),
        ({"label_smoothing": float("nan")}, r"label_smoothing"),
        ({"smoothing_convention": "hf"}, r"smoothing_convention.*'hf'"),
        ({"smoothing_exclude": [7]}, r"smoothing_exclude.*7.*V=5"),
        ({"smoothing_exclude": [-1]}, r"smoothing_exclude.*-1"),
        ({"smoothing_exclude": [1.5]}, r"smoothing_exclude.*1\.5"),
        ({"smoothing_exclude": "0,1"}, r"smoothing_exclude.*str"),
        ({"z_loss": -1.0}, r"z_loss.*-1\.0"),
        ({"normalize": "global_tokens"}, r"step_counts.*None"),
        ({"ignore_index": 1.5}, r"ignore_index"),
        ({"label_smoothing": 0.1, "smoothing_exclude": range(5)}, r"smoothing_exclude.*K=0.*K >= 1"),
        (
            {"label_smoothing": 0.1, "smoothing_convention": "fairseq", "smoothing_exclude": range(4)},
            r"smoothing_exclude.*K=1.*K >= 2",
        ),
    ],
)
def test_bad_arguments(kwargs, pattern):
    logits, target = rand_case((2, 3), 5, seed=30)
    with pytest.raises(LossInputError, match=pattern):
        cross_entropy(logits, target, **kwargs)


@pytest.mark.parametrize(
    ("logits", "target", "kwargs", "pattern"),
    [
        (torch.randn(5), torch.zeros(5, dtype=torch.long), {}, r"logits.*\(N, V\)"),
        (torch.randn(2, 3, 4, 5), torch.zeros(2, 3, 4, dtype=torch.long), {}, r"logits.*4 dims"),
        (torch.randint(0, 3, (2, 5)), torch.zeros(2, dtype=torch.long), {}, r"logits.*floating"),
        (torch.randn(2, 1), torch.zeros(2, dtype=torch.long), {}, r"V >= 2"),
        (torch.randn(2, 5), torch.zeros(3, dtype=torch.long), {}, r"target.*\(2,\).*\(3,\)"),
        (torch.randn(2, 5), torch.zeros(2), {}, r"target.*integer.*float32"),
        (torch.randn(2, 5), torch.zeros(2, dtype=torch.long), {"mask": torch.ones(2)}, r"mask.*bool"),
        (
            torch.randn(2, 5),
            torch.zeros(2, dtype=torch.long),
            {"token_weight": torch.ones(3)},
            r"token_weight.*\(3,\)",
        ),
        (
            torch.randn(2, 5),
            torch.zeros(2, dtype=torch.long),
            {"token_weight": torch.ones(2, dtype=torch.long)},
            r"token_weight.*floating",
        ),
    ],
)
def test_bad_shapes_and_dtypes(logits, target, kwargs, pattern):
    with pytest.raises(LossInputError, match=pattern):
        cross_entropy(logits, target, **kwargs)


def test_entropy_bad_arguments():
    with pytest.raises(LossInputError, match="reduction"):
        entropy(torch.randn(2, 3), reduction="avg")
    with pytest.raises(LossInputError, match="logits"):
        entropy(torch.randn(3))
    with pytest.raises(LossInputError, match="mask"):
        entropy(torch.randn(2, 3), mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(LossInputError, match="target"):
        wrong_answer_entropy(torch.randn(2, 3), torch.zeros(3, dtype=torch.long))


# --------------------------------------------------------------------------------------------------------
# Smoothing settings
# --------------------------------------------------------------------------------------------------------


def test_smoothing_support_forms_and_duplicates():
    expected = torch.tensor([False, True, False, True, True])
    for ids in ([0, 2], (2, 0, 2), {0, 2}, torch.tensor([2, 0, 0]), torch.tensor(0).new_tensor([0, 2]).int()):
        assert torch.equal(smoothing_support(ids, 5), expected)
    assert torch.equal(smoothing_support((), 3), torch.ones(3, dtype=torch.bool))
    assert torch.equal(smoothing_support(None, 3), torch.ones(3, dtype=torch.bool))
    assert exclude_ids([4, 1, 1], 5) == (1, 4)
    # Duplicates do not shrink the support twice: the result equals the deduplicated call.
    logits, target = rand_case((2, 3), 5, seed=31)
    target = target.clamp(min=1)
    a = cross_entropy(logits, target, label_smoothing=0.2, smoothing_exclude=[0, 0, 0])
    b = cross_entropy(logits, target, label_smoothing=0.2, smoothing_exclude=[0])
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_smoothing_support_errors():
    with pytest.raises(LossInputError, match=r"smoothing_exclude.*5.*V=5"):
        smoothing_support([5], 5)
    with pytest.raises(LossInputError, match=r"smoothing_exclude.*float"):
        smoothing_support(torch.tensor([1.0]), 5)
    with pytest.raises(LossInputError, match=r"smoothing_exclude.*True"):
        smoothing_support([True], 5)
    with pytest.raises(LossInputError, match=r"smoothing_exclude.*shape"):
        smoothing_support(torch.zeros(2, 2, dtype=torch.long), 5)


def test_check_label_smoothing():
    check_label_smoothing(0.0, "fairseq", 1)  # no smoothing: K does not matter
    check_label_smoothing(0.5, "torch", 1)
    check_label_smoothing(0.5, "fairseq", 2)
    for args, name in [
        ((1.0, "torch", 5), "label_smoothing"),
        ((True, "torch", 5), "label_smoothing"),
        ((0.1, "Torch", 5), "smoothing_convention"),
        ((0.1, "torch", 0), "smoothing_exclude"),
        ((0.1, "fairseq", 1), "smoothing_exclude"),
    ]:
        with pytest.raises(ValueError, match=name):
            check_label_smoothing(*args)


def test_functional_never_imports_kernels():
    import ast
    import pathlib

    import losskit.functional as fn

    for path in (
        pathlib.Path(fn.__file__).parent / name for name in ("__init__.py", "cross_entropy.py", "reduce.py")
    ):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any("kernels" in n for n in names), path


def test_all_combinations_of_flags_agree_with_dense_oracle():
    # A compact sweep: every convention × exclusion × z-loss × weight × reduction against one oracle.
    logits, target = rand_case((2, 5), 6, seed=32)
    target[1, :2] = -100
    target[0, 0] = 2
    valid = target != -100
    u = torch.linspace(0.5, 2.0, 10, dtype=torch.float64).reshape(2, 5)
    for convention, excluded, lam, weighted in itertools.product(
        ("torch", "fairseq"), ((), (2, 5)), (0.0, 0.05), (False, True)
    ):
        w = u if weighted else torch.ones_like(u)
        per = dense_smoothed_ce(logits, target, 0.15, convention, excluded, valid)
        per = torch.where(valid, w * (per + lam * torch.logsumexp(logits, -1) ** 2), 0.0)
        kw = {
            "label_smoothing": 0.15,
            "smoothing_convention": convention,
            "smoothing_exclude": excluded,
            "z_loss": lam,
            "token_weight": u if weighted else None,
        }
        torch.testing.assert_close(cross_entropy(logits, target, reduction="none", **kw), per, **F64)
        torch.testing.assert_close(
            cross_entropy(logits, target, normalize="weights", **kw), per.sum() / w[valid].sum(), **F64
        )


# --------------------------------------------------------------------------------------------------------
# Odd shapes and extreme values
# --------------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 9),
    v=st.integers(2, 33),
    eps=st.sampled_from([0.0, 0.05, 0.5, 0.99]),
    scale=st.sampled_from([1e-3, 1.0, 30.0, 1e3]),
    offset=st.sampled_from([0.0, -1e4, 1e5]),
    seed=st.integers(0, 2**16),
)
def test_parity_property(n, v, eps, scale, offset, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g, dtype=torch.float64) * scale + offset
    target = torch.randint(0, v, (n,), generator=g)
    target[torch.rand(n, generator=g) < 0.3] = -100
    if not (target != -100).any():
        target[0] = 0
    z = logits.clone().requires_grad_(True)
    ref_z = logits.clone().requires_grad_(True)
    got = cross_entropy(z, target, label_smoothing=eps, reduction="sum")
    ref = F.cross_entropy(ref_z, target, label_smoothing=eps, reduction="sum")
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    got.backward()
    ref.backward()
    torch.testing.assert_close(z.grad, ref_z.grad, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(wrong_answer_entropy(logits, target)).all()
    assert torch.isfinite(entropy(logits, target)).all()


def test_two_classes_and_empty_input():
    logits = torch.tensor([[0.3, -0.2], [1.0, 1.0]], dtype=torch.float64)
    target = torch.tensor([1, 0])
    torch.testing.assert_close(cross_entropy(logits, target), F.cross_entropy(logits, target), **F64)
    # V = 2: q is a point mass on the other class.
    assert (wrong_answer_entropy(logits, target) == 0).all()
    empty = torch.zeros(0, 5, requires_grad=True)
    with pytest.warns(EmptyBatchWarning):
        loss = cross_entropy(empty, torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0 and loss.requires_grad
    assert entropy(empty).shape == (0,)
    assert wrong_answer_entropy(empty, torch.zeros(0, dtype=torch.long), reduction="mean").item() == 0.0


def test_non_contiguous_logits_view():
    # A shifted view (logits[:, :-1]) needs no copy by the caller.
    logits, target = rand_case((3, 6), 7, seed=33)
    view = logits[:, :-1]
    assert not view.is_contiguous()
    got = cross_entropy(view, target[:, 1:], label_smoothing=0.1)
    ref = F.cross_entropy(view.reshape(-1, 7), target[:, 1:].reshape(-1), label_smoothing=0.1)
    torch.testing.assert_close(got, ref, **F64)
