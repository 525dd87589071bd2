"""Presentation patterns, reaction steps and masks (spec/temporal.md §5; acceptance 10-14)."""

from __future__ import annotations

import random
import warnings

import pytest
import torch

from losskit.functional.temporal import (
    PresentationSchedule,
    find_chunks,
    parse_pattern,
    reaction_mask,
    reaction_steps,
    stretch_pattern,
)


def bits(t: torch.Tensor) -> str:
    return "".join("1" if v else "0" for v in t.tolist())


def build(*args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        schedule = PresentationSchedule.build(*args, **kwargs)
    return schedule, [str(w.message) for w in caught]


# -- acceptance 10: patterns ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "steps", "expected", "warns"),
    [
        ("1011", 8, "11001111", False),
        ("1011", 10, "1110011111", True),
        ("10001000", 16, "1100000011000000", False),
        ("1", 5, "11111", False),
        ([1, 0, 1, 1], 8, "11001111", False),
        ((True, False), 4, "1100", False),
    ],
)
def test_stretch(pattern, steps, expected, warns):
    schedule, messages = build(pattern, steps)
    assert bits(schedule.present) == expected
    stretch_messages = [m for m in messages if "not a multiple" in m]
    assert len(stretch_messages) == (1 if warns else 0)
    if warns:
        assert "n_timesteps=10" in stretch_messages[0] and "L=4" in stretch_messages[0]
        assert "1110011111" in stretch_messages[0]


def test_stretch_rule_is_floor_index():
    assert stretch_pattern((1, 0, 1, 1), 10, warn=False) == (1, 1, 1, 0, 0, 1, 1, 1, 1, 1)
    with pytest.warns(UserWarning, match="not a multiple"):
        stretch_pattern((1, 0, 1), 4)


def test_int_pattern_is_a_type_error():
    with pytest.raises(TypeError, match="quote the pattern"):
        parse_pattern(1011)
    with pytest.raises(TypeError, match="quote the pattern"):
        PresentationSchedule.build(1011, 8)


@pytest.mark.parametrize("bad", ["", "10a1", "0000", [], [0, 0], [1, 2], "1 0"])
def test_bad_patterns(bad):
    with pytest.raises(ValueError, match="pattern"):
        parse_pattern(bad)


def test_chunks_are_runs_of_ones():
    assert find_chunks((0, 1, 1, 0)) == ((1, 2),)
    assert find_chunks((1, 1, 0, 0, 1, 1, 1, 1)) == ((0, 2), (4, 4))
    assert find_chunks((1,)) == ((0, 1),)
    assert find_chunks((0, 1, 0, 1)) == ((1, 1), (3, 1))


# -- acceptance 11 and 12: reaction examples ---------------------------------------------------------------


def test_seed_reaction_example():
    schedule, messages = build("1000111000", 10, dt=2, loss_reaction_time=6)
    assert schedule.k == 3
    assert schedule.chunks == ((0, 1), (4, 3))
    assert bits(schedule.reaction) == "1110111000"
    assert bits(schedule.label_valid) == "0" * 10
    assert len(messages) == 2
    assert "t=0 (length 1)" in messages[0] and "t=4 (length 3)" in messages[0]
    assert "no timestep has a valid label" in messages[1]


def test_reference_reaction_example():
    schedule, messages = build("1011011111", 10, dt=2, loss_reaction_time=4)
    assert schedule.k == 2
    assert bits(schedule.reaction) == "1111011000"
    assert bits(schedule.label_valid) == "0000000111"
    assert len(messages) == 1
    assert "t=0 (length 1)" in messages[0] and "t=2 (length 2)" in messages[0]
    assert "t=5" not in messages[0]


def test_default_task_schedule():
    schedule, messages = build("1011", 8, dt=2.0, loss_reaction_time=2.0)
    assert (bits(schedule.present), schedule.k) == ("11001111", 1)
    assert bits(schedule.reaction) == "10001000"
    assert bits(schedule.label_valid) == "01000111"
    assert messages == []


def test_schedule_is_cached_and_frozen():
    a, _ = build("1011", 8, dt=2.0, loss_reaction_time=2.0)
    b, _ = build("1011", 8, dt=2.0, loss_reaction_time=2.0)
    assert a is b
    with pytest.raises(AttributeError):
        a.k = 5


# -- acceptance 13: k rounding ------------------------------------------------------------------------------


@pytest.mark.parametrize(("rt", "dt", "k"), [(6, 2, 3), (5, 2, 3), (1, 2, 1), (0, 2, 0), (2.1, 0.3, 7), (4, 2, 2)])
def test_reaction_steps(rt, dt, k):
    assert reaction_steps(rt, dt) == k


@pytest.mark.parametrize(("rt", "dt"), [(-1, 2), (1, 0), (1, -2), (float("nan"), 1), (1, float("inf"))])
def test_reaction_steps_rejects(rt, dt):
    with pytest.raises(ValueError):
        reaction_steps(rt, dt)


# -- acceptance 14: vectorised masks ------------------------------------------------------------------------


def window_union(row: list[int], k: int) -> list[bool]:
    out = [False] * len(row)
    for e in range(len(row)):
        if row[e] and (e == 0 or not row[e - 1]):
            for t in range(e, min(e + k, len(row))):
                out[t] = True
    return out


def test_reaction_mask_matches_window_union():
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    for case in range(400):  # 400 batches of 5 rows = 2,000 (pattern, k) cases
        batch = torch.rand(5, 12, generator=gen) < rng.random()
        k = rng.randrange(0, 14)
        got = reaction_mask(batch, k)
        expected = torch.tensor([window_union(row, k) for row in batch.int().tolist()])
        assert torch.equal(got, expected), (case, k, batch)


def test_reaction_mask_leading_dims_and_k0():
    x = torch.tensor([[[1, 1, 0, 1]], [[0, 1, 1, 1]]], dtype=torch.bool)
    assert reaction_mask(x, 0).sum() == 0
    assert reaction_mask(x, 2).int().tolist() == [[[1, 1, 0, 1]], [[0, 1, 1, 0]]]
    with pytest.raises(ValueError, match="k"):
        reaction_mask(x, -1)


def loop_apply(schedule, inputs, labels, null_value, ignore_index):
    xs, ys = [], []
    for b in range(inputs.shape[0]):
        xt, yt = [], []
        for t in range(schedule.n_timesteps):
            xt.append(inputs[b] if schedule.present[t] else torch.full_like(inputs[b], null_value))
            label = labels[b] if labels.dim() == 1 else labels[b, t]
            yt.append(label if schedule.label_valid[t] else torch.tensor(ignore_index))
        xs.append(torch.stack(xt))
        ys.append(torch.stack(yt))
    return torch.stack(xs), torch.stack(ys)


@pytest.mark.parametrize("labels_have_time", [False, True])
def test_apply_equals_per_sample_loop(labels_have_time):
    schedule, _ = build("1011", 8, dt=2.0, loss_reaction_time=2.0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 4, 5, generator=gen)
    y = torch.randint(0, 10, (3, 8) if labels_have_time else (3,), generator=gen)
    x_before, y_before = x.clone(), y.clone()
    xt, yt = schedule.apply(x, y, null_value=-0.5, ignore_index=-7)
    ex, ey = loop_apply(schedule, x, y, -0.5, -7)
    assert xt.shape == (3, 8, 1, 4, 5) and yt.shape == (3, 8)
    assert torch.equal(xt, ex) and torch.equal(yt, ey)
    assert torch.equal(x, x_before) and torch.equal(y, y_before)  # no in-place writes


def test_apply_masks_inputs_with_time():
    schedule, _ = build("10", 4)
    x = torch.ones(2, 4, 3)
    xt, yt = schedule.apply(x, torch.tensor([1, 2]), inputs_have_time=True)
    assert xt[:, :, 0].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]
    assert yt.tolist() == [[1, 1, -1, -1], [2, 2, -1, -1]]
    with pytest.raises(ValueError, match="T=4"):
        schedule.apply(torch.ones(2, 5, 3), torch.tensor([1, 2]), inputs_have_time=True)
    with pytest.raises(ValueError, match="labels"):
        schedule.apply(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.long))
