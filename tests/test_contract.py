"""``losskit.contract``: the input checks (messages name the argument, the expected and the actual value, and the
position of a bad value), the validity mask, and the result types."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from losskit.contract import (
    ConfigError,
    EmptyBatchWarning,
    LossFnOutput,
    LossInputError,
    StepCounts,
    TokenStats,
    check_choice,
    check_finite_logits,
    check_ignore_index,
    check_logits_target,
    check_target_range,
    explain_bad_rows,
    validity_mask,
)

from .kernels.test_nosync import SyncGuard

F64 = torch.float64


def test_error_types():
    assert issubclass(LossInputError, ValueError) and issubclass(ConfigError, ValueError)
    assert issubclass(EmptyBatchWarning, UserWarning)


# ---- check_logits_target ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("lead", [(4,), (2, 3)])
@pytest.mark.parametrize("ldtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tdtype", [torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8])
def test_check_logits_target_accepts_every_documented_input(lead, ldtype, tdtype):
    logits = torch.zeros(*lead, 2, dtype=ldtype)
    target = torch.zeros(lead, dtype=tdtype)
    with SyncGuard():  # shape and dtype checks never read values
        check_logits_target(logits, target, mask=torch.ones(lead, dtype=torch.bool),
                            token_weight=torch.ones(lead, dtype=ldtype))
        check_logits_target(torch.zeros(*lead, 4, dtype=ldtype)[..., ::2], target)  # any strides


L, T = torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long)


@pytest.mark.parametrize(
    ("logits", "target", "kwargs", "message"),
    [
        ([[0.0]], T, {}, "logits must be a torch.Tensor, got list"),
        (L, [[0]], {}, "target must be a torch.Tensor, got list"),
        (torch.zeros(5), T, {}, r"logits must have shape (N, V) or (B, T, V), got (5,) (1 dims)"),
        (torch.zeros(1, 2, 3, 5), T, {}, "logits must have shape (N, V) or (B, T, V), got (1, 2, 3, 5) (4 dims)"),
        (L.long(), T, {}, "logits must be a floating-point tensor, got dtype torch.int64"),
        (torch.zeros(2, 3, 1), T, {}, "logits must have at least 2 classes (V >= 2), got V=1"),
        (L, T[:, :2], {}, "target must have the leading shape of logits (2, 3), got (2, 2)"),
        (L, T.reshape(-1), {}, "target must have the leading shape of logits (2, 3), got (6,)"),
        (L, T.float(), {}, "target must be an integer tensor (int64), got dtype torch.float32"),
        (L, T.bool(), {}, "target must be an integer tensor (int64), got dtype torch.bool"),
        (L, T.to("meta"), {}, "target must be on the device of logits (cpu), got meta"),
        (L, T, {"mask": torch.ones(2, 3)}, "mask must be a bool tensor, got torch.float32"),
        (L, T, {"mask": [[True] * 3] * 2}, "mask must be a bool tensor, got list"),
        (L, T, {"mask": torch.ones(3, 2, dtype=torch.bool)},
         "mask must have the leading shape of logits (2, 3), got (3, 2)"),
        (L, T, {"token_weight": torch.ones(2, 3, dtype=torch.long)},
         "token_weight must be a floating-point tensor, got torch.int64"),
        (L, T, {"token_weight": 1.0}, "token_weight must be a floating-point tensor, got float"),
        (L, T, {"token_weight": torch.ones(2, 3, 1)},
         "token_weight must have the leading shape of logits (2, 3), got (2, 3, 1)"),
    ],
)
def test_check_logits_target_messages(logits, target, kwargs, message):
    with pytest.raises(LossInputError) as info:
        check_logits_target(logits, target, **kwargs)
    assert str(info.value) == message


# ---- validity_mask, check_choice, check_ignore_index --------------------------------------------------------------


@pytest.mark.parametrize("ignore_index", [-100, 0, None])
@pytest.mark.parametrize("with_mask", [False, True])
def test_validity_mask(ignore_index, with_mask):
    target = torch.tensor([[0, -100, 3], [0, 2, -100]])
    mask = torch.tensor([[True, True, False], [True, False, True]]) if with_mask else None
    got = validity_mask(target, ignore_index=ignore_index, mask=mask)
    want = [[(ignore_index is None or t != ignore_index) and (m if with_mask else True)
             for t, m in zip(trow, mrow, strict=True)]
            for trow, mrow in zip(target.tolist(), (mask if with_mask else torch.ones(2, 3)).tolist(), strict=True)]
    assert got.dtype == torch.bool and got.shape == target.shape and got.tolist() == want


def test_check_choice_and_ignore_index():
    check_choice("reduction", "sum", ("none", "sum"))
    with pytest.raises(LossInputError) as info:
        check_choice("reduction", "avg", ("none", "sum"))
    assert str(info.value) == "reduction must be one of 'none', 'sum', got 'avg'"
    for ok in (-100, 0, 7, None):
        check_ignore_index(ok)
    for bad in (True, 1.0, "-100", [-100]):
        with pytest.raises(LossInputError) as info:
            check_ignore_index(bad)
        assert str(info.value) == f"ignore_index must be an int or None, got {bad!r}"


# ---- check_target_range -------------------------------------------------------------------------------------------


def test_check_target_range_passes_in_range_and_ignores_invalid_positions():
    target = torch.tensor([[0, 4, 99], [-100, 3, -7]])
    valid = torch.tensor([[True, True, False], [False, True, False]])
    check_target_range(target, valid, 5)


@pytest.mark.parametrize(
    ("target", "valid", "message"),
    [
        (torch.tensor([[0, 5, 9], [1, 2, -1]]), None,
         "target: 3 value(s) outside [0, V=5) at valid positions, first 5 at (b=0, t=1); expected class ids in [0, 5)"),
        (torch.tensor([[0, 5, 9], [1, 2, -1]]), torch.tensor([[True, False, False], [True, True, True]]),
         "target: 1 value(s) outside [0, V=5) at valid positions, first -1 at (b=1, t=2); expected class ids in [0, 5)"),
        (torch.tensor([0, 1, 2, 7]), None,
         "target: 1 value(s) outside [0, V=5) at valid positions, first 7 at (b=3, t=0); expected class ids in [0, 5)"),
    ],
)
def test_check_target_range_messages(target, valid, message):
    valid = torch.ones_like(target, dtype=torch.bool) if valid is None else valid
    with pytest.raises(LossInputError) as info:
        check_target_range(target, valid, 5)
    assert str(info.value) == message


# ---- check_finite_logits ------------------------------------------------------------------------------------------


def finite_case():
    logits = torch.randn(2, 3, 4, dtype=F64)
    target = torch.tensor([[0, 1, 2], [3, 0, 1]])
    valid = torch.tensor([[True, True, False], [True, True, True]])
    logits[0, 2] = float("nan")  # invalid row: never an error
    return logits, target, valid


def test_check_finite_logits_passes_clean_rows_and_legal_minus_inf():
    logits, target, valid = finite_case()
    logits[1, 1, 2] = float("-inf")  # a masked class outside the target column: legal without smoothing
    check_finite_logits(logits, target, valid)
    support = torch.tensor([True, True, False, True])  # column 2 is outside the smoothing support
    check_finite_logits(logits, target, valid, smoothing_support=support)


@pytest.mark.parametrize(
    ("where", "value", "support", "message"),
    [
        ((1, 0, 2), float("nan"), None,
         "logits: 1 non-finite values (NaN/+inf) in valid rows, first at (b=1, t=0); expected finite values"),
        ((0, 1, 0), float("inf"), None,
         "logits: 1 non-finite values (NaN/+inf) in valid rows, first at (b=0, t=1); expected finite values"),
        ((1, 2, 1), float("-inf"), None,
         "logits: -inf at the target column in 1 valid row(s), first at (b=1, t=2) (column 1); the loss would be inf"),
    ],
)
def test_check_finite_logits_messages(where, value, support, message):
    logits, target, valid = finite_case()
    logits[where] = value
    kw = {} if support is None else {"smoothing_support": torch.tensor(support), "smoothing_key": "my_key"}
    with pytest.raises(LossInputError) as info:
        check_finite_logits(logits, target, valid, **kw)
    assert str(info.value) == message


def test_check_finite_logits_minus_inf_inside_the_smoothing_support():
    logits, target, valid = finite_case()
    logits[1, 1, 3] = logits[1, 2, 3] = float("-inf")
    with pytest.raises(LossInputError) as info:
        check_finite_logits(logits, target, valid, smoothing_support=torch.ones(4, dtype=torch.bool),
                            smoothing_key="my_key")
    msg = str(info.value)
    for part in ("logits: 2 -inf values", "inside the label-smoothing support in valid rows",
                 "first at (b=1, t=1) column 3", "the smoothed loss would be inf",
                 "Exclude such columns from smoothing with my_key"):
        assert part in msg, (part, msg)
    # the default key is the kernels' argument name
    with pytest.raises(LossInputError, match="with smoothing_exclude$"):
        check_finite_logits(logits, target, valid, smoothing_support=torch.ones(4, dtype=torch.bool))


def test_check_finite_logits_counts_and_reports_the_first_position():
    logits = torch.zeros(6, 3, dtype=F64)
    target = torch.zeros(6, dtype=torch.long)
    logits[4, 1] = logits[4, 2] = logits[5, 0] = float("nan")
    logits[1, 2] = float("nan")
    valid = torch.tensor([True, False, True, True, True, True])
    with pytest.raises(LossInputError, match=r"logits: 3 non-finite values .* first at \(b=4, t=0\)"):
        check_finite_logits(logits, target, valid)


# ---- result types -------------------------------------------------------------------------------------------------


def test_step_counts_base():
    plain = StepCounts(tokens=torch.tensor(10), sequences=torch.tensor(3))
    assert plain.base() is plain
    padded = StepCounts(tokens=torch.tensor(8), sequences=torch.tensor(3), base_tokens=torch.tensor(10))
    base = padded.base()
    assert base.tokens is padded.base_tokens and base.sequences is padded.sequences and base.base_tokens is None
    assert base.base() is base
    with pytest.raises(dataclasses.FrozenInstanceError):
        padded.tokens = torch.tensor(1)


def token_stats(n=4, grad=True):
    g = torch.Generator().manual_seed(n)
    floats = {f: torch.randn(n, generator=g, dtype=F64, requires_grad=grad) * 1.0 for f in TokenStats.FLOAT_FIELDS}
    return TokenStats(valid=torch.ones(n, dtype=torch.bool), argmax=torch.zeros(n, dtype=torch.long),
                      correct=torch.zeros(n, dtype=torch.bool), bad=torch.zeros(n, dtype=torch.bool), **floats)


def test_token_stats_float_fields_are_the_float_dataclass_fields():
    ts = token_stats(grad=False)
    floats = [f.name for f in dataclasses.fields(TokenStats) if getattr(ts, f.name).is_floating_point()]
    assert tuple(floats) == TokenStats.FLOAT_FIELDS


def test_token_stats_detach():
    ts = token_stats()
    d = ts.detach()
    for name in TokenStats.FLOAT_FIELDS:
        assert getattr(ts, name).requires_grad and not getattr(d, name).requires_grad, name
        assert torch.equal(getattr(d, name), getattr(ts, name).detach()), name
        assert getattr(d, name).data_ptr() == getattr(ts, name).data_ptr(), name  # no copy
    for name in ("valid", "argmax", "correct", "bad"):
        assert getattr(d, name) is getattr(ts, name), name
    with pytest.raises(dataclasses.FrozenInstanceError):
        ts.nll = ts.lse


def test_loss_fn_output_defaults():
    a, b = LossFnOutput(loss=torch.tensor(1.0)), LossFnOutput(loss=torch.tensor(2.0))
    assert a.logprobs is None and dict(a.diagnostics) == {} and a.diagnostics is not b.diagnostics
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.loss = torch.tensor(0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LossFnOutput(loss=torch.tensor(1.0), diagnostics={"x": 1.0})


def test_explain_bad_rows_names_the_target_first_then_the_logits_and_is_silent_on_good_rows():
    logits = torch.zeros(2, 3, 5)
    target = torch.tensor([[0, 1, 2], [3, 4, -100]])
    valid = target != -100
    assert explain_bad_rows(logits, target, valid) is None  # nothing wrong: returns
    both = logits.clone()
    both[1, 1, 0] = float("nan")
    bad_target = target.clone()
    bad_target[0, 2] = 5
    with pytest.raises(LossInputError, match=r"target: 1 value\(s\) outside \[0, V=5\).*\(b=0, t=2\)"):
        explain_bad_rows(both, bad_target, valid)
    with pytest.raises(LossInputError, match=r"logits: 1 non-finite values.*\(b=1, t=1\)"):
        explain_bad_rows(both, target, valid)
    # An ignored row may hold anything; -inf inside the smoothing support is refused only when it is given.
    ignored = logits.clone()
    ignored[1, 2] = float("nan")
    assert explain_bad_rows(ignored, target, valid) is None
    masked = logits.clone()
    masked[0, 0, 4] = float("-inf")
    assert explain_bad_rows(masked, target, valid) is None
    support = torch.ones(5, dtype=torch.bool)
    with pytest.raises(LossInputError, match="label-smoothing support"):
        explain_bad_rows(masked, target, valid, smoothing_support=support)
