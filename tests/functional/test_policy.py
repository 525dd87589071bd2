"""functional.policy against plain torch in float64: values, gradients, metrics, masks, extreme ratios, errors."""

import math

import pytest
import torch

from losskit.contract import LossFnOutput, LossInputError
from losskit.functional import policy


def _grad(fn, lp, *args, **kwargs):
    lp = lp.clone().requires_grad_(True)
    out = fn(lp, *args, **kwargs)
    loss = out.loss if isinstance(out, LossFnOutput) else out
    (g,) = torch.autograd.grad(loss, lp)
    return loss.detach(), g


def _rl_case(shape=(3, 7), spread=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(shape, generator=g, dtype=torch.float64) * 3
    q = lp + spread * torch.randn(shape, generator=g, dtype=torch.float64)
    adv = torch.randn(shape, generator=g, dtype=torch.float64)
    adv[..., :2] = 0  # "prompt" positions
    return lp, q, adv


def test_token_cross_entropy_is_minus_weighted_sum_with_negative_weights_and_rank_2():
    g = torch.Generator().manual_seed(1)
    for shape in [(9,), (5, 3)]:
        lp = -torch.rand(shape, generator=g, dtype=torch.float64)
        w = torch.randn(shape, generator=g, dtype=torch.float64)  # negative weights included
        loss, grad = _grad(policy.token_cross_entropy, lp, w)
        ref_loss, ref_grad = _grad(lambda x, w: -(x * w).sum(), lp, w)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=0)
        out = policy.token_cross_entropy(lp, w)
        assert set(out.diagnostics) == {"loss:sum", "num_tokens:sum", "weights:sum"}
        assert float(out.diagnostics["num_tokens:sum"]) == lp.numel()
        assert float(out.diagnostics["weights:sum"]) == pytest.approx(float(w.sum()))


def test_token_cross_entropy_default_weights_are_ones_and_mask_drops_entries():
    lp = torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64)
    assert float(policy.token_cross_entropy(lp).loss) == 6.0
    mask = torch.tensor([True, False, True])
    out = policy.token_cross_entropy(lp, mask=mask)
    assert float(out.loss) == 4.0 and float(out.diagnostics["num_tokens:sum"]) == 2


@pytest.mark.parametrize("spread", [0.1, 8.0])  # 8: ratios far outside [0.01, 100], never clamped
def test_importance_sampling_matches_oracle(spread):
    lp, q, adv = _rl_case(spread=spread)
    assert (torch.exp(lp - q).max() > 100) or spread < 1
    loss, grad = _grad(policy.importance_sampling, lp, q, adv)
    ref_loss, ref_grad = _grad(lambda x, q, a: -(torch.exp(x - q) * a).sum(), lp, q, adv)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=0)


def test_ratio_metrics_only_over_nonzero_advantages():
    lp, q, adv = _rl_case()
    out = policy.importance_sampling(lp, q, adv)
    r = torch.exp(lp - q)[adv != 0]
    assert float(out.diagnostics["ratio:mean"]) == pytest.approx(float(r.mean()))
    assert float(out.diagnostics["ratio:min"]) == pytest.approx(float(r.min()))
    assert float(out.diagnostics["ratio:max"]) == pytest.approx(float(r.max()))
    empty = policy.importance_sampling(lp, q, torch.zeros_like(adv))
    assert math.isnan(float(empty.diagnostics["ratio:mean"])) and float(empty.loss) == 0.0


@pytest.mark.parametrize("spread", [0.3, 8.0])
def test_ppo_matches_oracle_and_clipped_fraction(spread):
    lp, q, adv = _rl_case(spread=spread, seed=3)

    def oracle(x, q, a, lo=0.8, hi=1.2):
        r = torch.exp(x - q)
        return -torch.minimum(r * a, torch.clamp(r, lo, hi) * a).sum()

    loss, grad = _grad(policy.ppo, lp, q, adv)
    ref_loss, ref_grad = _grad(oracle, lp, q, adv)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=0)
    r = torch.exp(lp - q)
    sel = adv != 0
    active = (torch.clamp(r, 0.8, 1.2) * adv < r * adv) & sel
    out = policy.ppo(lp, q, adv)
    assert float(out.diagnostics["clipped_fraction:mean"]) == pytest.approx(float(active.sum() / sel.sum()))


def test_ppo_per_token_thresholds_override_scalars():
    lp, q, adv = _rl_case(seed=4)
    lo = torch.full_like(lp, 0.5)
    hi = torch.full_like(lp, 2.0)
    torch.testing.assert_close(policy.ppo(lp, q, adv, clip_low_threshold=lo, clip_high_threshold=hi).loss,
                               policy.ppo(lp, q, adv, clip_low_threshold=0.5, clip_high_threshold=2.0).loss)


def test_cispo_matches_oracle():
    lp, q, adv = _rl_case(spread=2.0, seed=5)

    def oracle(x, q, a):
        return -(torch.clamp(torch.exp(x - q), 0.0, 4.0).detach() * x * a).sum()

    loss, grad = _grad(policy.cispo, lp, q, adv)
    ref_loss, ref_grad = _grad(oracle, lp, q, adv)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=0)
    r = torch.exp(lp - q)
    sel = adv != 0
    frac = (((r < 0) | (r > 4)) & sel).sum() / sel.sum()
    assert float(policy.cispo(lp, q, adv).diagnostics["clipped_fraction:mean"]) == pytest.approx(float(frac))


def test_dro_matches_oracle_and_needs_beta():
    lp, q, adv = _rl_case(seed=6)

    def oracle(x, q, a):
        return -(x * a - 0.5 * 0.3 * (x - q) ** 2).sum()

    loss, grad = _grad(policy.dro, lp, q, adv, beta=0.3)
    ref_loss, ref_grad = _grad(oracle, lp, q, adv)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=0)
    with pytest.raises(TypeError, match="beta"):
        policy.dro(lp, q, adv)  # keyword-only and required: the service reports missing_config
    with pytest.raises(LossInputError, match="beta must be a finite number"):
        policy.dro(lp, q, adv, beta=float("nan"))


def test_rl_mask_excludes_padding_from_loss_and_metrics():
    lp, q, adv = _rl_case(seed=7)
    mask = torch.ones_like(lp, dtype=torch.bool)
    mask[:, -2:] = False
    full = policy.dro(lp[:, :-2].contiguous(), q[:, :-2].contiguous(), adv[:, :-2].contiguous(), beta=0.5)
    masked = policy.dro(lp, q, adv, beta=0.5, mask=mask)
    torch.testing.assert_close(masked.loss, full.loss)
    assert float(masked.diagnostics["num_tokens:sum"]) == mask.sum()


def test_dpo_matches_oracle():
    g = torch.Generator().manual_seed(8)
    pc, pr, rc, rr = (-torch.rand(4, generator=g, dtype=torch.float64) * 10 for _ in range(4))

    def oracle(pc, pr, rc, rr):
        return -torch.nn.functional.logsigmoid(0.2 * ((pc - pr) - (rc - rr))).sum()

    pc_ = pc.clone().requires_grad_(True)
    out = policy.dpo(pc_, pr, rc, rr, beta=0.2)
    (g1,) = torch.autograd.grad(out.loss, pc_)
    pc2 = pc.clone().requires_grad_(True)
    ref = oracle(pc2, pr, rc, rr)
    (g2,) = torch.autograd.grad(ref, pc2)
    torch.testing.assert_close(out.loss.detach(), ref.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=0)
    margin = (pc - pr) - (rc - rr)
    assert float(out.diagnostics["reward_accuracy:mean"]) == pytest.approx(float((margin > 0).double().mean()))
    # equal policy and reference: each pair contributes ln 2
    same = policy.dpo(pc, pr, pc, pr)
    assert float(same.loss) == pytest.approx(4 * math.log(2), rel=1e-12)


def test_every_metric_key_has_one_colon():
    lp, q, adv = _rl_case()
    outs = [policy.token_cross_entropy(lp), policy.importance_sampling(lp, q, adv), policy.ppo(lp, q, adv),
            policy.cispo(lp, q, adv), policy.dro(lp, q, adv, beta=1.0)]
    for out in outs:
        assert "loss:sum" in out.diagnostics
        assert all(k.count(":") == 1 for k in out.diagnostics)
        assert all(not v.requires_grad for v in out.diagnostics.values())


def test_bad_inputs_name_the_argument():
    lp = torch.zeros(3)
    with pytest.raises(LossInputError, match="weights must have the shape of logprobs"):
        policy.token_cross_entropy(lp, torch.zeros(4))
    with pytest.raises(LossInputError, match="logprobs must be a floating-point"):
        policy.token_cross_entropy(torch.zeros(3, dtype=torch.long))
    with pytest.raises(LossInputError, match="advantages must be a torch.Tensor"):
        policy.importance_sampling(lp, lp, [1, 2, 3])
    with pytest.raises(LossInputError, match="clip_low_threshold must be <= clip_high_threshold"):
        policy.ppo(lp, lp, lp, clip_low_threshold=2.0, clip_high_threshold=1.0)
    with pytest.raises(LossInputError, match="mask must be a bool tensor"):
        policy.cispo(lp, lp, lp, mask=torch.ones(3))
