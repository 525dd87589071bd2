"""Trainer conventions (spec/diffusion.md §4; acceptance 4): each defined cell equals that trainer's literal
formula at 200 log-spaced SNRs; every undefined cell raises LossInputError naming scheme, space and convention."""

import math

import pytest
import torch

from losskit.contract import LossInputError
from losskit.functional import diffusion as D

S = torch.logspace(-4, 4, 200, dtype=torch.float64)
LAM = torch.log(S)
GAMMA = 5.0


def cap(s, m=1000.0):
    return torch.minimum(s, torch.full_like(s, m))


# (scheme, space, convention, literal formula of S, extra kwargs)
LITERAL = [
    *[
        ("min_snr", "epsilon", conv, lambda s: torch.minimum(s, torch.full_like(s, GAMMA)) / s, {})
        for conv in ("onetrainer", "kohya", "diffusers")
    ],
    *[
        ("min_snr", "v_prediction", conv, lambda s: torch.minimum(s, torch.full_like(s, GAMMA)) / (s + 1), {})
        for conv in ("onetrainer", "kohya", "diffusers")
    ],
    ("min_snr", "sample", "diffusers", lambda s: torch.minimum(s, torch.full_like(s, GAMMA)), {}),
    ("debiased", "epsilon", "onetrainer", lambda s: 1 / torch.sqrt(cap(s)), {}),
    ("debiased", "epsilon", "kohya", lambda s: 1 / torch.sqrt(cap(s)), {}),
    ("debiased", "v_prediction", "onetrainer", lambda s: 1 / torch.sqrt(cap(s) + 1), {}),
    ("debiased", "v_prediction", "kohya", lambda s: 1 / (cap(s) + 1), {}),
    ("p2", "epsilon", "onetrainer", lambda s: (1 + s) ** -1.0, {"gamma": 1.0}),
    ("p2", "epsilon", "onetrainer", lambda s: (1 + s) ** -0.5, {"gamma": 0.5}),
    ("p2", "v_prediction", "onetrainer", lambda s: (2 + s) ** -1.0, {"gamma": 1.0}),
    ("p2", "v_prediction", "onetrainer", lambda s: (2 + s) ** -0.5, {"gamma": 0.5}),
]


@pytest.mark.parametrize(
    "scheme, space, conv, literal, kw", LITERAL, ids=[f"{r[0]}-{r[1]}-{r[2]}-{r[4]}" for r in LITERAL]
)
def test_parity_with_trainer_literal(scheme, space, conv, literal, kw):
    if scheme == "min_snr":
        kw = {"gamma": GAMMA}
    w = D.loss_weight(scheme, LAM, prediction_type=space, convention=conv, dtype=torch.float64, **kw)
    expected = literal(S)
    assert torch.all((w - expected).abs() <= 1e-6 * expected.abs()), ((w - expected).abs() / expected).max()


def test_min_snr_conventions_coincide_everywhere_finite():
    for space in ("epsilon", "v_prediction"):
        ref = D.min_snr_weight(LAM, prediction_type=space)
        for conv in ("onetrainer", "kohya", "diffusers"):
            assert torch.equal(D.min_snr_weight(LAM, prediction_type=space, convention=conv), ref)


def test_trainer_nans_become_reference_limits():
    """Where the literal trainer formula is 0/0 or 1/0 (SNR 0) the result is the reference limit or the guard."""
    zero = torch.zeros(1, dtype=torch.float64)
    lam0 = torch.log(zero)
    assert math.isnan((torch.minimum(zero, torch.tensor(GAMMA)) / zero).item())  # the trainers' literal
    for conv in ("onetrainer", "kohya", "diffusers"):
        assert D.min_snr_weight(lam0, prediction_type="epsilon", convention=conv).item() == 1.0
    assert math.isinf((1 / torch.sqrt(zero)).item())
    for conv in ("onetrainer", "kohya"):
        assert D.debiased_weight(lam0, prediction_type="epsilon", convention=conv).item() == pytest.approx(
            1e5
        )


UNDEFINED = [
    ("min_snr", "sample", "onetrainer"),
    ("min_snr", "sample", "kohya"),
    ("min_snr", "x0", "kohya"),
    ("debiased", "sample", "onetrainer"),
    ("debiased", "sample", "kohya"),
    *[("debiased", sp, "diffusers") for sp in ("epsilon", "v_prediction", "sample")],
    ("p2", "sample", "onetrainer"),
    *[("p2", sp, conv) for sp in ("epsilon", "v_prediction", "sample") for conv in ("kohya", "diffusers")],
    *[
        (sc, "flow", conv)
        for sc in ("min_snr", "debiased", "p2")
        for conv in ("onetrainer", "kohya", "diffusers")
    ],
]


@pytest.mark.parametrize("scheme, space, conv", UNDEFINED, ids=["-".join(c) for c in UNDEFINED])
def test_undefined_cells_raise(scheme, space, conv):
    with pytest.raises(LossInputError) as info:
        D.loss_weight(scheme, LAM, prediction_type=space, convention=conv)
    msg = str(info.value)
    assert repr(scheme) in msg and repr(space) in msg and repr(conv) in msg
    # the reference convention defines every space
    D.loss_weight(scheme, LAM, prediction_type=space)


def test_p2_onetrainer_requires_k_1():
    for space in ("epsilon", "v_prediction"):
        with pytest.raises(LossInputError) as info:
            D.p2_weight(LAM, prediction_type=space, convention="onetrainer", k=2.0)
        msg = str(info.value)
        assert "'p2'" in msg and repr(space) in msg and "'onetrainer'" in msg and "k=2.0" in msg


def test_other_schemes_accept_any_convention():
    """Schemes without convention variants give the reference weights whatever convention is named."""
    for scheme in ("edm", "constant", "sd3_cosmap"):
        reference = D.loss_weight(scheme, LAM, prediction_type="flow")
        assert torch.isfinite(reference).all() and (reference > 0).all()
        for conv in D.CONVENTIONS:
            assert torch.equal(D.loss_weight(scheme, LAM, prediction_type="flow", convention=conv), reference)


def test_reference_differs_from_trainers_where_they_disagree():
    """The reason for the reference default: trainers' v forms of debiased and P2 are not the exact conversion."""
    ref = D.debiased_weight(LAM, prediction_type="v_prediction", dtype=torch.float64)
    assert torch.allclose(ref, S**0.5 / (1 + S), rtol=1e-12)
    for conv in ("onetrainer", "kohya"):
        assert not torch.allclose(
            D.debiased_weight(LAM, prediction_type="v_prediction", convention=conv, dtype=torch.float64),
            ref,
            rtol=1e-3,
        )
