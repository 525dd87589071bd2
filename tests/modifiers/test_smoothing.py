"""TargetSmoothingModifier (seed 000, spec/modifiers.md §3.5, acceptance 15): −inf inside the support and special ids
out of range."""

from __future__ import annotations

import pytest
import torch

from losskit.contract import ConfigError, LossInputError

from .conftest import ENT, MR, SMO, _bad_case, pipe_of


def test_minus_inf_outside_target_depends_on_smoothing():
    logits, targets = _bad_case("ninf_other")
    for pipe in (pipe_of(ENT, MR), pipe_of(SMO, target_smoothing_factor=0.0)):
        out = pipe.compute(logits, targets)
        assert torch.isfinite(out.loss) and not bool(out.bad)
    with pytest.raises(LossInputError, match="target_smoothing_special_tokens"):
        pipe_of(SMO).compute(logits, targets)
    assert bool(pipe_of(SMO, input_checks="deferred").compute(logits, targets).bad)
    # excluding the column from the support makes it legal again
    out = pipe_of(SMO, target_smoothing_special_tokens=[0]).compute(logits, targets)
    assert torch.isfinite(out.loss)


def test_special_id_out_of_range_raises_at_first_call():
    pipe = pipe_of(SMO, target_smoothing_special_tokens=[0, 6])
    with pytest.raises(ConfigError, match=r"target_smoothing_special_tokens must hold ids in \[0, V=6\), got \[6\]"):
        pipe.compute(torch.randn(2, 3, 6), torch.zeros(2, 3, dtype=torch.long))
