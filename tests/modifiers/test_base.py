"""Shared pieces of the built-in modifiers (``base.py``): ``masked_summary`` (their metric shape) and the optional
hooks declared on ``BaseLossModifier``."""

from __future__ import annotations

import pytest
import torch

from losskit.modifiers.base import masked_summary


@pytest.mark.parametrize("shape", [(7,), (3, 5), (1, 1)])
def test_masked_summary_equals_plain_torch(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    keep = torch.rand(shape, generator=g) < 0.6
    keep.view(-1)[0] = True
    x[~keep] = float("nan")  # values outside the selection must never leak
    k = x[keep]
    got = masked_summary(x, keep)
    want = (k.mean(), k.min(), k.max(), k.std(unbiased=False))
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float64 and a.dim() == 0
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.equal(masked_summary(x, keep, keep.sum()).max, got.max)


def test_masked_summary_of_an_empty_selection_is_zero():
    x = torch.tensor([1.0, float("inf"), -2.0])
    out = masked_summary(x, torch.zeros(3, dtype=torch.bool))
    assert [float(v) for v in out] == [0.0, 0.0, 0.0, 0.0]


def test_optional_hooks_are_declared_on_the_base_class():
    from losskit.modifiers.base import BaseLossModifier, is_rank0

    class Plain(BaseLossModifier):
        def modify_loss(self, logits, targets, loss, **kwargs):
            return loss

        def get_metrics(self):
            return {}

    m = Plain({"enabled": True})
    assert m.bad_rows(None) is None and m.explain_bad(None, None, None) is None and m.last_weights is None
    assert is_rank0()
