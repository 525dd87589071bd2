"""MaskRatioWeightModifier (seed 000, spec/modifiers.md §3.6, acceptance 4): the seed example and its metrics, the
weight formula with its clamps, detached weights."""

from __future__ import annotations

import pytest
import torch

from losskit.modifiers import mask_ratio_weights

from .conftest import IMPLS_F64, MR, mask_ratio_example, pipe_of


@pytest.mark.parametrize("impl", IMPLS_F64)
def test_mask_ratio_seed_example(impl):
    logits, targets = mask_ratio_example()
    exact = pipe_of(MR, mask_ratio_weight_eps=0.0).compute(logits, targets, impl=impl)
    assert abs(exact.loss.item() - 2.5) <= 1e-12 * 2.5
    assert exact.loss_raw.item() == pytest.approx(1.2, rel=1e-12)
    pipe = pipe_of(MR)
    default = pipe.compute(logits, targets, impl=impl).loss.item()
    assert abs(default - 2.49999996) < 1e-7 and default != 2.5
    m = pipe.get_all_metrics()
    expected = {"mean_mask_ratio": 0.625, "min_mask_ratio": 0.25, "max_mask_ratio": 1.0, "mean_weight": 1.5,
                "min_weight": 1.0, "max_weight": 2.0, "weight_std": 0.5}
    for k, v in expected.items():
        assert m[f"loss_modifiers/MaskRatioWeightModifier.{k}"].item() == pytest.approx(v, abs=1e-7), k


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("power", "lo", "hi", "eps"),
                         [(0.5, 0.1, 10.0, 1e-8), (2.0, 0.5, 3.0, 0.0), (0.0, 1.0, 1.0, 1e-3)])
def test_mask_ratio_weights_equal_the_formula(dtype, power, lo, hi, eps):
    counts = torch.tensor([0, 1, 2, 7, 16])
    t = 16
    r, w = mask_ratio_weights(counts, t, power=power, min_weight=lo, max_weight=hi, eps=eps, dtype=dtype)
    assert r.dtype == w.dtype == dtype
    for i, n in enumerate(counts.tolist()):
        ri = n / (t + eps)
        wi = min(max((ri + eps) ** -power, lo), hi) if ri + eps > 0 else hi  # 0 ** -p = inf, clamped to max
        assert r[i].item() == pytest.approx(ri, rel=1e-6 if dtype == torch.float32 else 1e-15, abs=0)
        assert w[i].item() == pytest.approx(wi, rel=1e-6 if dtype == torch.float32 else 1e-15, abs=0)
    assert mask_ratio_weights(counts, t)[0].dtype == torch.get_default_dtype()


def test_weights_clamp_and_carry_no_gradient():
    logits, targets = mask_ratio_example()
    x = logits.clone().requires_grad_(True)
    pipe = pipe_of(MR, mask_ratio_weight_max=1.5, mask_ratio_weight_eps=0.0)
    loss = pipe.modify_loss(x, targets, None)
    loss.backward()
    # w = [min(0.25 ** -0.5, 1.5), 1] = [1.5, 1]: L = (1.5·2 + 1·1) / 2 with the per-sequence CE [2, 1]
    assert loss.item() == pytest.approx(2.0, rel=1e-12)
    ref_x = logits.clone().requires_grad_(True)
    valid = targets != -100
    ce = torch.nn.functional.cross_entropy(ref_x.flatten(0, 1), targets.flatten(), reduction="none").view(2, 4)
    per_seq = (ce * valid).sum(-1) / valid.sum(-1)
    ((torch.tensor([1.5, 1.0], dtype=ref_x.dtype) * per_seq).mean()).backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-12, atol=1e-15)
    assert pipe.get_all_metrics()["loss_modifiers/MaskRatioWeightModifier.max_weight"].item() == 1.5
