"""``losskit.combined.CombinedLoss``: the total is ``Σ w_i·L_i`` of its parts (values and gradients), and
``from_config`` rejects every malformed entry with a ``ConfigError`` naming it.

The seed-003 YAML example and its worked numbers live in ``tests/temporal/test_combined.py``; the parts here are
checked against modules built directly and against ``F.cross_entropy``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from losskit.combined import CombinedLoss, CombinedLossOutput
from losskit.contract import ConfigError
from losskit.losses import CrossEntropyLoss, EnergyLoss

F64 = torch.float64


def model():
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 5)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
    return net


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 3, generator=g, dtype=F64)
    target = torch.randint(0, 5, (2, 4), generator=g)
    target[0, 3] = -1
    target[1, 0] = -100
    return x, target


CONFIG = [
    {"name": "cross_entropy_loss", "weight": 0.7},
    {"name": "label_smoothed_cross_entropy", "weight": 0.25, "kwargs": {"epsilon": 0.2, "ignore_index": -1}},
    {"name": "energy_loss", "weight": 0.05, "kwargs": {"p": 2}},
    {"name": "cross_entropy_loss", "weight": 1.5, "label": "ce_sum", "kwargs": {"reduction": "sum"}},
]


def run(criterion, net, x, target):
    with criterion.recording(net):
        logits = net(x)
    return logits, criterion(logits, target, return_components=True)


def test_total_is_the_weighted_sum_of_the_parts_and_so_is_its_gradient():
    x, target = inputs(2)
    target = torch.where(target == -100, -1, target)  # one ignore value for every part
    net = model()
    criterion = CombinedLoss.from_config(CONFIG)
    assert criterion.labels == ("cross_entropy_loss", "label_smoothed_cross_entropy", "energy_loss", "ce_sum")
    weights = criterion.weights
    assert weights == {"cross_entropy_loss": 0.7, "label_smoothed_cross_entropy": 0.25, "energy_loss": 0.05,
                       "ce_sum": 1.5}
    logits, out = run(criterion, net, x, target)
    assert isinstance(out, CombinedLossOutput) and list(out.components) == list(criterion.labels)
    flat_l, flat_t = logits.reshape(-1, 5), target.reshape(-1)
    plain = {
        "cross_entropy_loss": F.cross_entropy(flat_l, flat_t, ignore_index=-1),
        "label_smoothed_cross_entropy": F.cross_entropy(flat_l, flat_t, ignore_index=-1, label_smoothing=0.2),
        "ce_sum": F.cross_entropy(flat_l, flat_t, ignore_index=-1, reduction="sum"),
    }
    for label, ref in plain.items():
        torch.testing.assert_close(out.components[label], ref, rtol=1e-12, atol=0, msg=label)
    energy = EnergyLoss(p=2)
    with energy.recording(net):
        net(x)
    torch.testing.assert_close(out.components["energy_loss"], energy(), rtol=1e-12, atol=0)
    torch.testing.assert_close(out.loss, sum(weights[k] * v for k, v in out.components.items()), rtol=1e-15, atol=0)
    # the gradient of the total is the weighted sum of the parts' gradients (each part from its own forward: the
    # eager cross-entropy releases its gradient at the first backward)
    params = list(net.parameters())
    g_total = torch.autograd.grad(out.loss, params)
    want = [torch.zeros_like(p) for p in params]
    for label in criterion.labels:
        _, part = run(criterion, net, x, target)
        for w, g in zip(want, torch.autograd.grad(part.components[label], params), strict=True):
            w.add_(weights[label] * g)
    for got, ref in zip(g_total, want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    # the plain tensor return is the same total; metrics are detached copies
    with criterion.recording(net):
        again = criterion(net(x), target)
    torch.testing.assert_close(again.detach(), out.loss.detach(), rtol=0, atol=0)
    metrics = out.metrics()
    assert metrics["loss/total"].item() == out.loss.item() and not metrics["loss/total"].requires_grad
    for label, value in out.components.items():
        assert metrics[f"loss/{label}"].item() == value.item()
        assert metrics[f"loss_weighted/{label}"].item() == pytest.approx(weights[label] * value.item(), rel=1e-15)


def test_mask_and_count_reach_the_temporal_cross_entropy():
    x, target = inputs(3)
    target = torch.where(target == -100, -1, target)
    logits = model()(x)
    mask = torch.tensor([[True, False, True, True], [True, True, False, True]])
    criterion = CombinedLoss.from_config([{"name": "cross_entropy_loss", "weight": 2.0}])
    keep = ((target != -1) & mask).reshape(-1)
    ref = F.cross_entropy(logits.reshape(-1, 5)[keep], target.reshape(-1)[keep])
    torch.testing.assert_close(criterion(logits, target, mask=mask), 2.0 * ref, rtol=1e-12, atol=0)
    summed = F.cross_entropy(logits.reshape(-1, 5)[keep], target.reshape(-1)[keep], reduction="sum")
    got = criterion(logits, target, mask=mask, num_valid_timesteps=10)
    torch.testing.assert_close(got, 2.0 * summed / 10, rtol=1e-12, atol=0)


def test_mask_with_a_label_smoothed_criterion_is_honoured_or_rejected_by_name():
    x, target = inputs(4)
    logits = model()(x)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[0, 0] = False
    mask[0, 3] = False  # the -1 target (this criterion ignores -100 only)
    criterion = CombinedLoss.from_config([{"name": "label_smoothed_cross_entropy", "kwargs": {"epsilon": 0.1}}])
    try:
        got = criterion(logits, target, mask=mask)
    except ConfigError as err:
        assert "label_smoothed_cross_entropy" in str(err) and "mask" in str(err)
    else:
        keep = ((target != -100) & mask).reshape(-1)
        ref = F.cross_entropy(logits.reshape(-1, 5)[keep], target.reshape(-1)[keep], label_smoothing=0.1)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)


def test_criteria_without_tensors_need_none_and_tensor_criteria_need_them():
    net = model()
    energy_only = CombinedLoss.from_config([{"name": "energy_loss", "weight": 3.0}])
    with energy_only.recording(net):
        net(inputs()[0])
    assert energy_only().requires_grad
    ce = CombinedLoss.from_config([{"name": "cross_entropy_loss"}])
    with pytest.raises(ConfigError, match="criterion 'cross_entropy_loss' needs logits and target, got None"):
        ce()


def test_criterion_lookup_set_input_checks_and_repr():
    criterion = CombinedLoss.from_config(CONFIG)
    assert isinstance(criterion.criterion("ce_sum"), CrossEntropyLoss)
    assert criterion.criterion("ce_sum").reduction == "sum"
    with pytest.raises(KeyError, match="no enabled criterion labelled 'focal'"):
        criterion.criterion("focal")
    criterion.set_input_checks("deferred")
    assert [getattr(m, "input_checks", None) for m in criterion.criteria] == ["deferred", None, None, "deferred"]
    with pytest.raises(ConfigError, match="input_checks must be 'immediate' or 'deferred', got 'later'"):
        criterion.set_input_checks("later")
    assert "cross_entropy_loss: 0.7, label_smoothed_cross_entropy: 0.25, energy_loss: 0.05, ce_sum: 1.5" in repr(
        criterion)


def test_set_input_checks_rejects_a_bad_mode_whatever_the_criteria():
    with pytest.raises(ConfigError, match="input_checks"):
        CombinedLoss.from_config([{"name": "energy_loss"}]).set_input_checks("later")


@pytest.mark.parametrize(
    ("cfg", "needle"),
    [
        ([3], r"criterion\[0\] must be a mapping with keys \('name', 'weight', 'kwargs', 'label'\), got 3"),
        ([{"name": 7}], r"criterion\[0\]\.name must be a non-empty string, got 7"),
        ([{"name": ""}], r"criterion\[0\]\.name must be a non-empty string, got ''"),
        ([{"name": "cross_entropy_loss", "label": ""}], r"criterion\[0\]\.label must be a non-empty string"),
        ([{"name": "cross_entropy_loss", "label": 3}], r"criterion\[0\]\.label must be a non-empty string, got 3"),
        ([{"name": "cross_entropy_loss", "kwargs": [1]}], r"criterion\[0\]\.kwargs must be a mapping, got \[1\]"),
        ([{"name": "cross_entropy_loss", "weight": float("inf")}], r"criterion\[0\]\.weight must be a finite real"),
        ([{"name": "cross_entropy_loss", "weight": None}], r"criterion\[0\]\.weight must be a finite real"),
        ([{"name": "cross_entropy_loss", "kwargs": {"reduction": "avg"}}],
         r"criterion\[0\] \(cross_entropy_loss\): bad kwargs \{'reduction': 'avg'\}: reduction must be one of"),
        ([{"name": "label_smoothed_cross_entropy", "kwargs": {"epsilon": 1.5}}],
         r"criterion\[0\] \(label_smoothed_cross_entropy\): bad kwargs .*epsilon must be in"),
        ([{"name": "cross_entropy_loss", "kwargs": {"reduction": "none"}}],
         r"criterion\[0\] \(cross_entropy_loss\): reduction='none' gives no scalar to combine"),
        ([{"name": "cross_entropy_loss"}, {"name": "energy_loss", "label": "cross_entropy_loss"}],
         r"criterion\[1\] label 'cross_entropy_loss' is used twice; give one entry a distinct 'label'"),
        ({"criterion": "cross_entropy_loss"}, "criterion must be a list of entries, got str"),
        ({"losses": []}, r"criterion config must be a list or a mapping with key 'criterion', got keys \['losses'\]"),
        (None, "criterion must be a list of entries, got NoneType"),
        ([], "criterion must enable at least one loss with a weight > 0"),
        ([{"name": "cross_entropy_loss", "weight": 0}], "criterion must enable at least one loss"),
    ],
)
def test_from_config_errors_name_the_entry(cfg, needle):
    with pytest.raises(ConfigError, match=needle):
        CombinedLoss.from_config(cfg)


def test_one_loss_under_two_spellings_is_two_labels():
    """Labels default to the name as written, so two spellings of one registry entry are two criteria."""
    criterion = CombinedLoss.from_config([{"name": "cross_entropy_loss", "weight": 0.5}, {"name": "CrossEntropyLoss"}])
    assert criterion.labels == ("cross_entropy_loss", "CrossEntropyLoss")
    x, target = inputs(5)
    target = torch.where(target == -100, -1, target)
    logits = model()(x)
    ref = F.cross_entropy(logits.reshape(-1, 5), target.reshape(-1), ignore_index=-1)
    torch.testing.assert_close(criterion(logits, target), 1.5 * ref, rtol=1e-12, atol=0)


def test_direct_construction_needs_a_criterion():
    with pytest.raises(ConfigError, match="at least one"):
        CombinedLoss([])


def test_an_extra_a_criterion_cannot_use_is_an_error_naming_both():
    x, target = inputs(4)
    target[0, 3] = 2
    criterion = CombinedLoss.from_config([{"name": "label_smoothed_cross_entropy", "kwargs": {"epsilon": 0.1}}])
    with pytest.raises(ConfigError, match="criterion 'label_smoothed_cross_entropy'.*does not take num_valid_timesteps"):
        criterion(model()(x), target, num_valid_timesteps=3)
