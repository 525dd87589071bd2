"""The engine: sessions, models, ordered queues, futures and the device worker, shared by every HTTP surface.

A surface parses and validates a request, then calls one engine operation (``create_model``, ``submit`` for the
seq-ordered model operations such as forward_backward, optim_step, save and load, ``submit_sampler`` for sampling
from a snapshot or a base model, ``register_loss``) with a units factory and an encoder. The engine owns the
order (``ordering.Sequencer``), the futures (``futures.FuturesStore``), the fair device worker
(``worker.DeviceWorker``) and ownership: a session belongs to its key; models, losses and futures to their
session; a foreign id is answered as unknown and never acted on.

Results are encoded by the surface's encoder in a small thread pool (never on the asyncio loop and never on the
device thread); saves write their files in an I/O pool and complete once the files are durable.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import secrets
import threading
import time
import traceback
from collections.abc import Callable, Generator
from typing import Any

from losskit.service.errors import SERVER, ServiceError, as_service_error
from losskit.service.futures import Future, FuturesStore
from losskit.service.loss_registry import CustomLoss, builtin_losses
from losskit.service.ordering import Sequencer
from losskit.service.settings import ServeSettings
from losskit.service.worker import DeviceWorker, Lane, Work

log = logging.getLogger("losskit.serve")

Encoder = Callable[[Any], tuple[bytes, str]]
JANITOR_TICK_S = 0.2
EXPIRY_INTERVAL_S = 3600.0


@dataclasses.dataclass(frozen=True)
class IOTask:
    """A unit's result that still needs I/O (writing a checkpoint): ``run()`` returns the final result."""

    run: Callable[[], Any]


def single_unit(fn: Callable[[], Any]) -> Generator[None, None, Any]:
    """A request of exactly one unit: ``fn()`` runs at the first ``next()`` and its value is the result."""
    return fn()
    yield  # pragma: no cover - makes this function a generator


@dataclasses.dataclass(eq=False)
class Session:
    id: str
    owner: str
    client: str | None = None
    created: float = dataclasses.field(default_factory=time.time)
    last_seen: float = dataclasses.field(default_factory=time.monotonic)
    models: dict[str, ModelState] = dataclasses.field(default_factory=dict)
    losses: dict[str, CustomLoss] = dataclasses.field(default_factory=dict)
    loss_versions: dict[str, int] = dataclasses.field(default_factory=dict)
    futures: set[str] = dataclasses.field(default_factory=set)
    closed: bool = False


@dataclasses.dataclass(eq=False)
class ModelState:
    model_id: str
    session: Session
    base_name: str
    info: Any
    lora: Any
    seq: Sequencer
    lane: Lane
    handle: Any = None
    closed: bool = False
    created: float = dataclasses.field(default_factory=time.time)
    user_metadata: dict = dataclasses.field(default_factory=dict)


class Engine:
    """One server's state. Thread-safe: HTTP threads call it; the device worker runs the units."""

    def __init__(self, settings: ServeSettings, backend: Any, models: Any, state: Any) -> None:
        self.settings = settings
        self.backend = backend
        self.models_registry = models
        self.state = state
        self.lock = threading.RLock()
        self.futures = FuturesStore(ttl_s=settings.future_ttl_s, budget_bytes=int(settings.future_store_mb * 2**20))
        self.worker = DeviceWorker()
        self.io = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="losskit-io")
        self.encoders = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="losskit-encode")
        self.sessions: dict[str, Session] = {}
        self.models: dict[str, ModelState] = {}
        self.sampler_lanes: dict[str, Lane] = {}
        self.builtins = builtin_losses()
        self._infos: dict[str, Any] = {}
        self._info_lock = threading.Lock()
        self._control = Lane("control")
        self._stop = threading.Event()
        self._janitor = threading.Thread(target=self._janitor_loop, name="losskit-janitor", daemon=True)
        self._last_expiry = 0.0
        self.counters: collections.Counter = collections.Counter()

    # ---- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.worker.start()
        self._janitor.start()

    def stop(self) -> None:
        self._stop.set()
        with self.lock:
            for session in list(self.sessions.values()):
                self._close_session_locked(session, "the server is stopping")
        self.worker.stop()
        self.io.shutdown(wait=True)
        self.encoders.shutdown(wait=True)

    def _janitor_loop(self) -> None:
        while not self._stop.wait(JANITOR_TICK_S):
            try:
                self._janitor_tick()
            except Exception:  # the janitor must keep running; the error is logged
                log.exception("janitor tick failed")

    def _janitor_tick(self) -> None:
        self.futures.evict()
        now = time.monotonic()
        with self.lock:
            for state in list(self.models.values()):
                gap = state.seq.expired_gap(self.settings.seq_gap_timeout_s, now)
                if gap is None:
                    continue
                missing, blocked = gap
                err = ServiceError("seq_gap_timeout", f"model {state.model_id}: seq_id {missing} never arrived; the "
                                   f"requests behind it waited {self.settings.seq_gap_timeout_s:g} s and failed")
                for work in blocked:
                    work.on_fail(err)
            for session in list(self.sessions.values()):
                if now - session.last_seen > self.settings.session_timeout_s:
                    self._close_session_locked(session, "the session timed out")
        if time.time() - self._last_expiry > EXPIRY_INTERVAL_S:
            self._last_expiry = time.time()
            removed = self.state.expire()
            if removed:
                log.info("removed %d expired checkpoint(s)", len(removed))

    # ---- base models --------------------------------------------------------------------------------------------
    def base_info(self, name: str):
        """Tokenizer and config of a base model (cached; a 400 ``unknown_base_model`` when it cannot resolve)."""
        with self._info_lock:
            if name not in self._infos:
                from losskit.service.backend import load_info

                self._infos[name] = load_info(self.models_registry, name)
            return self._infos[name]

    # ---- sessions -----------------------------------------------------------------------------------------------
    def create_session(self, owner: str, client: str | None = None) -> Session:
        with self.lock:
            live = sum(1 for s in self.sessions.values() if not s.closed)
            if live >= self.settings.max_sessions:
                raise ServiceError("queue_full", f"the server holds {live} sessions (--max-sessions); close one or "
                                   "retry later", headers={"Retry-After": "5"})
            session = Session("sess_" + secrets.token_urlsafe(16), owner, client)
            self.sessions[session.id] = session
            return session

    def session(self, session_id: Any, owner: str) -> Session:
        with self.lock:
            session = self.sessions.get(session_id) if isinstance(session_id, str) else None
            if session is None or session.owner != owner:
                raise ServiceError("unknown_session", f"no session {session_id!r} for this key; create one with POST "
                                   "/v1/sessions", status=404)
            if session.closed:
                raise ServiceError("session_closed", f"session {session_id} is closed")
            session.last_seen = time.monotonic()
            return session

    def close_session(self, session: Session, reason: str = "the session was closed") -> None:
        with self.lock:
            self._close_session_locked(session, reason)

    def _close_session_locked(self, session: Session, reason: str) -> None:
        if session.closed:
            return
        session.closed = True
        for state in list(session.models.values()):
            self._close_model_locked(state, reason)
        session.losses.clear()
        err = ServiceError("session_closed", f"session {session.id}: {reason}")
        for lane_key in [k for k in self.sampler_lanes if k.startswith(session.id + ":")]:
            lane = self.sampler_lanes.pop(lane_key)
            lane.close_error = lambda err=err: err
            self.worker.close(lane)
        self.sessions.pop(session.id, None)
        self.futures.drop_owner(session.id)

    # ---- models -------------------------------------------------------------------------------------------------
    def model(self, session: Session, model_id: str) -> ModelState:
        with self.lock:
            state = session.models.get(model_id)
            if state is None or state.closed:
                raise ServiceError("unknown_model", f"no model {model_id!r} in this session")
            return state

    def create_model(self, session: Session, model_id: str, base_name: str, spec: Any, encode: Encoder, *,
                     make: Callable[[], Any] | None = None, user_metadata: dict | None = None) -> Future:
        """A new model whose first unit (its implicit seq 0) creates the adapter; ``make`` replaces
        ``backend.create`` (create-via-load). The model's next seq is 1."""
        info = self.base_info(base_name)
        with self.lock:
            if model_id in session.models and not session.models[model_id].closed:
                raise ServiceError("model_exists", f"model {model_id!r} already exists in this session",
                                   detail={"argument": "model_id"})
            live = sum(1 for m in self.models.values() if not m.closed)
            if live >= self.settings.max_models:
                raise ServiceError("queue_full", f"the server holds {live} models (--max-models); delete one or "
                                   "retry later", headers={"Retry-After": "5"})
            state = ModelState(model_id, session, base_name, info, spec,
                               Sequencer(max_ahead=self.settings.max_pending_per_model), Lane(model_id),
                               user_metadata=dict(user_metadata or {}))
            state.lane.close_error = lambda: ServiceError("session_closed", f"model {model_id} was closed")

            def teardown():
                if state.handle is not None:
                    self.backend.delete(state.handle)
                    state.handle = None

            state.lane.teardown = teardown
            session.models[model_id] = state
            self.models[model_id] = state
            fut = self.futures.create(session.id, "create_model", model_id=model_id, seq_id=0)
            session.futures.add(fut.request_id)

        def start():
            def build():
                state.handle = make() if make is not None else self.backend.create(model_id, info, spec)
                return {"model_id": model_id, "base_model": base_name, "lora_rank": spec.rank, "seed": spec.seed}

            return single_unit(build)

        def failed(exc):
            with self.lock:
                self._close_model_locked(state, "its creation failed", fail_queued=True)
            self._fail(fut, exc)

        self.worker.push(state.lane, Work("create_model", start, lambda v: self._done(fut, v, encode), failed))
        return fut

    def delete_model(self, session: Session, model_id: str) -> None:
        with self.lock:
            state = self.model(session, model_id)
            self._close_model_locked(state, "it was deleted")

    def _close_model_locked(self, state: ModelState, reason: str, fail_queued: bool = True) -> None:
        if state.closed:
            return
        state.closed = True
        err = ServiceError("session_closed", f"model {state.model_id}: {reason}")
        state.lane.close_error = lambda: err
        for work in state.seq.drain():
            work.on_fail(err)
        state.session.models.pop(state.model_id, None)
        self.models.pop(state.model_id, None)
        self.worker.close(state.lane)

    def submit(self, session: Session, model_id: str, seq: int | None, body_hash: str, label: str,
               units: Callable[[Any, int], Generator], encode: Encoder, *, request_bytes: int = 0) -> Future:
        """Queue one seq-ordered request of a model. ``units(handle, seq)`` makes its units generator on the worker.

        A repeat of a seq with the same ``body_hash`` returns the original future; the work runs once.
        """
        with self.lock:
            state = self.model(session, model_id)
            if seq is None:
                seq = state.seq.assign()
            duplicate = state.seq.check(seq, body_hash)
            if duplicate is not None:
                self.counters["duplicates"] += 1
                return self.futures.get(duplicate, session.id)
            fut = self.futures.create(session.id, label, model_id=model_id, seq_id=seq, request_bytes=request_bytes)
            session.futures.add(fut.request_id)
            work = Work(label, lambda: units(state.handle, seq), lambda v: self._done(fut, v, encode),
                        lambda exc: self._fail(fut, exc))
            state.seq.add(seq, fut.request_id, body_hash, work)
            for ready in state.seq.pop_ready():
                self.worker.push(state.lane, ready)
            return fut

    #: Errors that do not consume the request's seq (the request may be retried under the same number).
    KEEP_SEQ = frozenset({"seq_conflict", "seq_stale", "queue_full", "unknown_model", "unknown_session",
                          "session_closed", "unauthorized"})

    def burn(self, session: Session, model_id: str, seq: int | None, body_hash: str, error: ServiceError) -> None:
        """A request rejected at submit still uses its ``seq_id``: queue a failed request in its place, so that the
        model's later requests never wait for that number (a resend of the same body gets the same error)."""
        if seq is None or error.code in self.KEEP_SEQ or error.status >= 500:
            return
        with self.lock:
            try:
                state = self.model(session, model_id)
                if state.seq.check(seq, body_hash) is not None:
                    return
            except ServiceError:
                return
            fut = self.futures.create(session.id, "rejected", model_id=model_id, seq_id=seq)
            session.futures.add(fut.request_id)

            def rejected():
                raise error

            work = Work("rejected", lambda: single_unit(rejected), lambda v: None, lambda exc: self._fail(fut, exc))
            state.seq.add(seq, fut.request_id, body_hash, work)
            for ready in state.seq.pop_ready():
                self.worker.push(state.lane, ready)

    def submit_sampler(self, session: Session, lane_key: str, label: str, units: Callable[[], Generator],
                       encode: Encoder) -> Future:
        """Queue a request on a sampler lane (a snapshot or a base model of this session), FIFO."""
        with self.lock:
            key = f"{session.id}:{lane_key}"
            lane = self.sampler_lanes.get(key)
            if lane is None:
                lane = self.sampler_lanes[key] = Lane(key)
            fut = self.futures.create(session.id, label)
            session.futures.add(fut.request_id)
        self.worker.push(lane, Work(label, units, lambda v: self._done(fut, v, encode), lambda e: self._fail(fut, e)))
        return fut

    # ---- completion ---------------------------------------------------------------------------------------------
    def _done(self, fut: Future, value: Any, encode: Encoder) -> None:
        if isinstance(value, IOTask):
            self.io.submit(self._finish_io, fut, value, encode)
        else:
            self.encoders.submit(self._encode, fut, value, encode)

    def _finish_io(self, fut: Future, task: IOTask, encode: Encoder) -> None:
        try:
            value = task.run()
        except BaseException as exc:  # noqa: BLE001 - the failure goes to the future
            self._fail(fut, exc)
            return
        self._encode(fut, value, encode)

    def _encode(self, fut: Future, value: Any, encode: Encoder) -> None:
        try:
            body, content_type = encode(value)
        except BaseException as exc:  # noqa: BLE001 - an encoder bug fails the request, not the server
            self._fail(fut, exc)
            return
        self.futures.complete(fut, body, content_type)

    def _fail(self, fut: Future, exc: BaseException) -> None:
        err = as_service_error(exc)
        if err.category == SERVER and err.code == "internal_error":
            error_id = secrets.token_hex(6)
            log.error("request %s failed (error id %s):\n%s", fut.request_id, error_id,
                      "".join(traceback.format_exception(exc)))
            err = ServiceError("internal_error", f"internal error (error id {error_id}); the server log has the "
                               "details", category=SERVER, status=500)
        self.futures.fail(fut, err)

    # ---- losses -------------------------------------------------------------------------------------------------
    def register_loss(self, session: Session, loss: CustomLoss) -> tuple[CustomLoss, bool]:
        """Register (or replace) a custom loss of ``session``. Returns it (with its version) and whether an earlier
        loss of the same name was replaced; requests already queued keep the loss they resolved."""
        with self.lock:
            if loss.name in self.builtins:
                raise ServiceError("builtin_protected", f"{loss.name!r} is a built-in loss; built-ins cannot be "
                                   "replaced (pick another name)", detail={"name": loss.name})
            version = session.loss_versions.get(loss.name, 0) + 1
            loss = dataclasses.replace(loss, version=version)
            replaced = loss.name in session.losses
            session.losses[loss.name] = loss
            session.loss_versions[loss.name] = version
            return loss, replaced

    def unregister_loss(self, session: Session, name: str) -> None:
        with self.lock:
            if name in self.builtins:
                raise ServiceError("builtin_protected", f"{name!r} is a built-in loss and cannot be deleted", status=403)
            if name not in session.losses:
                raise ServiceError("unknown_loss", f"no custom loss {name!r} in this session")
            del session.losses[name]

    # ---- in-process hooks (tests, benchmarks): never HTTP routes --------------------------------------------------
    def call_on_worker(self, fn: Callable[[], Any], timeout: float = 60.0) -> Any:
        """Run ``fn`` on the device worker (between units) and return its value."""
        box: dict[str, Any] = {}
        done = threading.Event()

        def ok(v):
            box["value"] = v
            done.set()

        def bad(e):
            box["error"] = e
            done.set()

        self.worker.push(self._control, Work("control", lambda: single_unit(fn), ok, bad))
        if not done.wait(timeout):
            raise TimeoutError("the device worker did not run the call in time")
        if "error" in box:
            raise box["error"]
        return box["value"]

    def find_model(self, model_id: str) -> ModelState:
        with self.lock:
            if model_id not in self.models:
                raise KeyError(model_id)
            return self.models[model_id]

    def debug_gradients(self, model_id: str):
        """Copies of a model's accumulated adapter gradients (``{peft key: tensor or None}``)."""
        state = self.find_model(model_id)
        return self.call_on_worker(lambda: self.backend.debug_gradients(state.handle))

    def adapter_state(self, model_id: str):
        """Copies of a model's adapter parameters."""
        state = self.find_model(model_id)
        return self.call_on_worker(lambda: self.backend.adapter_state(state.handle))

    def optimizer_of(self, model_id: str):
        """The model's optimizer (inspection only)."""
        return self.find_model(model_id).handle.optimizer

    def queue_depth(self) -> int:
        with self.lock:
            pending = sum(len(m.seq.pending) for m in self.models.values())
        return pending + self.worker.depth()
