"""TargetSmoothingModifier (seed 000, spec/modifiers.md §3.5, acceptance 15): −inf inside the support, special ids
out of range, the closed form against the dense smoothed CE of ``oracle.py``, the support-size check, the metrics."""

from __future__ import annotations

import pytest
import torch

from losskit.contract import ConfigError, LossInputError
from losskit.modifiers import smoothed_token_loss

from . import oracle
from .conftest import ENT, F64, MR, SMO, _bad_case, pipe_of


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


# ---- the closed form and its settings --------------------------------------------------------------------------


def _plain_stats(logits, targets, special):
    """nll and the support gap from log_softmax (fp64, no losskit code)."""
    v = logits.shape[-1]
    y = targets.clamp_min(0)
    nll = -logits.log_softmax(-1).gather(-1, y[..., None])[..., 0]
    support = torch.ones(v, dtype=torch.bool)
    support[list(special)] = False
    zy = logits.gather(-1, y[..., None])
    gap = (logits[..., support] - zy).mean(-1)
    return nll, gap


@pytest.mark.parametrize("convention", ["torch", "fairseq"])
@pytest.mark.parametrize(("v", "special"), [(5, ()), (7, (0, 3)), (64, (1, 2, 63))])
@pytest.mark.parametrize("factor", [0.05, 0.3, 0.9])
def test_smoothed_token_loss_equals_the_dense_smoothed_cross_entropy(convention, v, special, factor):
    g = torch.Generator().manual_seed(v + len(special))
    logits = torch.randn(3, 6, v, generator=g, dtype=F64) * 3 + 40.0  # a common offset changes nothing
    targets = torch.randint(0, v, (3, 6), generator=g)
    if special:
        targets[0, :len(special)] = torch.tensor(special)  # hard rows keep the plain nll
    valid = torch.ones_like(targets, dtype=torch.bool)
    nll, gap = _plain_stats(logits, targets, special)
    smooth = ~torch.isin(targets, torch.tensor(special, dtype=torch.long))
    got = smoothed_token_loss(nll, gap, smooth, factor=factor, num_support=v - len(special), convention=convention)
    want = oracle.dense_smoothed(logits, targets, valid, factor, special, convention)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if special:
        assert torch.equal(got[0, :len(special)], nll[0, :len(special)])
    if not special and convention == "torch":
        ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), label_smoothing=factor,
                                                reduction="none")
        torch.testing.assert_close(got.flatten(), ref, rtol=1e-12, atol=1e-12)


def test_smoothed_token_loss_with_factor_zero_is_the_nll_itself():
    nll = torch.rand(4, dtype=F64)
    gap = torch.full((4,), float("-inf"), dtype=F64)  # never read
    assert smoothed_token_loss(nll, gap, torch.ones(4, dtype=torch.bool), factor=0.0, num_support=3) is nll


@pytest.mark.parametrize(("convention", "special", "k"), [("fairseq", [0, 1], 1), ("torch", [0, 1, 2], 0)])
def test_support_too_small_for_the_convention_raises_at_first_call(convention, special, k):
    need = 2 if convention == "fairseq" else 1
    pipe = pipe_of(SMO, target_smoothing_special_tokens=special, target_smoothing_convention=convention)
    with pytest.raises(ConfigError, match=rf"leaves K={k} smoothing classes of V=3; the '{convention}' convention "
                                          rf"needs K >= {need}"):
        pipe.compute(torch.randn(2, 2, 3, dtype=F64), torch.zeros(2, 2, dtype=torch.long))
    # without smoothing mass the same ids are fine
    out = pipe_of(SMO, target_smoothing_special_tokens=special, target_smoothing_convention=convention,
                  target_smoothing_factor=0.0).compute(torch.randn(2, 2, 3, dtype=F64),
                                                       torch.zeros(2, 2, dtype=torch.long))
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("exclude_padding", [True, False])
def test_metrics_equal_plain_torch(exclude_padding):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 5, 9, generator=g, dtype=F64)
    targets = torch.randint(1, 9, (3, 5), generator=g)
    targets[0, 3:] = 0  # padding token 0
    targets[2, 0] = -100
    pipe = pipe_of(SMO, target_smoothing_factor=0.2, target_smoothing_padding_token=0,
                   target_smoothing_exclude_padding=exclude_padding)
    out = pipe.compute(logits, targets)
    keep = (targets != -100) & ((targets != 0) if exclude_padding else True)
    flat_l, flat_t = logits[keep], targets[keep]
    plain = torch.nn.functional.cross_entropy(flat_l, flat_t)
    smoothed = torch.nn.functional.cross_entropy(flat_l, flat_t, label_smoothing=0.2)
    m = {k.split(".")[-1]: v for k, v in pipe.get_all_metrics().items()}
    assert set(m) == {"original_loss", "smoothed_loss", "smoothing_factor", "valid_positions"}
    torch.testing.assert_close(m["original_loss"], plain, rtol=1e-12, atol=0)
    torch.testing.assert_close(m["smoothed_loss"], smoothed, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.loss, smoothed, rtol=1e-12, atol=0)
    assert m["smoothing_factor"].item() == 0.2 and m["valid_positions"].item() == int(keep.sum())
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())
