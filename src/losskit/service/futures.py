"""The futures store: every unit of work is a future, polled (long-polled) by its owner.

* A ``request_id`` is ``req_`` plus 128 random bits; the store records the owner, and other callers get 404.
* Results are stored encoded (bytes and content type), so re-polls within the TTL return identical bytes and a
  result survives a lost response.
* Finished entries live ``ttl_s`` within ``budget_bytes``; the oldest finished are evicted first. Pending entries are
  never evicted; when they alone exceed the budget, new submits get 429.
* Evicted ids leave tombstones in a bounded LRU, so a late poll is 410 ``future_expired``, not 404.
* Waiting: ``wait`` (asyncio, for the HTTP loop) and ``wait_sync`` (threads) return when the future finishes or
  the timeout passes; completion wakes asyncio waiters through ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import secrets
import threading
import time
from typing import Any

from losskit.service.errors import ServiceError

PENDING, DONE, FAILED = "pending", "complete", "failed"


def new_request_id() -> str:
    return "req_" + secrets.token_hex(16)


@dataclasses.dataclass(eq=False)
class Future:
    """One request's future. ``body``/``content_type`` hold the encoded result once done; ``error`` once failed."""

    request_id: str
    owner: str
    kind: str
    model_id: str | None = None
    seq_id: int | None = None
    request_bytes: int = 0
    state: str = PENDING
    body: bytes | None = None
    content_type: str = "application/json"
    error: ServiceError | None = None
    created: float = dataclasses.field(default_factory=time.monotonic)
    finished: float | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    _event: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)
    _waiters: list = dataclasses.field(default_factory=list, repr=False)

    @property
    def done(self) -> bool:
        return self.state != PENDING

    @property
    def size(self) -> int:
        return len(self.body) if self.body is not None else self.request_bytes


class FuturesStore:
    """Thread-safe store of futures with TTL, a memory budget for finished results and tombstones."""

    def __init__(self, *, ttl_s: float, budget_bytes: int, tombstones: int = 65536) -> None:
        self.ttl_s = ttl_s
        self.budget_bytes = budget_bytes
        self._lock = threading.Lock()
        self._futures: dict[str, Future] = {}
        self._finished: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._tombstones: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._tombstone_limit = tombstones
        self._finished_bytes = 0
        self._pending_bytes = 0

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    def create(self, owner: str, kind: str, *, model_id: str | None = None, seq_id: int | None = None,
               request_bytes: int = 0) -> Future:
        """A new pending future; 429 ``queue_full`` when pending work alone exceeds the memory budget."""
        with self._lock:
            self._evict_locked(time.monotonic())
            if self._pending_bytes + request_bytes > self.budget_bytes:
                raise ServiceError("queue_full", "the server's futures store is full of pending work; retry later",
                                   headers={"Retry-After": "1"})
            fut = Future(new_request_id(), owner, kind, model_id=model_id, seq_id=seq_id, request_bytes=request_bytes)
            self._futures[fut.request_id] = fut
            self._pending_bytes += request_bytes
            return fut

    def _finish(self, fut: Future, state: str) -> None:
        with self._lock:
            if fut.done:
                return
            fut.state = state
            fut.finished = time.monotonic()
            self._pending_bytes -= fut.request_bytes
            if fut.request_id in self._futures:
                self._finished[fut.request_id] = None
                self._finished_bytes += fut.size
            waiters, fut._waiters = fut._waiters, []
            self._evict_locked(fut.finished)
        fut._event.set()
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop has closed (server shutting down)
                pass

    def complete(self, fut: Future, body: bytes, content_type: str = "application/json") -> None:
        if fut.done:
            return
        fut.body, fut.content_type = body, content_type
        self._finish(fut, DONE)

    def fail(self, fut: Future, error: ServiceError) -> None:
        if fut.done:
            return
        fut.error = error
        self._finish(fut, FAILED)

    # ---- lookup and eviction ------------------------------------------------------------------------------------
    def get(self, request_id: Any, owner: str) -> Future:
        """The caller's future; 404 for unknown or foreign ids, 410 for evicted ones."""
        with self._lock:
            self._evict_locked(time.monotonic())
            fut = self._futures.get(request_id) if isinstance(request_id, str) else None
            if fut is not None and fut.owner == owner:
                return fut
            if isinstance(request_id, str) and self._tombstones.get(request_id) == owner:
                raise ServiceError("future_expired", f"request {request_id} finished and its result has expired "
                                   f"(results are kept {self.ttl_s:g} s)")
        raise ServiceError("not_found", f"no request {request_id!r} in this session")

    def _evict_locked(self, now: float) -> None:
        while self._finished:
            rid = next(iter(self._finished))
            fut = self._futures[rid]
            if now - fut.finished < self.ttl_s and self._finished_bytes <= self.budget_bytes:
                break
            self._drop_locked(rid)

    def _drop_locked(self, rid: str) -> None:
        fut = self._futures.pop(rid)
        self._finished.pop(rid, None)
        self._finished_bytes -= fut.size
        self._tombstones[rid] = fut.owner
        while len(self._tombstones) > self._tombstone_limit:
            self._tombstones.popitem(last=False)

    def evict(self) -> None:
        with self._lock:
            self._evict_locked(time.monotonic())

    def drop_owner(self, owner: str) -> None:
        """Forget a closed session's finished futures (its pending ones are failed by the engine)."""
        with self._lock:
            for rid in [r for r, f in self._futures.items() if f.owner == owner and f.done]:
                self._drop_locked(rid)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"futures": len(self._futures), "finished": len(self._finished),
                    "pending": len(self._futures) - len(self._finished), "finished_bytes": self._finished_bytes}

    # ---- waiting -----------------------------------------------------------------------------------------------
    async def wait(self, fut: Future, timeout: float) -> bool:
        """Wait (asyncio) until ``fut`` is done or ``timeout`` seconds pass; returns whether it is done."""
        if fut.done or timeout <= 0:
            return fut.done
        event = asyncio.Event()
        with self._lock:
            if fut.done:
                return True
            fut._waiters.append((asyncio.get_running_loop(), event))
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            with self._lock:
                fut._waiters = [w for w in fut._waiters if w[1] is not event]
        return fut.done

    def wait_sync(self, fut: Future, timeout: float | None = None) -> bool:
        return fut._event.wait(timeout)
