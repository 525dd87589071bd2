"""The shared warm-up + cosine learning-rate schedule (train/schedule.py) used by the lm and diffusion tasks."""

from __future__ import annotations

import itertools
import math
import types

import pytest

from losskit.train.schedule import get_lr


def _reference(it, *, learning_rate, min_lr, warmup_iters, max_iters, lr_decay_iters, decay_lr):
    """The formula of the module docstring, written out independently."""
    if not decay_lr:
        return learning_rate
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    end = max_iters if lr_decay_iters is None else lr_decay_iters
    if it >= max(warmup_iters, end):
        return min_lr
    coeff = 0.5 * (1 + math.cos(math.pi * (it - warmup_iters) / (end - warmup_iters)))
    return min_lr + coeff * (learning_rate - min_lr)


@pytest.mark.parametrize(
    ("warmup_iters", "max_iters", "lr_decay_iters", "decay_lr"),
    [(10, 110, None, True), (0, 50, None, True), (5, 40, 20, True), (30, 40, 20, True), (8, 8, None, True),
     (10, 110, None, False)],
)
def test_schedule_matches_the_formula(warmup_iters, max_iters, lr_decay_iters, decay_lr):
    cfg = types.SimpleNamespace(learning_rate=2e-3, min_lr=1e-4, warmup_iters=warmup_iters, max_iters=max_iters,
                                lr_decay_iters=lr_decay_iters, decay_lr=decay_lr)
    for it in range(max_iters + 5):
        assert get_lr(it, cfg) == pytest.approx(_reference(it, **vars(cfg)), rel=1e-12, abs=0)


def test_schedule_landmarks():
    cfg = types.SimpleNamespace(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110, lr_decay_iters=None,
                                decay_lr=True)
    assert get_lr(0, cfg) == pytest.approx(1 / 11)
    assert get_lr(10, cfg) == pytest.approx(1.0)  # the peak, where the cosine starts
    assert get_lr(60, cfg) == pytest.approx(0.55)  # half-way down
    for it in (110, 111, 500):
        assert get_lr(it, cfg) == 0.1
    steps = [get_lr(it, cfg) for it in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(steps))  # monotone decay after the warm-up


def test_both_tasks_use_the_shared_schedule():
    from losskit.train import diffusion, lm

    assert lm.get_lr is get_lr
    assert diffusion._lr is get_lr
