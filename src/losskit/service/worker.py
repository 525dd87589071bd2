"""The device worker: one thread per device runs every unit of work, with a fair ring of lanes.

A lane is the ordered work of one training model (or one sampler). The ring holds the lanes that have work; the
worker takes the next lane, runs **one unit** of its head request, and re-appends the lane if it still has work.
Between two units of one lane every other lane with work runs at most one unit, so one model never waits on
another for more than a unit. A unit is one ``next()`` of the request's generator (a micro-batch of a
forward_backward, a whole optim_step, the device part of a save, a prefill or a decode slice).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Generator
from typing import Any

log = logging.getLogger("losskit.serve")


@dataclasses.dataclass(eq=False)
class Work:
    """One queued request: ``start()`` makes its units generator on the worker thread."""

    label: str
    start: Callable[[], Generator]
    on_done: Callable[[Any], None]
    on_fail: Callable[[BaseException], None]
    gen: Generator | None = None


@dataclasses.dataclass(eq=False)
class Lane:
    name: str
    queue: collections.deque = dataclasses.field(default_factory=collections.deque)
    current: Work | None = None
    closing: bool = False
    teardown: Callable[[], None] | None = None
    close_error: Callable[[], BaseException] | None = None

    def has_work(self) -> bool:
        return self.closing or self.current is not None or bool(self.queue)


class DeviceWorker:
    """Runs lanes' units one at a time, round robin. ``push``/``close`` may be called from any thread."""

    def __init__(self, name: str = "losskit-device") -> None:
        self._cond = threading.Condition()
        self._ring: collections.deque[Lane] = collections.deque()
        self._in_ring: set[int] = set()
        self._stop = False
        self.events: collections.deque = collections.deque(maxlen=8192)
        self.busy = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _schedule(self, lane: Lane) -> None:
        if id(lane) not in self._in_ring:
            self._in_ring.add(id(lane))
            self._ring.append(lane)
            self._cond.notify()

    def push(self, lane: Lane, work: Work) -> None:
        with self._cond:
            lane.queue.append(work)
            self._schedule(lane)

    def close(self, lane: Lane) -> None:
        """Tear the lane down on the worker: abandon its running request (its generator restores the model),
        fail the queued ones with ``lane.close_error()``, then run ``lane.teardown``."""
        with self._cond:
            lane.closing = True
            self._schedule(lane)

    def depth(self) -> int:
        with self._cond:
            return sum(len(lane.queue) + (lane.current is not None) for lane in self._ring)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._ring and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                lane = self._ring.popleft()
                self._in_ring.discard(id(lane))
                if lane.closing:
                    queued, lane.queue = list(lane.queue), collections.deque()
                    current, lane.current = lane.current, None
                    work = None
                else:
                    work = lane.current or lane.queue.popleft()
                    lane.current = work
            self.busy = True
            try:
                if work is None:
                    self._teardown(lane, current, queued)
                else:
                    self._unit(lane, work)
            finally:
                self.busy = False
            with self._cond:
                if lane.has_work() and not (lane.closing and work is None):
                    self._schedule(lane)

    def _unit(self, lane: Lane, work: Work) -> None:
        try:
            if work.gen is None:
                work.gen = work.start()
            next(work.gen)
            self.events.append(("unit", lane.name, work.label, time.monotonic()))
            return
        except StopIteration as stop:
            lane.current = None
            self.events.append(("done", lane.name, work.label, time.monotonic()))
            self._call(work.on_done, stop.value)
        except BaseException as exc:  # noqa: BLE001 - a failed request fails its future, never the worker
            lane.current = None
            self.events.append(("failed", lane.name, work.label, time.monotonic()))
            self._call(work.on_fail, exc)

    def _teardown(self, lane: Lane, current: Work | None, queued: list[Work]) -> None:
        error = lane.close_error() if lane.close_error else RuntimeError("closed")
        if current is not None and current.gen is not None:
            try:
                current.gen.close()
            except BaseException:
                log.exception("closing an abandoned request of %s", lane.name)
        for work in ([current] if current is not None else []) + queued:
            self._call(work.on_fail, error)
        if lane.teardown is not None:
            self._call(lambda _: lane.teardown(), None)

    @staticmethod
    def _call(fn: Callable, arg: Any) -> None:
        try:
            fn(arg)
        except BaseException:  # a callback bug must not kill the device thread
            log.exception("device worker callback failed")
