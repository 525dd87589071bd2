"""MaskRatioWeightModifier (seed 000, spec/modifiers.md §3.6, acceptance 4): the seed example and its metrics."""

from __future__ import annotations

import pytest

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
