"""What the Tinker wire surface remembers beyond the engine: idempotency of its creating calls, its samplers, the
declared inputs of its custom losses, and which session owns each request id it handed out.

* ``create_session`` is idempotent on ``X-Idempotency-Key`` (per key holder) for 10 minutes;
  ``create_model`` / create-via-load on ``(session_id, model_seq_id)``; ``create_sampling_session`` and the
  in-memory ``save_weights_for_sampler`` on ``(session_id, sampling_session_seq_id)``; ``create_custom_loss`` on
  ``(session_id, custom_loss_seq_id)``; ``asample`` on ``(sampling_session_id, seq_id)`` (the same body gets the
  original future, a different one is 400 ``seq_conflict``).
* ``retrieve_future`` carries only the request id, so each id handed out is mapped to its session and key
  (bounded; an id older than the map is answered as unknown, long after its result expired).

Identifiers follow the SDK's: ``model_id = {session_id}:train:{model_seq_id}`` (the SDK derives it itself for
create-via-load), ``sampling_session_id = {session_id}:sample:{seq}``, ``loss_id = {session_id}:loss:{seq}``,
``sample_sequence_ids = {sampling_session_id}:{seq_id}:{i}``. A session's records go when the engine closes the
session (finish, timeout); they are pruned on the next ``create_session``.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Iterable
from typing import Any

from losskit.service.errors import ServiceError
from losskit.service.operations import SnapshotSource

IDEMPOTENCY_S = 600.0
MAX_REQUESTS = 1 << 18
MAX_FINISHED = 4096
SAMPLE_WINDOW = 4096


def model_id_of(session_id: str, model_seq_id: int) -> str:
    return f"{session_id}:train:{model_seq_id}"


def sampler_id_of(session_id: str, seq: int) -> str:
    return f"{session_id}:sample:{seq}"


def loss_id_of(session_id: str, seq: int) -> str:
    return f"{session_id}:loss:{seq}"


def session_id_in(identifier: Any) -> str | None:
    """The session id that prefixes a model, sampler or loss id (None when it has none)."""
    if not isinstance(identifier, str) or ":" not in identifier:
        return None
    return identifier.split(":", 1)[0]


@dataclasses.dataclass(eq=False)
class Sampler:
    """A sampling session: a snapshot held in memory (from a checkpoint or a training model), or a base model."""

    id: str
    base_model: str
    model_path: str | None
    source: SnapshotSource | None
    seqs: collections.OrderedDict = dataclasses.field(default_factory=collections.OrderedDict)
    pending: set[str] = dataclasses.field(default_factory=set)  # request ids not known to be done

    def submitted(self, seq: int, digest: str) -> tuple[str, list[str]] | None:
        """``(request_id, sample_sequence_ids)`` of an earlier request with this seq and body, else None.

        Raises:
            ServiceError: 400 ``seq_conflict`` when the seq was used with a different body.
        """
        known = self.seqs.get(seq)
        if known is None:
            return None
        request_id, known_digest, ids = known
        if known_digest != digest:
            raise ServiceError("seq_conflict", f"sampling session {self.id}: seq_id {seq} was already used by "
                               f"request {request_id} with a different body", detail={"seq_id": seq})
        return request_id, ids

    def record(self, seq: int, request_id: str, digest: str, ids: list[str]) -> None:
        self.seqs[seq] = (request_id, digest, ids)
        while len(self.seqs) > SAMPLE_WINDOW:
            self.seqs.popitem(last=False)


@dataclasses.dataclass(eq=False)
class TinkerSession:
    id: str
    owner: str
    sdk_version: str | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    models: dict[int, tuple[str, str]] = dataclasses.field(default_factory=dict)  # model_seq_id -> (rid, digest)
    samplers: dict[str, Sampler] = dataclasses.field(default_factory=dict)
    losses: dict[int, tuple[str, str, str]] = dataclasses.field(default_factory=dict)  # seq -> (rid, loss_id, digest)
    loss_inputs: dict[str, tuple[tuple[str, int], ...]] = dataclasses.field(default_factory=dict)


class TinkerState:
    """Thread-safe; every method takes the lock only briefly."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.sessions: dict[str, TinkerSession] = {}
        self._created: collections.OrderedDict[tuple[str, str], tuple[str, float]] = collections.OrderedDict()
        self._requests: collections.OrderedDict[str, tuple[str, str]] = collections.OrderedDict()
        self._finished: collections.OrderedDict[str, str] = collections.OrderedDict()

    # ---- sessions ---------------------------------------------------------------------------------------------
    def prune(self, live: Iterable[str]) -> None:
        """Forget the records of sessions the engine no longer holds, and stale idempotency keys."""
        live = set(live)
        now = time.monotonic()
        with self.lock:
            for sid in [s for s in self.sessions if s not in live]:
                del self.sessions[sid]
            while self._created and now - next(iter(self._created.values()))[1] > IDEMPOTENCY_S:
                self._created.popitem(last=False)

    def session_for_key(self, owner: str, key: str | None) -> str | None:
        if not key:
            return None
        with self.lock:
            found = self._created.get((owner, key))
            if found is None or time.monotonic() - found[1] > IDEMPOTENCY_S:
                return None
            return found[0]

    def add_session(self, record: TinkerSession, idempotency_key: str | None) -> None:
        with self.lock:
            self.sessions[record.id] = record
            if idempotency_key:
                self._created[(record.owner, idempotency_key)] = (record.id, time.monotonic())

    def record(self, session_id: str, owner: str) -> TinkerSession:
        """The surface's record of an engine session (made on first use, e.g. for a native session id)."""
        with self.lock:
            rec = self.sessions.get(session_id)
            if rec is None:
                rec = self.sessions[session_id] = TinkerSession(session_id, owner)
            return rec

    def finished(self, session_id: str, owner: str) -> None:
        with self.lock:
            self.sessions.pop(session_id, None)
            self._finished[session_id] = owner
            while len(self._finished) > MAX_FINISHED:
                self._finished.popitem(last=False)

    def was_finished(self, session_id: str, owner: str) -> bool:
        with self.lock:
            return self._finished.get(session_id) == owner

    # ---- request ids ------------------------------------------------------------------------------------------
    def handed_out(self, request_id: str, session_id: str, owner: str) -> None:
        with self.lock:
            self._requests[request_id] = (session_id, owner)
            self._requests.move_to_end(request_id)
            while len(self._requests) > MAX_REQUESTS:
                self._requests.popitem(last=False)

    def session_of_request(self, request_id: Any, owner: str) -> str:
        """The session that owns a request id this surface handed out to ``owner``; 404 otherwise."""
        with self.lock:
            found = self._requests.get(request_id) if isinstance(request_id, str) else None
        if found is None or found[1] != owner:
            raise ServiceError("not_found", f"no request {request_id!r} for this key")
        return found[0]
