"""Timing helpers (losskit/bench/timing.py): statistics, round-robin order, warm-ups, failures."""

from __future__ import annotations

import time

import pytest

from losskit.bench import timing


class Recorder:
    """A case that logs every prepare/step/release and can fail on a chosen step."""

    def __init__(self, name, log, fail_on=None, ms=None):
        self.name, self.log, self.fail_on, self.ms, self.steps = name, log, fail_on, ms, 0

    def prepare(self):
        self.log.append(("prepare", self.name))
        return self.name

    def step(self, state):
        assert state == self.name
        self.steps += 1
        self.log.append(("step", self.name))
        if self.fail_on == self.steps:
            raise RuntimeError(f"{self.name} broke")

    def release(self, state):
        self.log.append(("release", self.name))


def fake_timer(values):
    it = iter(values)

    def timer(fn):
        fn()
        return next(it)

    return timer


def test_summarize():
    t = timing.summarize([3.0, 1.0, 2.0, 10.0])
    assert (t.median_ms, t.min_ms, t.max_ms, t.reps) == (2.5, 1.0, 10.0, 4)
    with pytest.raises(ValueError, match="at least one"):
        timing.summarize([])


def test_round_robin_interleaves_and_drops_warmups():
    log = []
    a, b = Recorder("a", log), Recorder("b", log)
    results = timing.time_round_robin([a, b], reps=2, warmup=1, timer=fake_timer([9, 8, 1, 2, 3, 4]))
    steps = [name for kind, name in log if kind == "step"]
    assert steps == ["a", "b"] * 3
    assert [r.samples_ms for r in results] == [[1, 3], [2, 4]]
    # prepare and release bracket every step, outside the timer
    assert log[:3] == [("prepare", "a"), ("step", "a"), ("release", "a")]


def test_a_failing_case_is_recorded_and_skipped_afterwards():
    log = []
    a, b = Recorder("a", log, fail_on=2), Recorder("b", log)
    results = timing.time_round_robin([a, b], reps=3, warmup=0, timer=lambda fn: (fn(), 1.0)[1])
    assert isinstance(results[0].error, RuntimeError) and results[0].samples_ms == [1.0]
    assert a.steps == 2 and b.steps == 3
    assert results[1].error is None and results[1].samples_ms == [1.0] * 3
    assert ("release", "a") in log[-8:]  # released even when the step raised


def test_time_each_runs_cases_one_after_another():
    log = []
    cases = [Recorder("a", log), Recorder("b", log)]
    timing.time_each(cases, reps=2, warmup=1, timer=lambda fn: (fn(), 1.0)[1])
    assert [name for kind, name in log if kind == "step"] == ["a"] * 3 + ["b"] * 3


def test_argument_checks():
    with pytest.raises(ValueError, match="reps must be >= 1, got 0"):
        timing.time_round_robin([], reps=0, warmup=0, timer=timing.HostTimer())
    with pytest.raises(ValueError, match="warmup must be >= 0, got -1"):
        timing.time_round_robin([], reps=1, warmup=-1, timer=timing.HostTimer())


def test_host_timer_measures_milliseconds():
    ms = timing.HostTimer()(lambda: time.sleep(0.02))
    assert 19.0 <= ms < 1000.0
