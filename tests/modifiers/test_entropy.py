"""EntropyModifier (seed 000, spec/modifiers.md §3.4, acceptance 2, 3, 12): the batch weight, the seed batch end to end,
detached and differentiable weights, the debug line, the per-position rule and the per-sample mean."""

from __future__ import annotations

import pytest
import torch

from losskit import kernels
from losskit.modifiers import entropy_batch_weight
from losskit.modifiers.entropy import position_entropy, sample_entropy

from . import oracle
from .conftest import ENT, F64, IMPLS_F64, SEED_TARGETS, SMO, pipe_of, random_batch, seed_logits

# ---- acceptance 2: the pure batch-weight function -----------------------------------------------------------------

def test_entropy_batch_weight_seed_examples():
    h = torch.tensor([0.2, 0.6, 1.0, 0.4], dtype=F64)
    assert entropy_batch_weight(h, threshold=0.5, weight=1).item() == pytest.approx(0.65, rel=1e-12)
    torch.testing.assert_close(entropy_batch_weight(h, threshold=0.5, weight=1, per_sample=True),
                               torch.tensor([0.5, 0.6, 1.0, 0.5], dtype=F64), rtol=1e-12, atol=0)
    beta = entropy_batch_weight([0.8, 0.4], threshold=0.5, weight=1.0)
    assert beta.item() == pytest.approx(0.65, rel=1e-6)
    assert (2.0 * beta).item() == pytest.approx(1.3, rel=1e-6)
    # empty samples are excluded, and `weight` really scales
    got = entropy_batch_weight(torch.tensor([0.8, 9.0, 0.4], dtype=F64), 0.5, 2.0,
                               sample_valid=torch.tensor([True, False, True]))
    assert got.item() == pytest.approx(1.3, rel=1e-12)


# ---- acceptance 3: the seed batch end to end ----------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS_F64)
def test_seed_batch_entropy_end_to_end(impl):
    pipe = pipe_of(ENT)
    out = pipe.compute(seed_logits(), SEED_TARGETS, impl=impl)
    assert out.loss.item() == pytest.approx(1.144269, abs=1e-6)
    assert out.loss_raw.item() == pytest.approx(1.437951, abs=1e-6)
    m = pipe.get_all_metrics()
    expected = {"mean_entropy": 0.795763, "max_entropy": 1.098612, "min_entropy": 0.079869,
                "entropy_std": 0.420738, "entropy_weight": 0.795763}
    assert set(m) == {f"loss_modifiers/EntropyModifier.{k}" for k in expected}
    for k, v in expected.items():
        assert m[f"loss_modifiers/EntropyModifier.{k}"].item() == pytest.approx(v, abs=1e-6), k
    # the intermediate values of the spec: H(q) per position and H̄ per sample
    stats = kernels.token_stats(seed_logits(), SEED_TARGETS, impl=impl)
    torch.testing.assert_close(stats.wrong_entropy, torch.tensor([[0.905959, 1.098612], [0.079869, 1.098612]],
                                                                 dtype=F64), atol=1e-6, rtol=0)
    assert out.loss.item() == pytest.approx(0.795763 * 1.437951, abs=2e-6)


# ---- acceptance 12: detached weights ------------------------------------------------------------------------------

def test_detached_gradient_is_beta_times_smoothed_gradient():
    logits, targets, mask = random_batch(F64, seed=5)
    x1 = logits.clone().requires_grad_(True)
    pipe = pipe_of(ENT, SMO)
    pipe.compute(x1, targets, mask=mask).loss.backward()
    beta = pipe.get_all_metrics()["loss_modifiers/EntropyModifier.entropy_weight"]
    x2 = logits.clone().requires_grad_(True)
    pipe_of(SMO).compute(x2, targets, mask=mask).loss.backward()
    torch.testing.assert_close(x1.grad, beta * x2.grad, rtol=1e-12, atol=1e-15)
    # differentiable weights: a different gradient, equal to the hand formula without detaching
    x3 = logits.clone().requires_grad_(True)
    pipe_of(ENT, SMO, entropy_modifier_differentiable_weights=True).compute(x3, targets, mask=mask).loss.backward()
    assert (x3.grad - x1.grad).norm() > 1e-3 * x1.grad.norm()
    x4 = logits.clone().requires_grad_(True)
    oracle.hand_loss(x4, targets, mask=mask, entropy={"threshold": 0.5}, smoothing={"factor": 0.1},
                     detach=False).backward()
    torch.testing.assert_close(x3.grad, x4.grad, rtol=1e-10, atol=1e-13)


def test_entropy_debug_line(caplog):
    pipe = pipe_of(ENT, entropy_modifier_debug=True)
    with caplog.at_level("INFO", logger="losskit.modifiers"):
        pipe.modify_loss(seed_logits(), SEED_TARGETS, None, iter_num=12)
    (record,) = [r for r in caplog.records if r.name == "losskit.modifiers"]
    msg = record.getMessage()
    assert "iter=12" in msg and "valid=4" in msg and "weight=0.795763" in msg and "clamped=0" in msg
    assert "H_bar[:8]=[1.002286, 0.589241]" in msg


# ---- the per-position and per-sample pieces ---------------------------------------------------------------------

@pytest.mark.parametrize("eps", [1e-8, 0.3, 0.0])
def test_position_entropy_drops_rows_without_wrong_mass(eps):
    """Ĥ = 0 where 1 − p_y <= eps (the boundary included, and 1 − p_y = 0 or underflowing), H(q) elsewhere."""
    one_minus_p = torch.tensor([[0.0, 1e-300, 1e-8, 0.3, 0.31, 0.9], [0.5, 2e-8, 0.29, 1.0, 0.7, 0.05]],
                               dtype=F64)
    h = torch.rand(2, 6, generator=torch.Generator().manual_seed(2), dtype=F64) + 0.1
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 4:] = False
    got = position_entropy(h, one_minus_p.log(), valid, eps=eps)
    keep = valid & (one_minus_p > eps) if eps > 0 else valid
    assert torch.equal(got, torch.where(keep, h, 0.0))
    assert int((got != 0).sum()) == {1e-8: 7, 0.3: 4, 0.0: 10}[eps]


def test_sample_entropy_is_the_mean_over_valid_positions():
    h = torch.tensor([[1.0, 2.0, 9.0], [5.0, 5.0, 5.0], [0.5, 1.5, 4.0]], dtype=F64)
    valid = torch.tensor([[True, True, False], [False, False, False], [True, True, True]])
    got = sample_entropy(h, valid)
    torch.testing.assert_close(got, torch.tensor([1.5, 0.0, 2.0], dtype=F64), rtol=0, atol=0)
