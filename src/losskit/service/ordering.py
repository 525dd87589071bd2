"""Per-model request order: strict ``seq_id`` order and de-duplication on ``(model_id, seq_id)``.

* A request runs only when its ``seq_id`` equals the model's ``next_seq`` (1 after ``create_model``, which is the
  implicit seq 0). Native requests may omit ``seq_id``; the server then assigns the next free one.
* For the last ``window`` seqs the sequencer keeps ``seq -> (request_id, SHA-256 of the canonical body)``. A repeat
  with the same body gets the original future (the work runs once); a different body is 400 ``seq_conflict`` (not
  409, which the SDK retries for minutes); a seq below the window is 400 ``seq_stale``; a seq more than
  ``max_ahead`` past ``next_seq`` is 429 with ``Retry-After``.
* Requests blocked behind a missing seq for longer than the gap timeout fail with ``seq_gap_timeout`` naming the
  missing seq, and ``next_seq`` moves past them.
"""

from __future__ import annotations

import collections
import time
from typing import Any

from losskit.service.errors import ServiceError

DEDUPE_WINDOW = 4096


class Sequencer:
    """The ordering state of one model. Not thread-safe: the engine calls it under its lock."""

    def __init__(self, *, max_ahead: int, window: int = DEDUPE_WINDOW, first_seq: int = 1) -> None:
        self.max_ahead = max_ahead
        self.window = window
        self.next_seq = first_seq
        self.highest = first_seq - 1
        self.pending: dict[int, tuple[Any, float]] = {}
        self.seen: collections.OrderedDict[int, tuple[str, str]] = collections.OrderedDict()

    def assign(self) -> int:
        """The seq of a request that came without one."""
        return max(self.highest + 1, self.next_seq)

    def check(self, seq: Any, body_hash: str) -> str | None:
        """Validate ``seq`` for a new request; returns the original ``request_id`` of a duplicate, else None.

        Raises:
            ServiceError: ``seq_conflict``, ``seq_stale`` (400), ``queue_full`` (429, too far ahead).
        """
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
            raise ServiceError("validation_error", f"seq_id must be an int >= 1, got {seq!r}",
                               detail={"argument": "seq_id"})
        if seq in self.seen:
            request_id, digest = self.seen[seq]
            if digest == body_hash:
                return request_id
            raise ServiceError("seq_conflict", f"seq_id {seq} was already used by request {request_id} with a "
                               "different body; each seq_id names one request", detail={"seq_id": seq})
        if seq < self.next_seq:
            raise ServiceError("seq_stale", f"seq_id {seq} is older than the de-duplication window (next runnable "
                               f"seq_id is {self.next_seq})", detail={"seq_id": seq})
        if seq > self.next_seq + self.max_ahead:
            raise ServiceError("queue_full", f"seq_id {seq} is more than {self.max_ahead} ahead of the next runnable "
                               f"seq_id {self.next_seq}; retry after the earlier requests", headers={"Retry-After": "1"},
                               detail={"seq_id": seq})
        return None

    def add(self, seq: int, request_id: str, body_hash: str, work: Any) -> None:
        self.pending[seq] = (work, time.monotonic())
        self.seen[seq] = (request_id, body_hash)
        while len(self.seen) > self.window:
            self.seen.popitem(last=False)
        self.highest = max(self.highest, seq)

    def pop_ready(self) -> list[Any]:
        """The pending requests that can run now, in seq order (``next_seq`` advances past them)."""
        ready = []
        while self.next_seq in self.pending:
            ready.append(self.pending.pop(self.next_seq)[0])
            self.next_seq += 1
        return ready

    def expired_gap(self, timeout_s: float, now: float | None = None) -> tuple[int, list[Any]] | None:
        """``(missing seq, blocked requests)`` when the oldest blocked request waited longer than ``timeout_s``;
        ``next_seq`` then moves past them."""
        if not self.pending or self.next_seq in self.pending:
            return None
        now = time.monotonic() if now is None else now
        oldest = min(t for _, t in self.pending.values())
        if now - oldest < timeout_s:
            return None
        missing = self.next_seq
        blocked = [self.pending[s][0] for s in sorted(self.pending)]
        self.next_seq = max(self.pending) + 1
        self.pending.clear()
        return missing, blocked

    def drain(self) -> list[Any]:
        """Every pending request (the model is closing)."""
        out = [w for w, _ in self.pending.values()]
        self.pending.clear()
        return out
