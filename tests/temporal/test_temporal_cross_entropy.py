"""Temporal CrossEntropyLoss (spec/temporal.md §2; acceptance 2-4), against plain torch in float64."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from losskit.contract import EmptyBatchWarning, LossInputError
from losskit.losses import CrossEntropyLoss

LOGITS = torch.tensor(
    [
        [[2, 1, 0, -1], [0, 0, 0, 0], [1, 3, -2, 0.5]],
        [[-1, 0, 1, 2], [0.5, 0.5, -0.5, 1.5], [3, 0, 0, 0]],
    ]
)
TARGET = torch.tensor([[0, -1, 1], [3, 2, -1]])
CLASS_W = torch.tensor([1.0, 2.0, 0.5, 1.0])


def loss_of(logits, target, **kwargs):
    call = {k: kwargs.pop(k) for k in ("mask", "num_valid_timesteps") if k in kwargs}
    return CrossEntropyLoss(**kwargs)(logits, target, **call)


@pytest.mark.parametrize("checks", ["immediate", "deferred"])
def test_normalisation_example(checks):
    none = loss_of(LOGITS, TARGET, reduction="none", input_checks=checks)
    expected = torch.tensor([[0.440190, 0.0, 0.202253], [0.440190, 2.626523, 0.0]])
    torch.testing.assert_close(none, expected, rtol=1e-6, atol=1e-6)
    assert none[0, 1].item() == 0.0 and none[1, 2].item() == 0.0
    assert loss_of(LOGITS, TARGET, reduction="sum", input_checks=checks).item() == pytest.approx(3.709156, rel=1e-6)
    mean = loss_of(LOGITS, TARGET, input_checks=checks)
    assert mean.item() == pytest.approx(0.927289, rel=1e-6)
    assert mean.item() != pytest.approx(3.709156 / 6, rel=1e-3)  # never divided by all 6 steps
    torch.testing.assert_close(mean, F.cross_entropy(LOGITS.reshape(-1, 4), TARGET.reshape(-1), ignore_index=-1))
    flat = loss_of(LOGITS.reshape(6, 4), TARGET.reshape(6), reduction="none", input_checks=checks)
    assert flat.shape == (6,)
    torch.testing.assert_close(flat, expected.reshape(6), rtol=1e-6, atol=1e-6)
    assert loss_of(LOGITS.reshape(6, 4), TARGET.reshape(6), input_checks=checks).item() == pytest.approx(
        mean.item(), rel=1e-7
    )


@pytest.mark.parametrize("checks", ["immediate", "deferred"])
def test_class_weights(checks):
    tokens = loss_of(LOGITS, TARGET, weight=CLASS_W, input_checks=checks)
    weights = loss_of(LOGITS, TARGET, weight=CLASS_W, normalize="weights", input_checks=checks)
    assert tokens.item() == pytest.approx(0.649537, rel=1e-6)
    assert weights.item() == pytest.approx(0.577366, rel=1e-6)
    torch.testing.assert_close(
        weights, F.cross_entropy(LOGITS.reshape(-1, 4), TARGET.reshape(-1), weight=CLASS_W, ignore_index=-1)
    )
    assert loss_of(LOGITS, TARGET, weight=CLASS_W, reduction="sum", input_checks=checks).item() == pytest.approx(
        2.598148, rel=1e-6
    )


@pytest.mark.parametrize("checks", ["immediate", "deferred"])
def test_zero_valid_is_graph_connected_zero(checks):
    logits = LOGITS.clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = loss_of(logits, torch.full_like(TARGET, -1), input_checks=checks)
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    if checks == "immediate":
        assert [type(w.message) for w in caught] == [EmptyBatchWarning]
    assert torch.isnan(F.cross_entropy(LOGITS.reshape(-1, 4), torch.full((6,), -1), ignore_index=-1))


def test_deferred_flags_report_empty_and_bad_without_raising():
    ce = CrossEntropyLoss(input_checks="deferred")
    ce(LOGITS, torch.full_like(TARGET, -1))
    assert bool(ce.last_flags["empty"]) and not bool(ce.last_flags["bad"])
    ce(LOGITS, TARGET)
    assert not bool(ce.last_flags["empty"]) and not bool(ce.last_flags["bad"])
    ce(LOGITS, torch.tensor([[0, -1, 7], [3, 2, -1]]))
    assert bool(ce.last_flags["bad"])


def test_out_of_range_target_raises():
    with pytest.raises(LossInputError, match="target"):
        loss_of(LOGITS, torch.tensor([[0, -1, 4], [3, 2, -1]]))
    with pytest.raises(LossInputError, match="target"):
        loss_of(LOGITS, torch.tensor([[0, -100, 1], [3, 2, -1]]))  # -100 is not the ignore_index here


def test_bad_arguments():
    with pytest.raises(ValueError, match="reduction"):
        CrossEntropyLoss(reduction="avg")
    with pytest.raises(ValueError, match="normalize"):
        CrossEntropyLoss(normalize="global_tokens")
    with pytest.raises(ValueError, match="input_checks"):
        CrossEntropyLoss(input_checks="later")
    with pytest.raises(LossInputError, match="weight"):
        CrossEntropyLoss(weight=torch.ones(2, 2))
    with pytest.raises(LossInputError, match="V=4"):
        CrossEntropyLoss(weight=torch.ones(5))(LOGITS, TARGET)
    with pytest.raises(LossInputError, match="leading shape"):
        CrossEntropyLoss()(LOGITS, TARGET[:, :2])


@pytest.mark.parametrize("checks", ["immediate", "deferred"])
def test_num_valid_timesteps_override(checks):
    total = loss_of(LOGITS, TARGET, reduction="sum", input_checks=checks)
    for count in (10, torch.tensor(10)):
        out = loss_of(LOGITS, TARGET, num_valid_timesteps=count, input_checks=checks)
        assert out.item() == pytest.approx(total.item() / 10, rel=1e-6)
    logits = LOGITS.clone().requires_grad_(True)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        zero = loss_of(logits, TARGET, num_valid_timesteps=torch.tensor(0), input_checks=checks)
    zero.backward()
    assert zero.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_micro_batches_with_global_count_sum_to_whole_batch():
    whole = loss_of(LOGITS, TARGET)
    n = int((TARGET != -1).sum())
    parts = [loss_of(LOGITS[i : i + 1], TARGET[i : i + 1], num_valid_timesteps=n) for i in range(2)]
    torch.testing.assert_close(parts[0] + parts[1], whole)


@pytest.mark.parametrize("checks", ["immediate", "deferred"])
@pytest.mark.parametrize(("shape", "classes"), [((3, 7), 5), ((1, 1), 2), ((13,), 11), ((2, 5), 10)])
def test_against_torch_float64(checks, shape, classes):
    gen = torch.Generator().manual_seed(sum(shape) + classes)
    logits = (torch.randn(*shape, classes, generator=gen, dtype=torch.float64) * 4).requires_grad_(True)
    target = torch.randint(0, classes, shape, generator=gen)
    target = torch.where(torch.rand(shape, generator=gen) < 0.3, torch.full_like(target, -1), target)
    mask = torch.rand(shape, generator=gen) < 0.8
    weight = torch.rand(classes, generator=gen, dtype=torch.float64) + 0.5
    for kwargs in ({}, {"weight": weight}, {"weight": weight, "normalize": "weights"}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EmptyBatchWarning)
            got = loss_of(logits, target, mask=mask, input_checks=checks, **kwargs)
        valid = (target != -1) & mask
        w = kwargs.get("weight", torch.ones(classes, dtype=torch.float64))
        per = F.cross_entropy(
            logits.reshape(-1, classes), target.clamp_min(0).reshape(-1), reduction="none"
        ) * w[target.clamp_min(0).reshape(-1)]
        per = torch.where(valid.reshape(-1), per, torch.zeros_like(per))
        if kwargs.get("normalize") == "weights":
            denominator = torch.where(valid.reshape(-1), w[target.clamp_min(0).reshape(-1)], 0).sum()
        else:
            denominator = valid.sum()
        ref = per.sum() / denominator.clamp_min(1)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        g, = torch.autograd.grad(got, logits)
        r, = torch.autograd.grad(ref, logits)
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_extreme_logits_are_finite():
    logits = torch.tensor([[[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]]], requires_grad=True)
    target = torch.tensor([[1, 1]])
    out = CrossEntropyLoss()(logits, target)
    out.backward()
    assert out.item() == pytest.approx(1e4, rel=1e-6)
    assert torch.isfinite(logits.grad).all()


def test_seed_usage_flattened():
    """The seed's training-step shape: outputs.view(-1, n_classes), targets.view(-1)."""
    criterion = CrossEntropyLoss(reduction="mean", ignore_index=-1)
    outputs, targets = LOGITS, TARGET
    loss = criterion(outputs.view(-1, 4), targets.view(-1))
    assert loss.item() == pytest.approx(0.927289, rel=1e-6)
