"""``kernels.fields``: ``StatFields`` (the flat per-row outputs of every implementation) and its ``TokenStats``
view."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from losskit.contract import TokenStats
from losskit.kernels.fields import StatFields, to_token_stats

NAMES = [f.name for f in dataclasses.fields(StatFields)]


def test_field_order_matches_token_stats():
    assert StatFields.FLOATS == TokenStats.FLOAT_FIELDS
    assert NAMES == [f.name for f in dataclasses.fields(TokenStats) if f.name != "valid"]
    # the float fields come first, in FLOATS order: the autograd Functions return them in this order
    assert tuple(NAMES[: len(StatFields.FLOATS)]) == StatFields.FLOATS
    assert NAMES[len(StatFields.FLOATS):] == ["argmax", "correct", "bad"]


def fields_of(n, *, grad=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(n)
    floats = {k: torch.randn(n, generator=g, dtype=dtype, requires_grad=grad) for k in StatFields.FLOATS}
    return StatFields(**floats, argmax=torch.randint(0, 9, (n,), generator=g),
                      correct=torch.rand(n, generator=g) > 0.5, bad=torch.rand(n, generator=g) > 0.8)


def test_outputs_are_the_fields_in_declaration_order():
    f = fields_of(5)
    out = f.outputs()
    assert len(out) == len(NAMES)
    assert all(o is getattr(f, name) for o, name in zip(out, NAMES, strict=True))
    assert StatFields(*out) == f


@pytest.mark.parametrize("lead", [(12,), (3, 4), (1, 12), (12, 1)])
@pytest.mark.parametrize("detach", [False, True])
def test_to_token_stats_reshapes_every_field_and_detaches_on_request(lead, detach):
    f = fields_of(12, grad=True)
    valid = torch.rand(12) > 0.3
    ts = to_token_stats(f, valid, lead, detach=detach)
    assert isinstance(ts, TokenStats)
    assert torch.equal(ts.valid, valid.reshape(lead))
    for name in NAMES:
        got, flat = getattr(ts, name), getattr(f, name)
        assert tuple(got.shape) == lead, name
        assert torch.equal(got.detach(), flat.detach().reshape(lead)), name
        assert got.dtype == flat.dtype, name
    for name in StatFields.FLOATS:
        got = getattr(ts, name)
        assert got.requires_grad is (not detach), name
        if not detach:  # still connected to the flat field: a gradient reaches it
            (g,) = torch.autograd.grad(got.sum(), getattr(f, name))
            assert torch.equal(g, torch.ones(12, dtype=torch.float64)), name
