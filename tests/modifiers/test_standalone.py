"""A built-in modifier used on its own equals a pipeline holding only it (spec/modifiers.md §3.1, acceptance 21)."""

from __future__ import annotations

import pytest
import torch

from losskit.modifiers import (
    EntropyModifier,
    MaskRatioWeightModifier,
    SNRWeightModifier,
    TargetSmoothingModifier,
)
from losskit.modifiers.standalone import standalone_pipeline

from .conftest import COMPOSE_TARGETS, PARTS, SEED_TARGETS, mask_ratio_example, pipe_of, seed_logits


@pytest.mark.parametrize("which", ["E", "S", "M"])
@pytest.mark.parametrize("case", ["seed", "compose", "mask_ratio"])
def test_standalone_equals_pipeline(which, case):
    if case == "mask_ratio":
        logits, targets = mask_ratio_example()
    else:
        logits, targets = seed_logits(), SEED_TARGETS if case == "seed" else COMPOSE_TARGETS
    short = {"E": (EntropyModifier, {"enabled": True, "threshold": 0.5}),
             "S": (TargetSmoothingModifier, {"enabled": True, "factor": 0.1}),
             "M": (MaskRatioWeightModifier, {"enabled": True})}[which]
    mod = short[0](short[1])
    alone = mod.modify_loss(logits, targets, None)
    alone_metrics = mod.get_metrics()
    via = pipe_of(PARTS[which]).modify_loss(logits, targets, None)
    assert alone.item() == via.item()
    assert alone_metrics and all(v.dim() == 0 for v in alone_metrics.values())
    disabled = short[0]({})
    sentinel = torch.tensor(1.0)
    assert disabled.modify_loss(logits, targets, sentinel) is sentinel


def test_standalone_pipeline_is_built_once_and_keeps_the_name():
    mod = EntropyModifier({"enabled": True, "name": "ent"})
    pipe = standalone_pipeline(mod)
    assert standalone_pipeline(mod) is pipe
    assert [m.name for m in pipe] == ["ent"]
    logits = torch.randn(2, 3, 5, dtype=torch.float64)
    targets = torch.randint(0, 5, (2, 3))
    assert torch.equal(mod.modify_loss(logits, targets, None), pipe.modify_loss(logits, targets, None))
    snr = SNRWeightModifier({"loss_weighting": "min_snr"})
    x = torch.randn(4, 3, dtype=torch.float64)
    snr.modify_loss(x, torch.zeros_like(x), log_snr=torch.linspace(-2, 2, 4, dtype=torch.float64))
    assert [m.name for m in standalone_pipeline(snr)] == ["SNRWeightModifier"]
