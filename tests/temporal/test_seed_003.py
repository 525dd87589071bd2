"""Seed 003's examples run as written (imports adapted from ``dynvision.losses`` to ``losskit.losses``)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import yaml
from torch import nn

from losskit.combined import CombinedLoss
from losskit.functional.temporal import PresentationSchedule, reaction_steps


class TinyTemporalNet(nn.Module):
    """A model in the seed's shape convention: (B, T, C, H, W) in, (B, T, n_classes) out."""

    def __init__(self, n_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, n_classes)

    def forward(self, x):
        return torch.stack([self.fc(torch.tanh(self.conv(x[:, t])).flatten(1)) for t in range(x.shape[1])], 1)


def test_cross_entropy_example():
    from losskit.losses import CrossEntropyLoss

    # Create loss function
    criterion = CrossEntropyLoss(reduction="mean", ignore_index=-1)

    outputs = torch.randn(4 * 5, 10)
    targets = torch.randint(0, 10, (4 * 5,))
    targets[::3] = -1
    # Compute loss (outputs: [batch*timesteps, classes], targets: [batch*timesteps])
    loss = criterion(outputs, targets)
    # Only timesteps where targets != -1 contribute to the loss
    keep = targets != -1
    torch.testing.assert_close(loss, nn.functional.cross_entropy(outputs[keep], targets[keep]))


def test_energy_loss_example():
    from losskit.losses import EnergyLoss

    model = TinyTemporalNet()
    # Create energy loss
    energy_loss = EnergyLoss(reduction="mean", p=1)  # L1 norm

    # Register hooks on model layers
    energy_loss.register_hooks(model)

    # During training, energy accumulates automatically via hooks
    model(torch.rand(2, 3, 1, 8, 8))
    # Compute loss (outputs and targets are ignored for EnergyLoss)
    loss = energy_loss(outputs=None, targets=None)
    # Returns average absolute activity per unit per timestep per module
    assert loss.ndim == 0 and loss.item() > 0
    energy_loss.remove_hooks()


def test_basic_training_setup_and_monitoring():
    from losskit.losses import CrossEntropyLoss, EnergyLoss

    torch.manual_seed(0)
    model = TinyTemporalNet()
    n_classes = 10
    inputs = torch.rand(3, 4, 1, 8, 8)
    targets = torch.randint(0, n_classes, (3, 4))
    targets[:, 0] = -1

    # Classification loss
    ce_loss = CrossEntropyLoss(reduction="mean", ignore_index=-1)

    # Energy regularization
    energy_loss = EnergyLoss(reduction="mean", p=1)
    energy_loss.register_hooks(model)

    # In training loop
    def training_step(batch):
        inputs, targets = batch
        outputs = model(inputs)

        # Flatten temporal dimension
        outputs_flat = outputs.view(-1, n_classes)
        targets_flat = targets.view(-1)

        # Compute losses
        ce = ce_loss(outputs_flat, targets_flat)
        energy = energy_loss(None, None)

        # Combine
        loss = ce + 0.05 * energy
        return loss, ce, energy

    total_loss, ce, energy = training_step((inputs, targets))
    total_loss.backward()
    assert all(p.grad is not None for p in model.parameters())

    # Monitoring Individual Losses (host reads, outside the step)
    logged = {"loss/CrossEntropyLoss": ce.item(), "loss/EnergyLoss": energy.item(), "train_loss": total_loss.item()}
    assert logged["train_loss"] == pytest.approx(logged["loss/CrossEntropyLoss"] + 0.05 * logged["loss/EnergyLoss"])

    # Manually combining losses
    total_manual = 1.0 * ce + 0.05 * energy
    assert torch.equal(total_manual, total_loss)

    # Explicit cleanup (automatic on deletion)
    energy_loss.remove_hooks()
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_yaml_configuration_example():
    config = yaml.safe_load(
        """
# In config file
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
    )
    criterion = CombinedLoss.from_config(config)
    model = TinyTemporalNet()
    targets = torch.randint(0, 10, (2, 3))
    with criterion.recording(model):
        outputs = model(torch.rand(2, 3, 1, 8, 8))
    out = criterion(outputs, targets, return_components=True)
    expected = 1.0 * out.components["cross_entropy_loss"] + 0.05 * out.components["energy_loss"]
    assert torch.equal(out.loss, expected)


def test_reaction_time_example():
    # Configuration
    n_timesteps = 10
    dt = 2  # ms per timestep
    loss_reaction_time = 6  # ms
    pattern = "1000111000"  # Two stimulus chunks

    # - reaction_steps = ceil(6/2) = 3
    assert reaction_steps(loss_reaction_time, dt) == math.ceil(6 / 2) == 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        schedule = PresentationSchedule.build(pattern, n_timesteps, dt=dt, loss_reaction_time=loss_reaction_time)
    # - mask [0,1,2] and [4,5,6]; the second chunk (and, spec §5, the first too) is wholly masked: warning issued
    assert [t for t in range(n_timesteps) if schedule.reaction[t]] == [0, 1, 2, 4, 5, 6]
    assert any("t=4 (length 3)" in str(w.message) for w in caught)
    images, labels = torch.rand(2, 1, 8, 8), torch.tensor([3, 7])
    x, y = schedule.apply(images, labels)
    assert (y == -1).all()  # no label survives: CrossEntropyLoss will be 0 (second warning)
    assert torch.equal(x[:, 1:4], torch.zeros_like(x[:, 1:4]))


def test_presentation_patterns_from_the_seed():
    # "1111": all timesteps receive input; "1011": null input at timestep index 1; "10001000": blocks
    assert PresentationSchedule.build("1111", 4).present.all()
    assert PresentationSchedule.build("1011", 4).present.tolist() == [True, False, True, True]
    assert PresentationSchedule.build("10001000", 8).present.tolist() == [True, False, False, False] * 2
    x, y = PresentationSchedule.build("1011", 4).apply(torch.ones(1, 2), torch.tensor([5]))
    # Labels for null input timesteps are set to ignore_index (default -1)
    assert y.tolist() == [[5, -1, 5, 5]] and x[0, 1].tolist() == [0.0, 0.0]
