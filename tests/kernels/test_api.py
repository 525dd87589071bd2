"""``kernels.api``: the public functions equal the plain torch written in their docstrings.

``token_stats`` against the dense ``log_softmax`` forms, ``fused_token_loss`` against
``(w·(F.cross_entropy(..., label_smoothing) + λ·lse²)·valid).sum() / normalizer`` (values, the logits' gradient and
the token weights' gradient), ``cross_entropy``'s parts against the same pieces. Every implementation that runs on
this machine is checked; the oracle is float64 plain torch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from losskit import kernels
from losskit.contract import CrossEntropyParts, LossInputError

from .test_nosync import SyncGuard

F64 = torch.float64
IMPLS = ["torch", "chunked"]


def case(shape=(3, 6), v=9, seed=0, strided=False):
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(*shape[:-1], shape[-1] + 1, v, generator=g, dtype=F64) * 2 if strided else None
    logits = full[..., :-1, :] if strided else torch.randn(*shape, v, generator=g, dtype=F64) * 2
    target = torch.randint(0, v, shape, generator=g)
    target.view(-1)[1] = -100
    return logits, target


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("shape", "strided"), [((11,), False), ((3, 6), False), ((3, 6), True)])
@pytest.mark.parametrize("exclude", [(), (0, 4)])
def test_token_stats_equals_the_docstring_formulas(impl, shape, strided, exclude):
    logits, target = case(shape, strided=strided, seed=len(shape))
    target.view(-1)[2] = 9  # out of range: NaN fields, bad
    with SyncGuard():
        st = kernels.token_stats(logits, target, impl=impl, smoothing_exclude=exclude)
    valid = target != -100
    y = target.clamp(0, 8)
    lp = logits.log_softmax(-1)
    onehot = F.one_hot(y, 9).bool()
    support = torch.ones(9, dtype=torch.bool)
    support[list(exclude)] = False
    zy = logits.gather(-1, y[..., None])[..., 0]
    q = logits.masked_fill(onehot, float("-inf")).softmax(-1)
    logq = logits.masked_fill(onehot, float("-inf")).log_softmax(-1).masked_fill(onehot, 0.0)
    want = {
        "lse": logits.logsumexp(-1),
        "target_logit": zy,
        "nll": -lp.gather(-1, y[..., None])[..., 0],
        "log1m_target_prob": logits.masked_fill(onehot, float("-inf")).logsumexp(-1) - logits.logsumexp(-1),
        "support_mean_logit": logits[..., support].mean(-1),
        "support_gap": (logits[..., support] - zy[..., None]).mean(-1),
        "entropy": -(lp.exp() * lp).sum(-1),
        "wrong_entropy": -(q * logq).sum(-1),
    }
    oob = valid & (target >= 9)
    for name, ref in want.items():
        got = getattr(st, name)
        assert got.shape == target.shape and got.dtype == F64, name
        ok = valid & ~oob
        torch.testing.assert_close(got[ok], ref[ok], rtol=1e-12, atol=1e-12, msg=name)
        assert bool((got[~valid] == 0).all()), name  # exactly 0 at invalid rows
        assert bool(torch.isnan(got[oob]).all()), name  # NaN for an out-of-range target
    assert torch.equal(st.valid, valid)
    assert torch.equal(st.argmax, torch.where(valid, logits.argmax(-1), -1))
    assert torch.equal(st.correct, valid & (logits.argmax(-1) == target))
    assert torch.equal(st.bad, oob)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize(("eps", "z_loss"), [(0.0, 0.0), (0.15, 1e-3)])
@pytest.mark.parametrize("grad_mode", ["auto", "backward"])
def test_fused_token_loss_equals_the_docstring_formula(impl, reduction, eps, z_loss, grad_mode):
    logits, target = case((4, 5), seed=3)
    g = torch.Generator().manual_seed(4)
    w = torch.rand(4, 5, generator=g, dtype=F64) + 0.5
    norm = 7.0 if reduction == "sum" else None
    x = logits.clone().requires_grad_(True)
    wx = w.clone().requires_grad_(True)
    out = kernels.fused_token_loss(x * 1.0, target, token_weight=wx, label_smoothing=eps, z_loss=z_loss,
                                   normalizer=norm, reduction=reduction, grad_mode=grad_mode, impl=impl)
    rx = logits.clone().requires_grad_(True)
    rw = w.clone().requires_grad_(True)
    valid = (target != -100).reshape(-1)
    ce = F.cross_entropy(rx.flatten(0, -2), target.flatten(), ignore_index=-100, label_smoothing=eps,
                         reduction="none")
    lse = rx.logsumexp(-1).flatten()
    per = torch.where(valid, rw.flatten() * (ce + z_loss * lse**2), 0.0)
    ref = per.sum() / norm if reduction == "sum" else per.reshape(4, 5)
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-14)
    unweighted = torch.where(valid, ce + z_loss * lse**2, 0.0).reshape(4, 5)
    torch.testing.assert_close(out.token_loss, unweighted.detach(), rtol=1e-12, atol=1e-14)
    assert not out.token_loss.requires_grad and not out.stats.nll.requires_grad
    upstream = torch.tensor(2.5, dtype=F64) if reduction == "sum" else torch.rand(4, 5, generator=g, dtype=F64)
    gx, gw = torch.autograd.grad(out.loss, (x, wx), upstream)
    rgx, rgw = torch.autograd.grad(ref, (rx, rw), upstream)
    torch.testing.assert_close(gx, rgx, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gw, rgw, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_parts_add_up_to_the_plain_pieces(impl, reduction):
    logits, target = case((2, 7), seed=5)
    eps, lam = 0.2, 1e-2
    parts = kernels.cross_entropy(logits, target, label_smoothing=eps, z_loss=lam, reduction=reduction,
                                  return_parts=True, impl=impl)
    assert isinstance(parts, CrossEntropyParts)
    valid = (target != -100).reshape(-1)
    flat_l, flat_t = logits.flatten(0, -2), target.flatten()
    n = valid.sum() if reduction == "mean" else 1
    nll = F.cross_entropy(flat_l, flat_t, reduction="sum") / n
    smoothed = F.cross_entropy(flat_l, flat_t, label_smoothing=eps, reduction="sum") / n
    zl = lam * (flat_l.logsumexp(-1)[valid] ** 2).sum() / n
    torch.testing.assert_close(parts.nll, nll, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(parts.smooth, smoothed - nll, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(parts.z_loss, zl, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(parts.loss, smoothed + zl, rtol=1e-12, atol=1e-14)
    assert parts.num_valid.item() == int(valid.sum()) and parts.num_valid.dtype == torch.int64
    plain = kernels.cross_entropy(logits, target, label_smoothing=eps, z_loss=lam, reduction=reduction, impl=impl)
    torch.testing.assert_close(plain, parts.loss, rtol=1e-12, atol=1e-14)


def test_cross_entropy_argument_errors():
    logits, target = case()
    with pytest.raises(LossInputError, match="reduction must be one of 'none', 'sum', 'mean', got 'avg'"):
        kernels.cross_entropy(logits, target, reduction="avg")
    with pytest.raises(LossInputError, match="normalize must be one of 'tokens', 'weights', 'global_tokens'"):
        kernels.cross_entropy(logits, target, normalize="batch")
    with pytest.raises(LossInputError, match="step_counts"):
        kernels.cross_entropy(logits, target, normalize="global_tokens")
    target.view(-1)[4] = 9
    with pytest.raises(LossInputError, match=r"target: 1 value\(s\) outside \[0, V=9\)"):
        kernels.cross_entropy(logits, target)
