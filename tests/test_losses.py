"""``losskit.losses``: each ``nn.Module`` equals the plain-torch formula of its docstring, and its settings are
checked when it is built.

Oracles: ``F.cross_entropy`` (float64), a dense target distribution for the smoothing conventions, and the
energy formula over outputs recorded with plain ``register_forward_hook`` (no losskit code).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from losskit.contract import EmptyBatchWarning, LossInputError
from losskit.hooks import monitor_energy
from losskit.losses import ActivityLoss, BaseLoss, CrossEntropyLoss, EnergyLoss, LabelSmoothedCrossEntropy

F64 = torch.float64


def batch(shape=(3, 5), v=7, seed=0, dtype=F64, ignore=-100):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, v, generator=g, dtype=F64) * 2).to(dtype)
    target = torch.randint(0, v, shape, generator=g)
    target.view(-1)[::4] = ignore
    return logits, target


def dense_smoothed(logits, target, eps, *, exclude=(), convention="torch", ignore_index=-100):
    """Per-token −Σ_c q_c log p_c; excluded ids get no mass and keep a hard target; 0 where ignored."""
    v = logits.shape[-1]
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    y = torch.where(valid, target, 0)
    onehot = F.one_hot(y, v).to(logits.dtype)
    support = torch.ones(v, dtype=logits.dtype)
    support[list(exclude)] = 0.0
    if convention == "torch":
        q = (1 - eps) * onehot + eps * support / support.sum()
    else:
        a_t = support * (1 - onehot)
        q = (1 - eps) * onehot + eps * a_t / a_t.sum(-1, keepdim=True)
    hard = torch.isin(y, torch.tensor(list(exclude), dtype=torch.long))
    q = torch.where(hard[..., None], onehot, q)
    return torch.where(valid, -(q * logits.log_softmax(-1)).sum(-1), 0.0), valid


# ---- LabelSmoothedCrossEntropy --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(11,), (3, 5)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [-100, 0])
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.6])
def test_label_smoothed_ce_equals_torch(shape, reduction, ignore_index, eps):
    logits, target = batch(shape, ignore=ignore_index, seed=len(shape))
    x = logits.clone().requires_grad_(True)
    got = LabelSmoothedCrossEntropy(eps, ignore_index=ignore_index, reduction=reduction)(x, target)
    ref_x = logits.clone().requires_grad_(True)
    v = logits.shape[-1]
    ref = F.cross_entropy(ref_x.reshape(-1, v), target.reshape(-1), ignore_index=ignore_index, label_smoothing=eps,
                          reduction=reduction)
    if reduction == "none":
        ref = ref.reshape(shape)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    got.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("convention", ["torch", "fairseq"])
@pytest.mark.parametrize("exclude", [(), (2,), (0, 5, 6)])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_label_smoothed_ce_conventions_and_exclusions_equal_the_dense_formula(convention, exclude, dtype):
    logits, target = batch((4, 6), seed=3, dtype=dtype)
    if exclude:
        target[0, 1] = exclude[0]  # a hard target
    loss = LabelSmoothedCrossEntropy(0.3, smoothing_convention=convention, smoothing_exclude=exclude)
    per, valid = dense_smoothed(logits.double(), target, 0.3, exclude=exclude, convention=convention)
    tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == F64 else {"rtol": 2e-6, "atol": 1e-6}
    torch.testing.assert_close(loss(logits, target).double(), per.sum() / valid.sum(), **tol)
    none = LabelSmoothedCrossEntropy(0.3, reduction="none", smoothing_convention=convention,
                                     smoothing_exclude=exclude)(logits, target)
    assert none.shape == target.shape and none.dtype == (F64 if dtype == F64 else torch.float32)
    torch.testing.assert_close(none.double(), per, **tol)


def test_label_smoothed_ce_ignore_index_none_averages_over_every_token():
    logits, target = batch((2, 4), seed=4, ignore=3)
    got = LabelSmoothedCrossEntropy(0.2, ignore_index=None)(logits, target)
    ref = F.cross_entropy(logits.reshape(-1, 7), target.reshape(-1), label_smoothing=0.2)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)


def test_label_smoothed_ce_all_ignored_is_a_connected_zero():
    logits = torch.randn(2, 3, 5, dtype=F64, requires_grad=True)
    with pytest.warns(EmptyBatchWarning):
        loss = LabelSmoothedCrossEntropy(0.1)(logits, torch.full((2, 3), -100))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"epsilon": 1.0}, r"epsilon must be in \[0, 1\), got 1.0"),
        ({"epsilon": -0.01}, "epsilon must be in"),
        ({"epsilon": float("nan")}, "epsilon must be in"),
        ({"epsilon": True}, "epsilon must be in"),
        ({"reduction": "avg"}, "reduction must be one of 'none', 'sum', 'mean', got 'avg'"),
        ({"smoothing_convention": "hf"}, "smoothing_convention must be one of 'torch', 'fairseq', got 'hf'"),
    ],
)
def test_label_smoothed_ce_settings_are_checked_at_construction(kwargs, needle):
    with pytest.raises(LossInputError, match=needle):
        LabelSmoothedCrossEntropy(**kwargs)


@pytest.mark.parametrize("epsilon", ["0.1", "abc", None])
def test_label_smoothed_ce_epsilon_of_another_type_is_rejected_naming_it(epsilon):
    with pytest.raises(LossInputError, match="epsilon"):
        LabelSmoothedCrossEntropy(epsilon)


@pytest.mark.parametrize("exclude", [[1.7], [True], "01", 5])
def test_label_smoothed_ce_bad_smoothing_exclude_is_rejected_naming_it(exclude):
    with pytest.raises(LossInputError, match="smoothing_exclude"):
        LabelSmoothedCrossEntropy(0.1, smoothing_exclude=exclude)


@pytest.mark.parametrize("ignore_index", [1.5, True, "-100"])
def test_label_smoothed_ce_ignore_index_is_checked_at_construction(ignore_index):
    with pytest.raises(LossInputError, match="ignore_index"):
        LabelSmoothedCrossEntropy(0.1, ignore_index=ignore_index)


# ---- CrossEntropyLoss (seed 003) --------------------------------------------------------------------------------


@pytest.mark.parametrize("checks", ["immediate", "deferred"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_temporal_ce_equals_the_formula(checks, reduction, weighted, with_mask):
    logits, target = batch((3, 5), v=6, seed=7, ignore=-1)
    g = torch.Generator().manual_seed(1)
    weight = torch.rand(6, generator=g, dtype=F64) + 0.5 if weighted else None
    mask = torch.rand(3, 5, generator=g) > 0.3 if with_mask else None
    x = logits.clone().requires_grad_(True)
    got = CrossEntropyLoss(reduction=reduction, weight=weight, input_checks=checks)(x, target, mask=mask)
    ref_x = logits.clone().requires_grad_(True)
    valid = (target != -1) & (mask if with_mask else True)
    w = torch.ones(6, dtype=F64) if weight is None else weight
    per = F.cross_entropy(ref_x.reshape(-1, 6), target.clamp_min(0).reshape(-1), reduction="none").reshape(3, 5)
    per = torch.where(valid, w[target.clamp_min(0)] * per, 0.0)
    ref = {"none": per, "sum": per.sum(), "mean": per.sum() / valid.sum()}[reduction]
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    got.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-12, atol=1e-14)
    if checks == "deferred":
        flags = CrossEntropyLoss(reduction=reduction, input_checks="deferred")
        flags(logits, target, mask=mask)
        assert set(flags.last_flags) == {"bad", "empty"} and not bool(flags.last_flags["bad"])


@pytest.mark.parametrize("checks", ["immediate", "deferred"])
def test_temporal_ce_weights_normaliser_is_torchs_weighted_mean(checks):
    logits, target = batch((4, 3), v=5, seed=8, ignore=-1)
    weight = torch.tensor([0.2, 1.0, 3.0, 0.5, 2.0], dtype=F64)
    got = CrossEntropyLoss(weight=weight, normalize="weights", input_checks=checks)(logits, target)
    ref = F.cross_entropy(logits.reshape(-1, 5), target.reshape(-1), weight=weight, ignore_index=-1)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("checks", ["immediate", "deferred"])
@pytest.mark.parametrize("count", [5, torch.tensor(5)])
def test_temporal_ce_num_valid_timesteps_replaces_the_count(checks, count):
    logits, target = batch((2, 6), v=4, seed=9, ignore=-1)
    got = CrossEntropyLoss(input_checks=checks)(logits, target, num_valid_timesteps=count)
    ref = F.cross_entropy(logits.reshape(-1, 4), target.reshape(-1), ignore_index=-1, reduction="sum") / 5
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"reduction": "avg"}, LossInputError, "reduction must be one of"),
        ({"normalize": "global_tokens"}, LossInputError, "normalize must be one of 'tokens', 'weights'"),
        ({"input_checks": "later"}, LossInputError, "input_checks must be one of 'immediate', 'deferred'"),
        ({"ignore_index": 1.5}, LossInputError, "ignore_index must be an int, got 1.5"),
        ({"ignore_index": False}, LossInputError, "ignore_index must be an int, got False"),
        ({"weight": torch.ones(2, 2)}, LossInputError, r"weight must be a 1-D float tensor .* got torch.float32 \(2, 2\)"),
        ({"weight": torch.ones(3, dtype=torch.long)}, LossInputError, "weight must be a 1-D float tensor"),
    ],
)
def test_temporal_ce_settings_are_checked_at_construction(kwargs, error, needle):
    with pytest.raises(error, match=needle):
        CrossEntropyLoss(**kwargs)


def test_temporal_ce_weight_is_a_buffer_and_a_list_is_accepted():
    loss = CrossEntropyLoss(weight=[1.0, 2.0, 3.0])
    assert "weight" in dict(loss.named_buffers()) and loss.weight.dtype == torch.float32
    assert CrossEntropyLoss().weight is None


# ---- EnergyLoss / ActivityLoss (seed 003) -------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(3 * 4 * 4, 5)
        self.readout = nn.Linear(5, 2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        h = self.act(self.conv(x))
        return self.readout(self.fc(h.flatten(1)))


def recorded(model, names, steps):
    """Outputs of the named modules over ``steps`` forwards, recorded with plain torch hooks."""
    acts = {n: [] for n in names}
    handles = [dict(model.named_modules())[n].register_forward_hook(
        lambda m, i, o, n=n: acts[n].append(o)) for n in names]
    outs = [model(x) for x in steps]
    for h in handles:
        h.remove()
    return acts, outs


def plain_energy(acts, p, unit_norm):
    per_module = []
    for outputs in acts.values():
        terms = []
        for a in outputs:
            n = a[0].numel()
            d = n if unit_norm == "n_units" else n ** (1 / p)
            terms.append(a.flatten(1).abs().pow(p).sum(1).pow(1 / p) / d)
        per_module.append(sum(terms) / len(terms))
    return sum(per_module) / len(per_module)


@pytest.mark.parametrize("p", [1, 2, 3.5])
@pytest.mark.parametrize("unit_norm", ["n_units", "root"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_energy_loss_equals_the_formula(p, unit_norm, reduction):
    model = Net().double()
    g = torch.Generator().manual_seed(2)
    steps = [torch.randn(4, 2, 4, 4, generator=g, dtype=F64) for _ in range(3)]
    energy = EnergyLoss(reduction=reduction, p=p, unit_norm=unit_norm, exclude=["readout"])
    with energy.recording(model):
        for x in steps:
            model(x)
    got = energy()
    assert energy.hooked_modules == ("conv", "fc")
    acts, _ = recorded(model, ["conv", "fc"], steps)
    e = plain_energy(acts, p, unit_norm)
    ref = {"none": e, "sum": e.sum(), "mean": e.mean()}[reduction]
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-7)  # hooks accumulate in float32


def test_energy_loss_gradient_equals_the_formulas():
    model = Net().double()
    x = torch.randn(3, 2, 4, 4, dtype=F64)
    energy = EnergyLoss(p=2)
    with energy.recording(model):
        model(x)
    energy().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    acts, _ = recorded(model, ["conv", "fc", "readout"], [x])
    plain_energy(acts, 2, "n_units").mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n].double(), p.grad, rtol=1e-5, atol=1e-8, msg=n)


def test_activity_loss_records_only_marked_modules():
    model = Net().double()
    monitor_energy(model.act)  # any module type once marked
    x = torch.randn(2, 2, 4, 4, dtype=F64)
    activity = ActivityLoss(p=1)
    with activity.recording(model):
        model(x)
    assert activity.hooked_modules == ("act",)
    acts, _ = recorded(model, ["act"], [x])
    torch.testing.assert_close(activity().double(), plain_energy(acts, 1, "n_units").mean(), rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"p": 0.5}, ValueError, "p must be a finite number >= 1, got 0.5"),
        ({"p": float("inf")}, ValueError, "p must be a finite number >= 1"),
        ({"p": "2"}, ValueError, "p must be a finite number >= 1, got '2'"),
        ({"p": True}, ValueError, "p must be a finite number >= 1, got True"),
        ({"unit_norm": "sqrt"}, ValueError, "unit_norm must be one of"),
        ({"select": "all"}, ValueError, "select must be one of"),
        ({"reduction": "avg"}, LossInputError, "reduction must be one of"),
    ],
)
@pytest.mark.parametrize("cls", [EnergyLoss, ActivityLoss])
def test_energy_settings_are_checked_at_construction(cls, kwargs, error, needle):
    with pytest.raises(error, match=needle):
        cls(**kwargs)


# ---- BaseLoss -------------------------------------------------------------------------------------------------


def test_base_loss_reductions():
    x = torch.tensor([1.0, 0.0, 3.0], dtype=F64, requires_grad=True)
    assert BaseLoss("none").apply_reduction(x) is x
    assert BaseLoss("sum").apply_reduction(x).item() == 4.0
    assert BaseLoss("mean").apply_reduction(x).item() == pytest.approx(4 / 3)
    assert BaseLoss("mean").apply_reduction(x, 2).item() == 2.0
    assert BaseLoss("mean").apply_reduction(x, torch.tensor(4)).item() == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        zero = BaseLoss("mean").apply_reduction(x, torch.tensor(0))  # a device count: no sync, no warning
    assert zero.item() == 0.0 and zero.requires_grad
    with pytest.warns(EmptyBatchWarning):
        assert BaseLoss("mean").apply_reduction(x, 0).item() == 0.0
    with pytest.raises(LossInputError, match="reduction must be one of"):
        BaseLoss("avg")
