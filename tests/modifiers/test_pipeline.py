"""LossModifierPipeline (spec/modifiers.md §3, acceptance 5, 6, 11, 13–15, 17, 18, 20): composition of the built-ins,
the phases, global_tokens, input checks and the element-wise entry.

Every number comes from the spec's worked examples (computed in float64); every composition is checked against the
plain-torch oracle of ``oracle.py`` (dense log_softmax, no losskit code). Each built-in's own tests live in the file
of its stem (``test_entropy.py``, ``test_smoothing.py``, ``test_mask_ratio.py``, ``test_standalone.py``,
``test_factory.py``); the shared inputs in ``conftest.py``.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings

import pytest
import torch

from losskit import kernels
from losskit.contract import ConfigError, EmptyBatchWarning, LossInputError
from losskit.functional.reduce import step_counts as make_step_counts
from losskit.modifiers import (
    BaseLossModifier,
    EntropyModifier,
    LossModifierPipeline,
    MaskRatioWeightModifier,
    ModifiedLoss,
    TargetSmoothingModifier,
    Weights,
    create_loss_modifier_pipeline,
)

from . import oracle
from .conftest import (
    COMPOSE_TARGETS,
    ENT,
    F64,
    IMPLS_F32,
    IMPLS_F64,
    MR,
    PARTS,
    SMO,
    CustomModifier,
    _bad_case,
    mask_ratio_example,
    pipe_of,
    random_batch,
    seed_logits,
)


@pytest.mark.parametrize("impl", IMPLS_F32)
def test_seed_batch_fp32_every_impl(impl):
    out = pipe_of(ENT, SMO, MR).compute(seed_logits(torch.float32), COMPOSE_TARGETS, impl=impl)
    assert out.loss.item() == pytest.approx(2.259536, abs=2e-6)


# ---- acceptance 5: composition with a non-uniform mask ------------------------------------------------------------

SINGLES_AND_PAIRS = {
    ("S",): 1.584337, ("E",): 1.093041, ("M",): 2.934111,
    ("E", "S"): 1.190063, ("S", "M"): 3.008130, ("E", "M"): 2.203936, ("E", "S", "M"): 2.259536,
}


@pytest.mark.parametrize("eps", [0.0, 1e-8])
@pytest.mark.parametrize("impl", IMPLS_F64)
def test_composition_seed_numbers(impl, eps):
    values = {}
    for combo, expected in SINGLES_AND_PAIRS.items():
        pipe = pipe_of(*(PARTS[c] for c in combo), entropy_modifier_eps=eps, mask_ratio_weight_eps=eps)
        values[combo] = pipe.compute(seed_logits(), COMPOSE_TARGETS, impl=impl).loss.item()
        assert values[combo] == pytest.approx(expected, abs=1e-6), combo
    full = values[("E", "S", "M")]
    assert all(abs(full - v) > 1e-3 for c, v in values.items() if c != ("E", "S", "M"))


def test_composition_intermediates_and_order():
    pipe = pipe_of(ENT, SMO, MR)
    pipe.compute(seed_logits(), COMPOSE_TARGETS)
    m = pipe.get_all_metrics()
    assert m["loss_modifiers/EntropyModifier.entropy_weight"].item() == pytest.approx(0.751143, abs=1e-6)
    assert m["loss_modifiers/MaskRatioWeightModifier.max_weight"].item() == pytest.approx(1.414214, abs=1e-6)
    # ℓ: the smoothed per-token loss reaches phase 4 unchanged
    seen = {}

    class Spy(BaseLossModifier):
        def modify_loss(self, logits, targets, loss, **kw):
            seen.update(kw)
            return loss

        def get_metrics(self):
            return {}

    # every order of the modifiers (list and config) gives the same loss
    mods = [EntropyModifier({"enabled": True, "threshold": 0.5}),
            TargetSmoothingModifier({"enabled": True, "factor": 0.1}), MaskRatioWeightModifier({"enabled": True})]
    results = set()
    for perm in itertools.permutations(mods):
        p = LossModifierPipeline(list(perm) + [Spy({"enabled": True})])
        results.add(round(p.modify_loss(seed_logits(), COMPOSE_TARGETS, None).item(), 12))
        assert p.describe() == ("Enabled loss modifiers: EntropyModifier, TargetSmoothingModifier, "
                                "MaskRatioWeightModifier, Spy")
    assert results == {round(2.259536159, 6)} or len(results) == 1
    torch.testing.assert_close(seen["per_token_loss"], torch.tensor([[0.407507, 0.364206], [3.981297, 0]],
                                                                    dtype=F64), atol=1e-6, rtol=0)
    per_sample = pipe_of(ENT, SMO, MR, entropy_modifier_per_sample=True)
    assert per_sample.modify_loss(seed_logits(), COMPOSE_TARGETS, None).item() == pytest.approx(1.600970, abs=1e-6)


# ---- acceptance 6: random composition against the hand formula ----------------------------------------------------

SUBSETS = [c for r in range(4) for c in itertools.combinations("ESM", r)]


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("combo", SUBSETS, ids=lambda c: "+".join(c) or "plain")
@pytest.mark.parametrize("per_sample", [False, True], ids=["beta", "per_sample"])
def test_random_composition_matches_hand_formula(combo, dtype, per_sample):
    if per_sample and "E" not in combo:
        pytest.skip("per-sample mode concerns the entropy modifier only")
    logits, targets, mask = random_batch(dtype)
    cfg = {"loss_modifiers_enabled": bool(combo)}
    kw = {}
    if "E" in combo:
        cfg.update(entropy_modifier_enabled=True, entropy_modifier_weight=0.7, entropy_modifier_threshold=2.9,
                   entropy_modifier_per_sample=per_sample)
        kw["entropy"] = {"weight": 0.7, "threshold": 2.9, "per_sample": per_sample}
    if "S" in combo:
        cfg.update(target_smoothing_enabled=True, target_smoothing_factor=0.2, target_smoothing_special_tokens=[1, 2],
                   target_smoothing_padding_token=0)
        kw["smoothing"] = {"factor": 0.2, "special": (1, 2), "pad": 0}
    if "M" in combo:
        cfg.update(mask_ratio_weight_enabled=True, mask_ratio_weight_power=0.7, mask_ratio_weight_max=3.0)
        kw["mask_ratio"] = {"power": 0.7, "max": 3.0}
    pipe = create_loss_modifier_pipeline(cfg, verbose=False)
    x = logits.clone().requires_grad_(True)
    out = pipe.compute(x, targets, mask=mask)
    out.loss.backward()
    ref_x = logits.detach().to(F64).requires_grad_(True)
    ref = oracle.hand_loss(ref_x, targets, mask=mask, **kw)
    ref.backward()
    tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == F64 else {"rtol": 1e-5, "atol": 1e-7}
    torch.testing.assert_close(out.loss.detach().to(F64), ref.detach(), **tol)
    torch.testing.assert_close(x.grad.to(F64), ref_x.grad, **tol)


# ---- acceptance 11 and 12: gradients ------------------------------------------------------------------------------

def small_case():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 5, generator=g, dtype=F64)
    targets = torch.tensor([[1, 4, -100], [0, 2, 3]])
    return logits, targets


@pytest.mark.parametrize("impl", IMPLS_F64)
@pytest.mark.parametrize("per_sample", [False, True])
def test_gradcheck_full_pipeline_differentiable_weights(impl, per_sample):
    logits, targets = small_case()
    pipe = pipe_of(ENT, SMO, MR, entropy_modifier_differentiable_weights=True, entropy_modifier_threshold=0.1,
                   entropy_modifier_per_sample=per_sample, target_smoothing_special_tokens=[1])
    f = lambda x: pipe.compute(x, targets, impl=impl).loss
    assert torch.autograd.gradcheck(f, (logits.clone().requires_grad_(True),), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("impl", IMPLS_F64)
def test_gradcheck_full_pipeline_detached_weights(impl):
    """With β detached, L(x)·β0/β(x) = β0·R(x); its numerical gradient is the detached analytic one."""
    logits, targets = small_case()
    pipe = pipe_of(ENT, SMO, MR, entropy_modifier_threshold=0.1, target_smoothing_special_tokens=[1])
    pipe.compute(logits, targets, impl=impl)
    beta0 = pipe.get_all_metrics()["loss_modifiers/EntropyModifier.entropy_weight"].clone()

    def f(x):
        loss = pipe.compute(x, targets, impl=impl).loss
        beta = pipe.get_all_metrics()["loss_modifiers/EntropyModifier.entropy_weight"]
        assert not beta.requires_grad
        return loss * (beta0 / beta)

    assert torch.autograd.gradcheck(f, (logits.clone().requires_grad_(True),), eps=1e-6, atol=1e-8)


# ---- acceptance 13: empty samples ---------------------------------------------------------------------------------

@pytest.mark.parametrize("per_sample", [False, True])
def test_empty_sample_equals_batch_without_it(per_sample):
    logits, targets, _ = random_batch(F64, seed=7)
    targets = targets.clone()
    targets[0, :4] = torch.tensor([3, 4, 5, 6])  # row 0 non-empty here; row k = 2 becomes empty
    k = 2
    targets[k] = -100
    logits[k] = float("nan")  # never read
    keep = [i for i in range(targets.shape[0]) if i != k]
    cfgs = (ENT, SMO, MR)
    extra = {"entropy_modifier_per_sample": per_sample}
    x_full = logits.clone().requires_grad_(True)
    p_full = pipe_of(*cfgs, **extra)
    l_full = p_full.compute(x_full, targets).loss
    l_full.backward()
    x_sub = logits[keep].clone().requires_grad_(True)
    p_sub = pipe_of(*cfgs, **extra)
    l_sub = p_sub.compute(x_sub, targets[keep]).loss
    l_sub.backward()
    torch.testing.assert_close(l_full, l_sub, rtol=1e-12, atol=0)
    torch.testing.assert_close(x_full.grad[keep], x_sub.grad, rtol=1e-12, atol=1e-15)
    assert torch.equal(x_full.grad[k], torch.zeros_like(x_full.grad[k]))
    m_full, m_sub = p_full.get_all_metrics(), p_sub.get_all_metrics()
    for key in m_full:
        if "EntropyModifier.entropy_weight" in key or "MaskRatio" in key:
            torch.testing.assert_close(m_full[key], m_sub[key], rtol=1e-12, atol=1e-15)


# ---- acceptance 14: all-invalid batch -----------------------------------------------------------------------------

@pytest.mark.parametrize("entry", ["modify_loss", "compute", "disabled"])
def test_all_invalid_batch(entry):
    logits = torch.randn(2, 3, 5, dtype=F64)
    logits[0, 1] = float("nan")
    x = logits.requires_grad_(True)
    targets = torch.full((2, 3), -100)
    pipe = pipe_of(ENT, SMO, MR, target_smoothing_special_tokens=[0]) if entry != "disabled" else pipe_of()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if entry == "modify_loss":
            loss = pipe.modify_loss(x, targets, None)
        else:
            loss = pipe.compute(x, targets).loss
    empty = [w for w in caught if issubclass(w.category, EmptyBatchWarning)]
    assert len(empty) == 1, [str(w.message) for w in caught]
    assert str(empty[0].message) == "no valid target positions; loss is 0"
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x.grad))


# ---- acceptance 15: bad input in both modes -----------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "needles"), [
    ("nan", ["logits", "NaN", "(b=1, t=1)"]),
    ("pinf", ["logits", "inf", "(b=1, t=1)"]),
    ("ninf_target", ["logits", "inf", "(b=1, t=1)"]),
    ("target_range", ["target", "6", "(b=1, t=1)"]),
])
@pytest.mark.parametrize("entry", ["modify_loss", "compute", "disabled"])
def test_bad_input_immediate_raises(kind, needles, entry):
    logits, targets = _bad_case(kind)
    pipe = pipe_of() if entry == "disabled" else pipe_of(ENT, SMO, MR, target_smoothing_factor=0.0)
    with pytest.raises(LossInputError) as info:
        if entry == "modify_loss":
            pipe.modify_loss(logits, targets, None)
        else:
            pipe.compute(logits, targets)
    for needle in needles:
        assert needle in str(info.value)


@pytest.mark.parametrize("kind", ["nan", "pinf", "ninf_target", "target_range"])
@pytest.mark.parametrize("entry", ["compute", "disabled"])
def test_bad_input_deferred_sets_flag(kind, entry):
    logits, targets = _bad_case(kind)
    pipe = pipe_of(input_checks="deferred") if entry == "disabled" else pipe_of(ENT, SMO, MR, input_checks="deferred")
    out = pipe.compute(logits, targets)
    assert isinstance(out, ModifiedLoss)
    assert out.bad.dim() == 0 and out.bad.dtype == torch.bool and bool(out.bad)
    assert pipe.last_bad is out.bad


# ---- acceptance 17: zero overhead ---------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [
    {},
    {"loss_modifiers_enabled": False, "entropy_modifier_enabled": True, "target_smoothing_enabled": True,
     "mask_ratio_weight_enabled": True},
    {"loss_modifiers_enabled": True, "entropy_modifier_enabled": False, "target_smoothing_enabled": False,
     "mask_ratio_weight_enabled": False},
], ids=["empty", "master_off", "subs_off"])
def test_zero_overhead_when_disabled(config, monkeypatch, capsys):
    def boom(*a, **k):
        raise AssertionError("token_stats must not run when every modifier is disabled")

    monkeypatch.setattr(kernels, "token_stats", boom)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = create_loss_modifier_pipeline(config)
    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.zeros(6, dtype=torch.long))
    assert pipe.modify_loss(logits, torch.zeros(2, 3, dtype=torch.long), loss) is loss
    assert pipe.modify_loss(logits, torch.zeros(2, 3, dtype=torch.long), loss, mask=None, iter_num=3) is loss
    assert pipe.get_all_metrics() == {}
    assert capsys.readouterr().out == ""


def test_disabled_compute_is_plain_cross_entropy():
    logits, targets, mask = random_batch(F64, seed=2)
    out = pipe_of().compute(logits, targets, mask=mask)
    assert out.loss is out.loss_raw
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.where(mask, targets, -100).flatten())
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=0)


# ---- acceptance 18: no host sync in a deferred-mode step ----------------------------------------------------------

@contextlib.contextmanager
def no_sync():
    def forbid(name):
        def raiser(*a, **k):
            raise AssertionError(f"host sync: Tensor.{name} called inside the step")
        return raiser

    saved = {n: getattr(torch.Tensor, n) for n in ("item", "__bool__", "tolist", "__float__")}
    try:
        for n in saved:
            setattr(torch.Tensor, n, forbid(n))
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("impl", IMPLS_F32)
def test_deferred_step_has_no_sync(impl):
    logits, targets, mask = random_batch(torch.float32, seed=4)
    pipe = pipe_of(ENT, SMO, MR, input_checks="deferred", target_smoothing_special_tokens=[1, 2],
                   target_smoothing_padding_token=0)
    x = logits.clone().requires_grad_(True)
    sc = make_step_counts(targets, masks=mask, padding_token=0)
    with no_sync():
        out = pipe.compute(x, targets, mask=mask, impl=impl)
        out.loss.backward()
        out2 = pipe.compute(x.detach().clone().requires_grad_(True), targets, mask=mask, step_counts=sc, impl=impl)
        out2.loss.backward()
        metrics = pipe.get_all_metrics()
    assert len(metrics) == 5 + 4 + 7
    for key, value in metrics.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad, key
    assert torch.isfinite(x.grad).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_deferred_step_has_no_sync_cuda():
    logits, targets, mask = (t.cuda() for t in random_batch(torch.float32, seed=4))
    pipe = pipe_of(ENT, SMO, MR, input_checks="deferred", target_smoothing_special_tokens=[1, 2],
                   target_smoothing_padding_token=0)
    sc = make_step_counts(targets, masks=mask, padding_token=0)
    for step in range(2):  # the first step compiles kernels and caches id tensors; the second must not sync
        x = logits.clone().requires_grad_(True)
        mode = contextlib.nullcontext() if step == 0 else _cuda_sync_error()
        with mode:
            out = pipe.compute(x, targets, mask=mask, step_counts=sc)
            out.loss.backward()
            metrics = pipe.get_all_metrics()
    assert all(v.dim() == 0 and not v.requires_grad and v.is_cuda for v in metrics.values())


@contextlib.contextmanager
def _cuda_sync_error():
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---- acceptance 20: what phase 4 receives and returns -------------------------------------------------------------

@pytest.mark.parametrize("bad", ["vector", "dict", "float"])
def test_custom_modifier_must_return_a_scalar_tensor(bad):
    class Bad(CustomModifier):
        def modify_loss(self, logits, targets, loss, **kwargs):
            if bad == "vector":
                return loss * torch.ones(logits.shape[0], dtype=loss.dtype)
            if bad == "dict":
                return {"loss": loss}
            return 1.0

    Bad.__name__ = "CustomModifier"
    logits, targets = mask_ratio_example()
    pipe = LossModifierPipeline([MaskRatioWeightModifier({"enabled": True}), Bad({"enabled": True})])
    with pytest.raises(TypeError, match="CustomModifier.modify_loss must return a 0-d tensor"):
        pipe.modify_loss(logits, targets, None)


def test_phase4_receives_the_documented_kwargs():
    seen = {}

    class Probe(CustomModifier):
        def modify_loss(self, logits, targets, loss, **kwargs):
            seen.update(kwargs, loss=loss)
            return loss

    logits, targets = mask_ratio_example()
    pipe = LossModifierPipeline([Probe({"enabled": True}), MaskRatioWeightModifier({"enabled": True})])
    out = pipe.modify_loss(logits, targets, None, iter_num=7, ignore_index=-100, my_extra="x")
    assert set(seen) == {"mask", "ignore_index", "iter_num", "per_token_loss", "token_stats", "my_extra", "loss"}
    assert seen["iter_num"] == 7 and seen["my_extra"] == "x" and seen["loss"] is out
    assert torch.equal(seen["mask"], targets != -100)
    assert seen["per_token_loss"].shape == (2, 4)


# ---- global_tokens, names, phases, registration, the element-wise entry -------------------------------------------

def test_global_tokens_shares_sum_to_the_whole_batch():
    logits, targets, mask = random_batch(F64, seed=9)
    cfg = dict(**SMO, **MR, target_smoothing_padding_token=0, target_smoothing_special_tokens=[1, 2])
    cfg.update(ENT, entropy_modifier_per_sample=True)
    whole = pipe_of(cfg).compute(logits, targets, mask=mask).loss
    parts = [slice(0, 2), slice(2, 6)]
    sc = make_step_counts([targets[s] for s in parts], masks=[mask[s] for s in parts], padding_token=0)
    pipe = pipe_of(cfg)
    shares = sum(pipe.compute(logits[s], targets[s], mask=mask[s], step_counts=sc).loss for s in parts)
    torch.testing.assert_close(shares, whole, rtol=1e-12, atol=0)


@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize("extra", [{}, ENT, MR, {**ENT, **MR, "entropy_modifier_per_sample": True}])
@pytest.mark.parametrize("with_mask", [False, True])
def test_loss_raw_is_plain_cross_entropy_over_its_own_positions_in_every_normaliser(pad, extra, with_mask):
    """loss_raw keeps the unmodified basis (ignore_index and mask, padding kept): under global_tokens its
    step count is that basis's too, so the micro-batch shares sum to the plain CE of the whole step."""
    g = torch.Generator().manual_seed(pad + 7 * len(extra))
    logits = torch.randn(5, 6, 11, generator=g, dtype=F64)
    targets = torch.randint(0, 11, (5, 6), generator=g)
    targets[:, 4:] = pad  # trailing padding
    targets[1, 0] = -100
    mask = torch.rand(5, 6, generator=g) > 0.2 if with_mask else None
    keep = (targets != -100) if mask is None else (targets != -100) & mask
    ref = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    cfg = dict(**SMO, target_smoothing_padding_token=pad, **extra)
    parts = [slice(0, 2), slice(2, 3), slice(3, 5)]

    def m(s):
        return None if mask is None else mask[s]

    sc = make_step_counts([targets[s] for s in parts], masks=[m(s) for s in parts], padding_token=pad)
    pipe = pipe_of(cfg)
    shares = sum(pipe.compute(logits[s], targets[s], mask=m(s), step_counts=sc).loss_raw for s in parts)
    torch.testing.assert_close(shares, ref, rtol=1e-12, atol=0)
    # "tokens": each call's loss_raw is the plain CE of that call
    for s in parts:
        k = keep[s]
        local = pipe.compute(logits[s], targets[s], mask=m(s)).loss_raw
        torch.testing.assert_close(local, torch.nn.functional.cross_entropy(logits[s][k], targets[s][k]),
                                   rtol=1e-12, atol=0)
    # and the modifier-free pipeline's loss over the same step is that same plain CE
    sc_plain = make_step_counts([targets[s] for s in parts], masks=[m(s) for s in parts])
    plain = sum(pipe_of().compute(logits[s], targets[s], mask=m(s), step_counts=sc_plain).loss for s in parts)
    torch.testing.assert_close(plain, ref, rtol=1e-12, atol=0)


def test_duplicate_names_and_metric_keys():
    logits, targets = mask_ratio_example()
    a, b, c = (CustomModifier({"enabled": True, "custom_param": 1.0}) for _ in range(3))
    pipe = LossModifierPipeline([a, b, c])
    assert [m.name for m in pipe.modifiers] == ["CustomModifier", "CustomModifier_2", "CustomModifier_3"]
    pipe.modify_loss(logits, targets, None)
    assert sorted(pipe.get_all_metrics()) == [f"loss_modifiers/CustomModifier{s}.custom_metric"
                                              for s in ("", "_2", "_3")]
    pipe.reset_all_metrics()
    assert pipe.get_all_metrics() == {}


def test_second_per_token_producer_is_an_error():
    class OtherProducer(CustomModifier):
        def per_token_loss(self, ctx):
            return ctx.stats.nll

    with pytest.raises(ConfigError, match="TargetSmoothingModifier.*OtherProducer"):
        LossModifierPipeline([TargetSmoothingModifier({"enabled": True}), OtherProducer({"enabled": True})])


def test_user_weights_hook_phase2_detached_unless_declared():
    logits, targets, _ = random_batch(F64, seed=11)

    class Tok(CustomModifier):
        def weights(self, ctx):
            return Weights(token=1.0 + ctx.stats.entropy)

    x = logits.clone().requires_grad_(True)
    pipe = LossModifierPipeline([Tok({"enabled": True})])
    loss = pipe.modify_loss(x, targets, None)
    loss.backward()
    ref_x = logits.clone().requires_grad_(True)
    valid = targets != -100
    logp = ref_x.log_softmax(-1)
    nll = -logp.gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
    u = (1.0 + -(logp.exp() * logp).sum(-1)).detach()
    ref = (torch.where(valid, nll, 0) * u).sum() / valid.sum()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-10, atol=1e-14)
    assert pipe.get_all_metrics() == {}


def test_temporarily_disabled_and_incoming_loss_warning():
    logits, targets = mask_ratio_example()
    pipe = pipe_of(MR)
    sentinel = torch.tensor(9.0, dtype=F64)
    with pipe.temporarily_disabled():
        assert pipe.modify_loss(logits, targets, sentinel) is sentinel
        assert pipe.describe() == "Enabled loss modifiers: none"
    with pytest.warns(UserWarning, match="add auxiliary terms"):
        pipe.modify_loss(logits, targets, sentinel)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.modify_loss(logits, targets, sentinel)  # warns once only
        plain = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        pipe_of(MR).modify_loss(logits, targets, plain)  # a matching loss never warns


def test_two_dim_logits_are_one_token_sequences():
    logits, targets, _ = random_batch(F64, seed=1)
    flat_l, flat_t = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    got = pipe_of(ENT, SMO, MR).compute(flat_l, flat_t).loss
    ref = pipe_of(ENT, SMO, MR).compute(flat_l[:, None], flat_t[:, None]).loss
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)


def test_compute_elementwise():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 4, generator=g, dtype=F64, requires_grad=True)
    mask = torch.rand(3, 2, 4, generator=g) > 0.3
    out = LossModifierPipeline().compute_elementwise(x, mask=mask)
    assert out.loss is out.loss_raw and not bool(out.bad)
    torch.testing.assert_close(out.loss, x[mask].mean(), rtol=1e-12, atol=0)

    class SnrLike(CustomModifier):
        def weights(self, ctx):
            return Weights(sample=ctx.extras["log_snr"].exp(), sequence_mean=True)

    log_snr = torch.tensor([0.0, 1.0, -1.0], dtype=F64)
    pipe = LossModifierPipeline([SnrLike({"enabled": True})])
    out = pipe.compute_elementwise(x, mask=mask, log_snr=log_snr)
    m = mask.reshape(3, -1)
    xs = x.reshape(3, -1)
    per = (xs * m).sum(-1) / m.sum(-1)
    torch.testing.assert_close(out.loss, (log_snr.exp() * per).mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(out.loss_raw, per.mean(), rtol=1e-12, atol=0)
    with pytest.raises(ConfigError, match="EntropyModifier"):
        LossModifierPipeline([EntropyModifier({"enabled": True})]).compute_elementwise(x)


def test_incoming_loss_check_uses_the_local_mean_under_global_tokens():
    logits, targets = mask_ratio_example()
    sc = make_step_counts([targets, targets])  # the step holds this micro-batch twice
    plain = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = pipe_of(SMO).modify_loss(logits, targets, plain, step_counts=sc)
    whole = pipe_of(SMO).modify_loss(logits, targets, None)
    torch.testing.assert_close(got, whole / 2, rtol=1e-12, atol=0)


@pytest.mark.parametrize("convention", ["torch", "fairseq"])
@pytest.mark.parametrize("ignore_index", [-100, 5])
def test_convention_and_ignore_index_reach_every_modifier(convention, ignore_index):
    logits, targets, mask = random_batch(F64, seed=13)
    targets = torch.where(targets == -100, ignore_index, targets)
    pipe = pipe_of(ENT, SMO, MR, target_smoothing_convention=convention, target_smoothing_special_tokens=[1, 2],
                   target_smoothing_factor=0.3, target_smoothing_padding_token=0)
    x = logits.clone().requires_grad_(True)
    loss = pipe.modify_loss(x, targets, None, mask=mask, ignore_index=ignore_index)
    loss.backward()
    ref_x = logits.clone().requires_grad_(True)
    ref = oracle.hand_loss(ref_x, targets, mask=mask, ignore_index=ignore_index,
                           smoothing={"factor": 0.3, "special": (1, 2), "pad": 0, "convention": convention},
                           entropy={"threshold": 0.5}, mask_ratio={})
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-12, atol=1e-15)
