"""The benchmarked losses and their oracles (losskit/bench/losses.py) against independent plain-torch code.

The oracles are checked against dense, loop-level formulas (a dense target distribution, an explicit wrong-answer
distribution, per-sample Python loops) and the seed worked examples; the timed pipelines are checked against the
oracles in fp64 and fp32. The losskit rows need ``losskit.kernels`` and are skipped until it is importable.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from losskit.bench import losses
from losskit.contract import ConfigError

CFG = losses.AllFeatures(excluded_tail=16)


def problem(b=3, t=5, v=40, dtype=torch.float64, seed=0, ignore_every=4):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, t, v, generator=gen, dtype=torch.float64) * 3).to(dtype)
    target = torch.randint(0, v, (b, t), generator=gen)
    target.view(-1)[::ignore_every] = -100
    target[0, 1] = v - 1  # an excluded (hard) target
    token_weight = torch.rand(b, t, generator=gen, dtype=torch.float64).to(torch.float32) + 0.5
    return logits, target, token_weight


def dense_token_loss(logits, target, cfg):
    """ℓ_t from an explicit target distribution: (1−ε_t)·onehot + ε_t/K on the support, then −Σ q log p."""
    v = logits.shape[-1]
    support = torch.zeros(v, dtype=logits.dtype)
    support[: v - cfg.excluded_tail] = 1
    k = support.sum()
    out = torch.zeros(target.shape, dtype=logits.dtype)
    for idx in itertools.product(*(range(s) for s in target.shape)):
        y = int(target[idx])
        if y == -100:
            continue
        eps = 0.0 if y >= v - cfg.excluded_tail else cfg.label_smoothing
        q = (1 - eps) * F.one_hot(torch.tensor(y), v).to(logits.dtype) + eps * support / k
        logp = torch.log_softmax(logits[idx], -1)
        out[idx] = -(q * logp).sum() + cfg.z_loss * torch.logsumexp(logits[idx], -1) ** 2
    return out


def explicit_wrong_entropy(logits, target):
    out = torch.zeros(target.shape, dtype=logits.dtype)
    for idx in itertools.product(*(range(s) for s in target.shape)):
        y = max(int(target[idx]), 0)
        p = torch.softmax(logits[idx], -1)
        q = torch.cat([p[:y], p[y + 1 :]]) / (1 - p[y])
        out[idx] = -(q * q.log()).sum()
    return out


def loop_pipeline_loss(logits, target, token_weight, cfg):
    """The all-features loss L with per-sample Python loops (S, n_i, β, w_i spelled out)."""
    token_loss = dense_token_loss(logits, target, cfg)
    h = explicit_wrong_entropy(logits, target)
    b, t = target.shape
    samples = []
    for i in range(b):
        m = target[i] != -100
        n = int(m.sum())
        if n == 0:
            continue
        hbar = float(h[i][m].sum()) / n
        w = min(max((n / (t + cfg.mask_ratio_eps) + cfg.mask_ratio_eps) ** -cfg.mask_ratio_power,
                    cfg.mask_ratio_min), cfg.mask_ratio_max)
        samples.append((max(hbar, cfg.entropy_threshold), w, (token_weight[i].double() * token_loss[i])[m].sum() / n))
    beta = cfg.entropy_weight * sum(s[0] for s in samples) / len(samples)
    return beta * sum(s[1] * s[2] for s in samples) / len(samples)


def test_token_loss_equals_dense_target_distribution():
    logits, target, _ = problem()
    got = losses.all_features_token_loss(logits, target, CFG)
    torch.testing.assert_close(got, dense_token_loss(logits, target, CFG), rtol=1e-12, atol=1e-12)
    assert bool((got[target == -100] == 0).all())


def test_token_loss_without_exclusions_is_torch_label_smoothing():
    cfg = losses.AllFeatures(excluded_tail=0, z_loss=0.0)
    logits, target, _ = problem()
    target[0, 1] = 3
    got = losses.all_features_token_loss(logits, target, cfg)
    want = F.cross_entropy(logits.reshape(-1, 40), target.reshape(-1), label_smoothing=0.1, reduction="none")
    torch.testing.assert_close(got.reshape(-1), want, rtol=1e-12, atol=1e-12)


def test_wrong_entropy_matches_explicit_and_seed_example():
    logits, target, _ = problem()
    torch.testing.assert_close(
        losses.wrong_entropy_torch(logits, target), explicit_wrong_entropy(logits, target), rtol=1e-12, atol=1e-12
    )
    seed = torch.tensor([[2.0, 1.0, 4.0, 0.5]], dtype=torch.float64)
    assert losses.wrong_entropy_torch(seed, torch.tensor([2])).item() == pytest.approx(0.905959, abs=1e-6)


def test_wrong_entropy_with_a_minus_inf_column_is_finite():
    logits = torch.tensor([[0.0, float("-inf"), 1.0, 2.0]])
    h = losses.wrong_entropy_torch(logits, torch.tensor([3]))
    p = torch.softmax(torch.tensor([0.0, 1.0]), -1)
    assert h.item() == pytest.approx(float(-(p * p.log()).sum()), rel=1e-6)


def test_entropy_batch_weight_seed_examples_and_empty_samples():
    cfg = losses.AllFeatures(entropy_threshold=0.5)
    h = torch.tensor([[0.2], [0.6], [1.0], [0.4]], dtype=torch.float64)
    valid = torch.ones(4, 1, dtype=torch.bool)
    assert losses.entropy_batch_weight(h, valid, cfg).item() == pytest.approx(0.65)
    h2 = torch.tensor([[0.8, 0.8], [0.4, 0.4], [9.0, 9.0]], dtype=torch.float64)
    valid2 = torch.tensor([[True, True], [True, False], [False, False]])  # the empty sample must not count
    assert losses.entropy_batch_weight(h2, valid2, cfg).item() == pytest.approx(0.65)
    assert losses.entropy_batch_weight(h2, valid2, dataclass_replace(cfg, entropy_weight=2.0)).item() == (
        pytest.approx(1.3)
    )


def dataclass_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_mask_ratio_weight_seed_example():
    target = torch.tensor([[5, -100, -100, -100], [3, 4, 1, 2]])
    w = losses.mask_ratio_weight(target != -100, losses.AllFeatures(), torch.float64)
    torch.testing.assert_close(w, torch.tensor([2.0, 1.0], dtype=torch.float64), rtol=1e-7, atol=0)


def test_reference_matches_loop_formula_with_an_empty_sample():
    logits, target, u = problem(b=4)
    target[2] = -100
    ref = losses.all_features_reference(logits, target, u, CFG)
    assert ref.item() == pytest.approx(float(loop_pipeline_loss(logits, target, u, CFG)), rel=1e-12)


def test_eager_coefficients_reproduce_the_pipeline_loss_and_gradient():
    logits, target, u = problem(b=4)
    target[1] = -100
    x1 = logits.clone().requires_grad_(True)
    losses.all_features_reference(x1, target, u, CFG).backward()
    coeff, denom = losses.eager_coefficients(
        losses.wrong_entropy_torch(logits, target), target != -100, u.double(), CFG
    )
    x2 = logits.clone().requires_grad_(True)
    eager = losses.eager_reference(x2, target, coeff, denom, CFG)
    eager.backward()
    assert denom.item() == 3
    assert eager.item() == pytest.approx(losses.all_features_reference(logits, target, u, CFG).item(), rel=1e-12)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("fn", [losses.seed_naive_pipeline, losses.careful_torch_pipeline], ids=["naive", "careful"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_seed_pipelines_match_their_oracle(fn, dtype):
    cfg = losses.AllFeatures()
    logits, target, _ = problem(v=300, dtype=dtype)
    x = logits.clone().requires_grad_(True)
    loss = fn(x, target, cfg)
    loss.backward()
    x64 = logits.double().requires_grad_(True)
    ref = losses.seed_pipeline_reference(x64, target, cfg)
    ref.backward()
    # fp64: only the seed's eps = 1e-8 separates the naive weight from the exact one; log(q + eps) moves H by up
    # to V·eps = 3e-6 nats. The careful pipeline has no such term.
    tol = (1e-5 if fn is losses.seed_naive_pipeline else 1e-10) if dtype == torch.float64 else 2e-5
    assert loss.item() == pytest.approx(ref.item(), rel=tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=0, atol=tol * x64.grad.abs().max().item())


def test_seed_pipeline_weight_is_detached_and_scales_the_loss():
    cfg = losses.AllFeatures()
    logits, target, _ = problem(v=300)
    x = logits.clone().requires_grad_(True)
    losses.careful_torch_pipeline(x, target, cfg).backward()
    x2 = logits.clone().requires_grad_(True)
    F.cross_entropy(x2.reshape(-1, 300), target.reshape(-1), label_smoothing=0.1).backward()
    with torch.no_grad():
        beta = losses.entropy_batch_weight(losses.wrong_entropy_torch(logits, target), target != -100, cfg)
    torch.testing.assert_close(x.grad, beta * x2.grad, rtol=1e-12, atol=1e-15)


def test_excluded_ids_needs_a_nonempty_support():
    assert losses.AllFeatures(excluded_tail=2).excluded_ids(5) == (3, 4)
    with pytest.raises(ConfigError, match=r"V must exceed excluded_tail=256.*got V=256"):
        losses.AllFeatures().excluded_ids(256)


# ---------------------------------------------------------------------------------------------------------------
# losskit fast paths (need losskit.kernels).
# ---------------------------------------------------------------------------------------------------------------


def _kernels():
    try:
        from losskit.kernels import fused_token_loss, token_stats  # noqa: F401
    except ImportError:
        pytest.skip("losskit.kernels (fused_token_loss, token_stats) not available yet")


def _grad_close(got, want, tol):
    scale = want.abs().max().item()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tol * max(scale, 1e-300))


@pytest.mark.parametrize("impl", ["torch", "chunked"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "in_place"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_losskit_pipeline_matches_reference(impl, inplace, dtype):
    _kernels()
    if impl == "torch" and inplace:
        pytest.skip("the torch impl has no in-place mode")
    logits, target, u = problem(b=3, t=6, v=300, dtype=dtype)
    target[2] = -100  # an empty sample
    cfg = losses.AllFeatures()
    leaf = logits.clone().requires_grad_(True)
    x = leaf.clone() if inplace else leaf  # in place needs a non-leaf (a model's logits); G reaches the leaf
    loss = losses.losskit_pipeline(x, target, u, cfg, impl=impl, inplace_grad=inplace)
    loss.backward()
    x64 = logits.double().requires_grad_(True)
    ref = losses.all_features_reference(x64, target, u, cfg)
    ref.backward()
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert loss.item() == pytest.approx(ref.item(), rel=tol)
    _grad_close(leaf.grad, x64.grad, tol)


@pytest.mark.parametrize("impl", ["torch", "chunked"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "in_place"])
@pytest.mark.parametrize("upstream", [1.0, 0.25])
def test_losskit_eager_matches_reference(impl, inplace, upstream):
    _kernels()
    if impl == "torch" and inplace:
        pytest.skip("the torch impl has no in-place mode")
    logits, target, u = problem(b=3, t=6, v=300, dtype=torch.float32)
    cfg = losses.AllFeatures()
    coeff, denom = losses.eager_coefficients(losses.wrong_entropy_torch(logits, target), target != -100, u, cfg)
    leaf = logits.clone().requires_grad_(True)
    x = leaf.clone() if inplace else leaf  # in place needs a non-leaf (a model's logits); G reaches the leaf
    loss = losses.losskit_eager(x, target, coeff, denom, cfg, impl=impl, inplace_grad=inplace)
    (loss * upstream).backward()
    x64 = logits.double().requires_grad_(True)
    ref = losses.eager_reference(x64, target, coeff, denom, cfg)
    (ref * upstream).backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    _grad_close(leaf.grad, x64.grad, 1e-5)


@pytest.mark.parametrize("inplace", [False, True], ids=["out_of_place", "in_place"])
def test_modifier_pipeline_matches_reference_without_z_loss(inplace):
    _kernels()
    pytest.importorskip("losskit.modifiers.pipeline")
    import dataclasses

    logits, target, u = problem(b=3, t=6, v=300, dtype=torch.float32)
    target[2] = -100
    cfg = losses.AllFeatures()
    pipeline = losses.modifier_pipeline(cfg, 300)
    leaf = logits.clone().requires_grad_(True)
    x = leaf.clone() if inplace else leaf  # in place needs a non-leaf (a model's logits); G reaches the leaf
    loss = losses.losskit_modifier_pipeline(pipeline, x, target, u, impl="chunked", inplace_grad=inplace)
    loss.backward()
    x64 = logits.double().requires_grad_(True)
    ref = losses.all_features_reference(x64, target, u, dataclasses.replace(cfg, z_loss=0.0))
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    _grad_close(leaf.grad, x64.grad, 1e-5)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_losskit_cross_entropy_is_torch_cross_entropy(label_smoothing):
    _kernels()
    logits, target, _ = problem(b=2, t=7, v=123, dtype=torch.float32)
    x = logits.clone().requires_grad_(True)
    loss = losses.losskit_cross_entropy(x, target, label_smoothing=label_smoothing, impl="chunked")
    loss.backward()
    x64 = logits.double().requires_grad_(True)
    ref = F.cross_entropy(x64.reshape(-1, 123), target.reshape(-1), label_smoothing=label_smoothing)
    ref.backward()
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-5)
    _grad_close(x.grad, x64.grad, 1e-5)
