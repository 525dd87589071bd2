"""Wall-clock timing of fwd+bwd steps: host `perf_counter` (CPU) or CUDA events (GPU).

The method (docs/losses.md, "Benchmarks"): CPU mode interleaves the entries round-robin inside every repetition, so a
burst of machine noise (other processes on the same 2 cores) hits every entry alike instead of one entry's block of
repetitions. GPU mode times each entry on its own: 3 warm-ups, then 20 runs, each between two CUDA events.

A *case* is anything with ``prepare() -> state`` (work done outside the timed window: fresh clones for in-place
entries, dropping the previous gradient), ``step(state)`` (the timed fwd+bwd) and ``release(state)`` (untimed
clean-up). The summary statistics are pure functions of the samples.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol


class Case(Protocol):
    """What the timers drive: the untimed preparation, the timed step and the untimed release."""

    def prepare(self) -> Any: ...

    def step(self, state: Any) -> None: ...

    def release(self, state: Any) -> None: ...


@dataclasses.dataclass(frozen=True)
class Timing:
    """Summary of the timed repetitions of one entry (milliseconds)."""

    median_ms: float
    min_ms: float
    max_ms: float
    reps: int


def summarize(samples_ms: Sequence[float]) -> Timing:
    """Median, min and max of the timed samples.

    Raises:
        ValueError: ``samples_ms`` is empty.
    """
    if not samples_ms:
        raise ValueError("samples_ms must hold at least one timing, got none")
    return Timing(statistics.median(samples_ms), min(samples_ms), max(samples_ms), len(samples_ms))


class HostTimer:
    """Times a callable with ``time.perf_counter`` (CPU work is synchronous, so no sync is needed)."""

    def __call__(self, fn: Callable[[], None]) -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3


class CudaEventTimer:
    """Times a callable between two CUDA events on the current stream.

    The host waits for the end event *after* the window closes, so the wait is never counted; the events measure
    device time from the first kernel of the step to the last one.
    """

    def __init__(self) -> None:
        import torch

        self._torch = torch

    def __call__(self, fn: Callable[[], None]) -> float:
        start = self._torch.cuda.Event(enable_timing=True)
        end = self._torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))


@dataclasses.dataclass
class CaseResult:
    """The raw outcome of timing one case: its samples, or the error that stopped it."""

    samples_ms: list[float] = dataclasses.field(default_factory=list)
    error: BaseException | None = None


def _timed_run(case: Case, timer: Callable[[Callable[[], None]], float]) -> float:
    state = case.prepare()
    try:
        return timer(lambda: case.step(state))
    finally:
        case.release(state)


def time_round_robin(
    cases: Sequence[Case],
    *,
    reps: int,
    warmup: int,
    timer: Callable[[Callable[[], None]], float],
) -> list[CaseResult]:
    """Run ``warmup + reps`` rounds; each round runs every case once, in order, and keeps the timed samples.

    A case that raises is recorded with its error and left out of the later rounds; the others carry on.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    results = [CaseResult() for _ in cases]
    for round_ in range(warmup + reps):
        for case, result in zip(cases, results):
            if result.error is not None:
                continue
            try:
                ms = _timed_run(case, timer)
            except Exception as exc:  # noqa: BLE001 - any failure becomes the row's status
                result.error = exc
                continue
            if round_ >= warmup:
                result.samples_ms.append(ms)
    return results


def time_each(
    cases: Sequence[Case],
    *,
    reps: int,
    warmup: int,
    timer: Callable[[Callable[[], None]], float],
) -> list[CaseResult]:
    """Time each case on its own: ``warmup`` untimed runs, then ``reps`` timed ones (the GPU method)."""
    results = []
    for case in cases:
        results += time_round_robin([case], reps=reps, warmup=warmup, timer=timer)
    return results
