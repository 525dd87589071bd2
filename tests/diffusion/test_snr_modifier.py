"""SNRWeightModifier (spec/diffusion.md §8; acceptance 10-13 for the modifier layer)."""

import math
import warnings

import pytest
import torch

from losskit.contract import ConfigError, LossInputError
from losskit.functional import diffusion as D
from losskit.modifiers.config_keys import validate_modifier_config
from losskit.modifiers.factory import create_loss_modifier_pipeline
from losskit.modifiers.mask_ratio import MaskRatioWeightModifier
from losskit.modifiers.pipeline import LossModifierPipeline
from losskit.modifiers.snr import SNRWeightModifier

F64 = torch.float64
PREFIX = "loss_modifiers/SNRWeightModifier."


def metrics(pipe):
    return {k[len(PREFIX) :]: v.item() for k, v in pipe.get_all_metrics().items()}


def set_a():
    t = torch.tensor(
        [[[1, -2], [0.5, 4]], [[0, 1], [2, -1]], [[0.3, -0.7], [1.2, 2.5]], [[-1e-8, 1], [1, 1]]], dtype=F64
    )[:, None]
    p = t.clone()
    p[0, 0] = torch.tensor([[1.1, -1.8], [0.4, 4.0]], dtype=F64)
    p[1, 0] = torch.tensor([[0.001, 1.5], [2, -1]], dtype=F64)
    return torch.tensor([0.5, 5, 1000, 0], dtype=F64), p, t


def test_worked_example_min_snr():
    ptl = torch.empty(2, 1, 2, 2)
    ptl[0], ptl[1] = 0.5, 2.0
    pipe = LossModifierPipeline([SNRWeightModifier({"loss_weighting": "min_snr", "min_snr_gamma": 5.0})])
    out = pipe.compute_elementwise(ptl, log_snr=torch.log(torch.tensor([1.0, 10.0])))
    assert out.loss.item() == pytest.approx(0.75, rel=1e-7)
    assert out.loss_raw.item() == pytest.approx(1.25, rel=1e-7)
    m = metrics(pipe)
    assert m == pytest.approx(
        {"mean_weight": 0.75, "min_weight": 0.5, "max_weight": 1.0, "mean_snr": 5.5}, rel=1e-6
    )
    # snr instead of log_snr, and the standalone entry
    mod = SNRWeightModifier({"loss_weighting": "min_snr"})
    p = torch.zeros(2, 1, 2, 2)
    t = torch.sqrt(ptl)
    assert mod.modify_loss(p, t, None, snr=torch.tensor([1.0, 10.0])).item() == pytest.approx(0.75, rel=1e-6)


def test_worked_example_sangoi():
    snr, p, t = set_a()
    pipe = LossModifierPipeline([SNRWeightModifier({"loss_weighting": "sangoi"})])
    out = pipe.compute_elementwise((p - t) ** 2, log_snr=torch.log(snr), predicted=p, target=t)
    assert out.loss.item() == pytest.approx(0.00770235800, rel=1e-6)
    assert out.loss_raw.item() == pytest.approx(0.0193750625, rel=1e-6)
    m = metrics(pipe)
    assert m["mean_weight"] == pytest.approx(0.507595753, rel=1e-6)
    assert m["mean_snr"] == pytest.approx(251.375, rel=1e-6)
    assert m["mean_mape"] == pytest.approx(0.118749999, rel=1e-6)
    # standalone equals the pipeline (default per_token_loss (p − t)²)
    mod = SNRWeightModifier({"loss_weighting": "sangoi"})
    assert mod.modify_loss(p, t, snr=snr).item() == pytest.approx(out.loss.item(), rel=1e-12)
    assert mod.get_metrics().keys() == {"mean_weight", "min_weight", "max_weight", "mean_snr", "mean_mape"}


SCHEMES = [
    ("constant", "epsilon", {}),
    ("min_snr", "epsilon", {"min_snr_gamma": 5.0}),
    ("min_snr", "flow", {"min_snr_gamma": 3.0}),
    ("debiased", "v_prediction", {}),
    ("debiased", "epsilon", {"weighting_convention": "kohya"}),
    ("p2", "sample", {"p2_gamma": 0.5, "p2_k": 2.0}),
    ("p2", "v_prediction", {"weighting_convention": "onetrainer"}),
    ("edm", "epsilon", {"edm_sigma_data": 0.5}),
    ("sd3_sigma_sqrt", "flow", {}),
    ("sd3_cosmap", "x0", {"snr_clamp_min": 0.01, "snr_clamp_max": 100.0}),
    ("sangoi", "epsilon", {}),
    ("sangoi", "v_prediction", {"snr_clamp_min": 0.0}),
]


def _params(scheme, cfg):
    keys = {
        "min_snr_gamma": "gamma",
        "p2_gamma": "gamma",
        "p2_k": "k",
        "edm_sigma_data": "sigma_data",
        "snr_clamp_min": "snr_clamp_min",
        "snr_clamp_max": "snr_clamp_max",
    }
    return {keys[k]: v for k, v in cfg.items() if k in keys}


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    lam = torch.tensor([-math.inf, -3.0, 0.5, 4.0, 9.0, math.inf], dtype=F64)
    t = torch.randn(6, 1, 8, 8, generator=g).to(dtype)
    p = (t + 0.3 * torch.randn(6, 1, 8, 8, generator=g).to(dtype)).requires_grad_(True)
    mask = torch.rand(6, 1, 8, 8, generator=g) < 0.7
    mask[2] = False  # one empty example
    return lam, p, t, mask


def _hand(scheme, space, cfg, lam, p, t, mask, *, detach=True):
    conv = cfg.get("weighting_convention", "reference")
    if scheme == "sangoi":
        lo = cfg.get("snr_clamp_min", 1e-4)
        w = D.sangoi_weight(torch.exp(lam), p, t, mask=mask, detach=detach, min_snr=lo, dtype=p.dtype)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w = D.loss_weight(
                scheme, lam, prediction_type=space, convention=conv, dtype=p.dtype, **_params(scheme, cfg)
            )
    ell = ((p - t) ** 2).reshape(6, -1)
    if mask is None:  # without a mask the §8 reduction is mean(w[:, None, None, None] · ℓ)
        return (w[:, None, None, None] * (p - t) ** 2).mean()
    m = mask.reshape(6, -1).to(ell.dtype)
    if scheme == "constant":  # no modifier is enabled: the plain masked (token) mean, modifiers §3.11
        return (m * ell).sum() / m.sum()
    n = m.sum(1)
    nonempty = n > 0
    per_ex = (m * ell).sum(1) / n.clamp(min=1)
    return (w * per_ex)[nonempty].sum() / nonempty.sum()


@pytest.mark.parametrize("scheme, space, cfg", SCHEMES, ids=[f"{s}-{sp}" for s, sp, _ in SCHEMES])
@pytest.mark.parametrize("use_mask", [True, False])
def test_modifier_equals_hand_formula(scheme, space, cfg, use_mask):
    lam, p, t, mask = _inputs()
    mask = mask if use_mask else None
    mod = SNRWeightModifier({"loss_weighting": scheme, "prediction_type": space, **cfg})
    pipe = LossModifierPipeline([mod])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = pipe.compute_elementwise((p - t) ** 2, mask=mask, log_snr=lam, predicted=p, target=t)
    (g,) = torch.autograd.grad(out.loss, p)
    p2 = p.detach().clone().requires_grad_(True)
    ref = _hand(scheme, space, cfg, lam, p2, t, mask)
    (g_ref,) = torch.autograd.grad(ref, p2)
    assert torch.isfinite(out.loss)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(g, g_ref, rtol=1e-5, atol=1e-12)


def test_sangoi_differentiable_weights_change_the_gradient():
    lam, p, t, mask = _inputs(F64)
    lam = lam.clamp(-3, 3)
    cfg = {"loss_weighting": "sangoi", "loss_weighting_differentiable_weights": True}
    pipe = LossModifierPipeline([SNRWeightModifier(cfg)])
    out = pipe.compute_elementwise((p - t) ** 2, mask=mask, log_snr=lam, predicted=p, target=t)
    (g,) = torch.autograd.grad(out.loss, p)
    p_a = p.detach().clone().requires_grad_(True)
    (g_nondetached,) = torch.autograd.grad(
        _hand("sangoi", "epsilon", {}, lam, p_a, t, mask, detach=False), p_a
    )
    p_b = p.detach().clone().requires_grad_(True)
    (g_detached,) = torch.autograd.grad(_hand("sangoi", "epsilon", {}, lam, p_b, t, mask), p_b)
    assert torch.allclose(g, g_nondetached, rtol=1e-10, atol=1e-14)
    assert not torch.allclose(g, g_detached, rtol=1e-3, atol=0)


def test_constant_builds_nothing_and_is_the_plain_mean():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = create_loss_modifier_pipeline(
            {"loss_modifiers_enabled": True, "loss_weighting": "constant"}, verbose=False
        )
    assert pipe.is_empty()
    ell = torch.rand(3, 1, 4, 4)
    out = pipe.compute_elementwise(ell, log_snr=torch.zeros(3))
    assert torch.equal(out.loss, ell.mean()) and out.loss_raw is out.loss
    assert pipe.get_all_metrics() == {}
    assert SNRWeightModifier({}).is_enabled() is False
    # standalone constant: the plain masked mean, like an empty pipeline
    assert SNRWeightModifier({}).modify_loss(
        ell, torch.zeros_like(ell), log_snr=torch.zeros(3)
    ).item() == pytest.approx((ell**2).mean().item(), rel=1e-6)


def test_factory_builds_it_after_mask_ratio():
    pipe = create_loss_modifier_pipeline(
        {"loss_modifiers_enabled": True, "loss_weighting": "p2"}, verbose=False
    )
    assert [type(m).__name__ for m in pipe.enabled_modifiers] == ["SNRWeightModifier"]
    mixed = LossModifierPipeline(
        [SNRWeightModifier({"loss_weighting": "edm"}), MaskRatioWeightModifier({"enabled": True})]
    )
    assert mixed.describe() == "Enabled loss modifiers: MaskRatioWeightModifier, SNRWeightModifier"


@pytest.mark.parametrize(
    "scheme", ["min_snr", "debiased", "p2", "edm", "sd3_sigma_sqrt", "sd3_cosmap", "sangoi"]
)
def test_no_host_sync_in_a_step(scheme, monkeypatch):
    lam, p, t, mask = _inputs()
    space = "flow" if scheme.startswith("sd3") else "epsilon"
    cfg = {"loss_weighting": scheme, "prediction_type": space}
    pipe = LossModifierPipeline([SNRWeightModifier(cfg)], input_checks="deferred")

    def boom(*a, **k):
        raise AssertionError("host sync")

    for name in ("item", "__bool__", "__float__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    out = pipe.compute_elementwise((p - t) ** 2, mask=mask, log_snr=lam, predicted=p, target=t)
    out.loss.backward()
    pipe.get_all_metrics()
    monkeypatch.undo()
    assert torch.isfinite(out.loss).item() and torch.isfinite(p.grad).all().item()


@pytest.mark.parametrize(
    "cfg, key",
    [
        ({"loss_weighting": "foo"}, "loss_weighting"),
        ({"loss_weighting": "min_snr", "min_snr_gamma": 0}, "min_snr_gamma"),
        ({"loss_weighting": "p2", "p2_k": 0}, "p2_k"),
        ({"loss_weighting": "p2", "snr_clamp_min": 2.0, "snr_clamp_max": 1.0}, "snr_clamp_min"),
        (
            {"loss_weighting": "min_snr", "weighting_convention": "onetrainer", "prediction_type": "flow"},
            "weighting_convention",
        ),
        ({"loss_weighting": "p2", "weighting_convention": "onetrainer", "p2_k": 2.0}, "weighting_convention"),
        ({"loss_weighting": "debiased", "weighting_convention": "diffusers"}, "weighting_convention"),
        (
            {"loss_weighting": "min_snr", "loss_weighting_differentiable_weights": True},
            "loss_weighting_differentiable_weights",
        ),
        ({"loss_weighting": "edm", "edm_sigma_data": -1}, "edm_sigma_data"),
        ({"loss_weighting": "min_snr", "prediction_type": "noise"}, "prediction_type"),
    ],
)
def test_config_errors_name_the_key(cfg, key):
    with pytest.raises(ConfigError, match=key):
        SNRWeightModifier(cfg)
    with pytest.raises(ConfigError, match=key):
        create_loss_modifier_pipeline({"loss_modifiers_enabled": True, **cfg}, verbose=False)


def test_config_strings_and_hints():
    mod = SNRWeightModifier(
        {"loss_weighting": "p2", "p2_gamma": "0.5", "snr_clamp_max": "None", "snr_clamp_min": "0.01"}
    )
    assert mod.settings["p2_gamma"] == 0.5 and mod.settings["snr_clamp_max"] is None
    assert mod.settings["snr_clamp_min"] == 0.01
    with pytest.raises(ConfigError, match="did you mean 'min_snr_gamma'"):
        validate_modifier_config({"min_snr_gama": 5})
    with pytest.raises(ConfigError, match="did you mean 'min_snr_gamma'"):
        SNRWeightModifier({"loss_weighting": "min_snr", "min_snr_gama": 5})
    validate_modifier_config({"zero_terminal_snr": True})  # a task key, not caught by the SNR patterns


def test_missing_inputs_raise():
    mod = SNRWeightModifier({"loss_weighting": "min_snr"})
    p = torch.zeros(2, 3)
    with pytest.raises(LossInputError, match="exactly one of log_snr / snr"):
        mod.modify_loss(p, p)
    with pytest.raises(LossInputError, match="exactly one of log_snr / snr"):
        mod.modify_loss(p, p, log_snr=torch.zeros(2), snr=torch.ones(2))
    with pytest.raises(LossInputError, match=r"log_snr must hold one value per example \(shape \[2\]\)"):
        mod.modify_loss(p, p, log_snr=torch.zeros(3))
    with pytest.raises(LossInputError, match="non-empty batch"):
        mod.modify_loss(torch.zeros(0, 3), torch.zeros(0, 3), log_snr=torch.zeros(0))
    pipe = LossModifierPipeline([SNRWeightModifier({"loss_weighting": "sangoi"})])
    with pytest.raises(LossInputError, match="needs the predicted and target"):
        pipe.compute_elementwise(torch.ones(2, 3), log_snr=torch.zeros(2))
    with pytest.raises(LossInputError, match="log_snr"):
        LossModifierPipeline([mod]).compute_elementwise(torch.ones(2, 3))
