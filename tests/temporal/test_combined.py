"""CombinedLoss from seed 003's YAML (spec/temporal.md §4; acceptance 4 and 9) and the registry entries."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import yaml
from torch import nn

from losskit import registry
from losskit.combined import CombinedLoss, CombinedLossOutput
from losskit.contract import ConfigError, EmptyBatchWarning
from losskit.losses import ActivityLoss, CrossEntropyLoss, EnergyLoss

SEED_YAML = """
criterion:
  - name: cross_entropy_loss
    weight: 1.0
    kwargs:
      reduction: mean
      ignore_index: -1
  - name: energy_loss
    weight: 0.05
    kwargs:
      reduction: mean
      p: 1
"""
TARGET = torch.tensor([[0, 1], [-1, 1]])


def hand_model() -> nn.Sequential:
    lin1, lin2 = nn.Linear(2, 3), nn.Linear(3, 2)
    with torch.no_grad():
        lin1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]))
        lin1.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
        lin2.weight.copy_(torch.tensor([[1.0, 1.0, 0.0], [0.0, -1.0, 2.0]]))
        lin2.bias.zero_()
    return nn.Sequential(lin1, nn.ReLU(), lin2)


def step(criterion, model, target=TARGET, **kwargs):
    with criterion.recording(model):
        logits = torch.stack([model(torch.tensor([[1.0, 2.0], [0.0, -1.0]])),
                              model(torch.tensor([[2.0, 0.0], [-1.0, 1.0]]))], dim=1)
    return logits, criterion(logits, target, **kwargs)


def test_registry_entries():
    assert registry.get("cross_entropy_loss").module is CrossEntropyLoss
    assert registry.get("energy_loss").module is EnergyLoss
    assert registry.get("activity_loss").module is ActivityLoss
    assert registry.get("CrossEntropyLoss") is registry.get("cross_entropy_loss")
    assert registry.get("crossentropyloss") is registry.get("cross_entropy_loss")
    assert registry.get("Energy-Loss") is registry.get("energy_loss")
    assert registry.get("cross_entropy_loss").required_inputs == ("logits", "target")


def test_seed_yaml_combination():
    criterion = CombinedLoss.from_config(yaml.safe_load(SEED_YAML))
    assert criterion.labels == ("cross_entropy_loss", "energy_loss")
    model = hand_model()
    logits, out = step(criterion, model, return_components=True)
    assert isinstance(out, CombinedLossOutput)
    ce = out.components["cross_entropy_loss"]
    energy = out.components["energy_loss"]
    per_step = CrossEntropyLoss(reduction="none")(logits, TARGET)
    torch.testing.assert_close(per_step[TARGET != -1], torch.tensor([0.006715, 0.018150, 2.126928]),
                               rtol=1e-5, atol=1e-6)
    assert ce.item() == pytest.approx(0.717264, rel=1e-6)
    assert energy.item() == pytest.approx(1.770833, rel=1e-6)
    assert out.loss.item() == pytest.approx(0.805806, rel=1e-6)
    assert torch.equal(out.loss, 1.0 * ce + 0.05 * energy)  # exactly, in config order
    metrics = out.metrics()
    assert set(metrics) == {"loss/cross_entropy_loss", "loss/energy_loss", "loss_weighted/cross_entropy_loss",
                            "loss_weighted/energy_loss", "loss/total"}
    assert metrics["loss/cross_entropy_loss"].item() == pytest.approx(0.717264, rel=1e-6)
    assert metrics["loss/energy_loss"].item() == pytest.approx(1.770833, rel=1e-6)
    assert metrics["loss_weighted/energy_loss"].item() == pytest.approx(0.088542, rel=1e-5)
    assert metrics["loss/total"].item() == pytest.approx(0.805806, rel=1e-6)
    assert not any(v.requires_grad for v in metrics.values())
    out.loss.backward()
    assert model[0].weight.grad is not None
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_plain_tensor_return_and_mapping_or_list():
    cfg = yaml.safe_load(SEED_YAML)
    a = CombinedLoss.from_config(cfg)
    b = CombinedLoss.from_config(cfg["criterion"])
    _, ta = step(a, hand_model())
    _, tb = step(b, hand_model())
    assert isinstance(ta, torch.Tensor) and torch.equal(ta, tb)


def test_zero_valid_through_combined():
    criterion = CombinedLoss.from_config(yaml.safe_load(SEED_YAML))
    model = hand_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, total = step(criterion, model, target=torch.full((2, 2), -1))
    assert [type(w.message) for w in caught] == [EmptyBatchWarning]
    assert total.item() == pytest.approx(0.05 * 85 / 48, rel=1e-6)
    assert total.item() == pytest.approx(0.088542, rel=1e-5)
    total.backward()
    assert model[2].bias.grad is not None


def test_energy_weight_zero_disables(caplog):
    cfg = yaml.safe_load(SEED_YAML)
    cfg["criterion"][1]["weight"] = 0
    with caplog.at_level(logging.INFO, logger="losskit.combined"):
        criterion = CombinedLoss.from_config(cfg)
    assert [r.getMessage() for r in caplog.records] == ["criterion[1] energy_loss has weight 0 and is disabled"]
    assert criterion.labels == ("cross_entropy_loss",)
    model = hand_model()
    with criterion.recording(model):
        assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    logits, out = step(criterion, model, return_components=True)
    assert torch.equal(out.loss, CrossEntropyLoss()(logits, TARGET))
    assert set(out.metrics()) == {"loss/cross_entropy_loss", "loss_weighted/cross_entropy_loss", "loss/total"}


def test_class_name_builds_the_same_criterion():
    cfg = yaml.safe_load(SEED_YAML)
    cfg["criterion"][0]["name"] = "CrossEntropyLoss"
    cfg["criterion"][1]["name"] = "EnergyLoss"
    criterion = CombinedLoss.from_config(cfg)
    assert isinstance(criterion.criteria[0], CrossEntropyLoss) and isinstance(criterion.criteria[1], EnergyLoss)
    _, total = step(criterion, hand_model())
    assert total.item() == pytest.approx(0.805806, rel=1e-6)


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"name": "focal"}, r"criterion\[1\]\.name='focal' is not a registered loss; valid: .*cross_entropy_loss"),
        ({"name": "energy_loss", "kwargs": {"reduction": "none"}}, "reduction='none'"),
        ({"name": "energy_loss", "weight": -0.1}, ">= 0"),
        ({"name": "energy_loss", "weight": True}, "finite real"),
        ({"name": "energy_loss", "weight": float("nan")}, "finite real"),
        ({"name": "energy_loss", "weight": "0.1"}, "finite real"),
        ({"name": "energy_loss", "kwargs": {"q": 2}}, r"criterion\[1\] \(energy_loss\): bad kwargs"),
        ({"name": "energy_loss", "kwargs": {"p": 0.5}}, r"criterion\[1\] \(energy_loss\): bad kwargs"),
        ({"name": "energy_loss", "scale": 2}, "unknown key"),
        ({"weight": 1.0}, "needs a 'name'"),
        ({"name": "cross_entropy_loss"}, "used twice"),
        ({"name": "cross_entropy"}, "not a registered loss"),  # functional-only entry, no module
    ],
)
def test_config_errors(entry, match):
    cfg = [{"name": "cross_entropy_loss", "weight": 1.0}, entry]
    with pytest.raises(ConfigError, match=match):
        CombinedLoss.from_config(cfg)


def test_labels_allow_one_loss_twice():
    cfg = [
        {"name": "cross_entropy_loss"},
        {"name": "energy_loss", "weight": 0.05, "label": "energy_l1"},
        {"name": "energy_loss", "weight": 0.01, "label": "energy_l2", "kwargs": {"p": 2}},
    ]
    criterion = CombinedLoss.from_config(cfg)
    _, out = step(criterion, hand_model(), return_components=True)
    assert out.components["energy_l1"].item() == pytest.approx(85 / 48, rel=1e-6)
    assert out.components["energy_l2"].item() == pytest.approx(1.367759, rel=1e-6)


def test_nothing_enabled_is_an_error():
    with pytest.raises(ConfigError, match="at least one"):
        CombinedLoss.from_config([{"name": "energy_loss", "weight": 0}])
    with pytest.raises(ConfigError, match="list"):
        CombinedLoss.from_config("cross_entropy_loss")
    with pytest.raises(ConfigError, match="criterion"):
        CombinedLoss.from_config({"loss": []})


def test_seed_mode_register_hooks_through_combined():
    criterion = CombinedLoss.from_config(yaml.safe_load(SEED_YAML))
    model = hand_model()
    criterion.register_hooks(model)
    logits = torch.stack([model(torch.tensor([[1.0, 2.0], [0.0, -1.0]])),
                          model(torch.tensor([[2.0, 0.0], [-1.0, 1.0]]))], dim=1)
    assert criterion(logits, TARGET).item() == pytest.approx(0.805806, rel=1e-6)
    criterion.remove_hooks()
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
