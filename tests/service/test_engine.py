"""Engine unit tests with a fake backend: seq order, de-duplication, gaps, fairness, failures, futures, sessions."""

import asyncio
import json
import threading
import time

import pytest

from losskit.service.engine import Engine, IOTask, single_unit
from losskit.service.errors import ServiceError
from losskit.service.futures import FuturesStore
from losskit.service.lora import LoraSpec
from losskit.service.ordering import Sequencer
from losskit.service.settings import make_settings


class FakeHandle:
    def __init__(self, key):
        self.key = key
        self.log = []
        self.value = 0


class FakeBackend:
    def __init__(self):
        self.deleted = []

    def create(self, key, info, spec):
        return FakeHandle(key)

    def delete(self, handle):
        self.deleted.append(handle.key)


class FakeState:
    def expire(self):
        return []


def encode(value):
    return json.dumps(value).encode(), "application/json"


@pytest.fixture
def engine():
    eng = Engine(make_settings(seq_gap_timeout_s=0.3, future_ttl_s=60, max_pending_per_model=8), FakeBackend(),
                 None, FakeState())
    eng._infos["fake"] = object()
    eng.start()
    yield eng
    eng.stop()


def wait(engine, fut, timeout=10):
    assert engine.futures.wait_sync(fut, timeout), f"{fut.request_id} did not finish"
    if fut.error is not None:
        raise fut.error
    return json.loads(fut.body)


def model(engine, name="m"):
    session = engine.create_session("owner")
    fut = engine.create_model(session, f"{session.id}:native:{name}", "fake", LoraSpec.make(4, 0), encode)
    wait(engine, fut)
    return session, f"{session.id}:native:{name}"


def op(tag, units=1, fail_at=None, sleep=0.0):
    def make(handle, seq):
        def gen():
            for u in range(units):
                if fail_at == u:
                    raise ValueError(f"{tag} failed")
                time.sleep(sleep)
                handle.log.append((tag, u))
                yield
            return {"tag": tag, "log": len(handle.log)}
        return gen()
    return make


def test_requests_run_in_seq_order_whatever_the_arrival_order(engine):
    session, mid = model(engine)
    f3 = engine.submit(session, mid, 3, "h3", "c", op("c"), encode)
    f2 = engine.submit(session, mid, 2, "h2", "b", op("b"), encode)
    time.sleep(0.05)
    assert not f2.done and not f3.done  # both wait for seq 1
    f1 = engine.submit(session, mid, 1, "h1", "a", op("a"), encode)
    assert [wait(engine, f)["tag"] for f in (f1, f2, f3)] == ["a", "b", "c"]
    handle = engine.find_model(mid).handle
    assert [t for t, _ in handle.log] == ["a", "b", "c"]


def test_duplicate_seq_returns_the_same_future_and_runs_once(engine):
    session, mid = model(engine)
    f1 = engine.submit(session, mid, 1, "same", "a", op("a"), encode)
    again = engine.submit(session, mid, 1, "same", "a", op("a"), encode)
    assert again is f1
    wait(engine, f1)
    assert engine.submit(session, mid, 1, "same", "a", op("a"), encode) is f1
    assert engine.find_model(mid).handle.log == [("a", 0)]
    with pytest.raises(ServiceError) as info:
        engine.submit(session, mid, 1, "other", "a", op("a"), encode)
    assert info.value.code == "seq_conflict" and info.value.status == 400


def test_stale_and_far_ahead_seqs():
    seq = Sequencer(max_ahead=4, window=2)
    for s in (1, 2, 3):
        seq.add(s, f"r{s}", f"h{s}", s)
    assert seq.pop_ready() == [1, 2, 3]
    with pytest.raises(ServiceError) as info:
        seq.check(1, "h1")  # below the window of 2
    assert info.value.code == "seq_stale"
    assert seq.check(3, "h3") == "r3"
    with pytest.raises(ServiceError) as info:
        seq.check(9, "x")
    assert info.value.code == "queue_full" and info.value.status == 429 and info.value.headers["Retry-After"]
    assert seq.assign() == 4
    with pytest.raises(ServiceError, match="seq_id must be an int >= 1"):
        seq.check(0, "x")


def test_gap_timeout_fails_blocked_requests_and_moves_on(engine):
    session, mid = model(engine)
    f2 = engine.submit(session, mid, 2, "h2", "b", op("b"), encode)
    f3 = engine.submit(session, mid, 3, "h3", "c", op("c"), encode)
    with pytest.raises(ServiceError) as info:
        wait(engine, f2, timeout=5)
    assert info.value.code == "seq_gap_timeout" and "seq_id 1" in info.value.message
    with pytest.raises(ServiceError):
        wait(engine, f3, timeout=5)
    assert wait(engine, engine.submit(session, mid, 4, "h4", "d", op("d"), encode))["tag"] == "d"


def test_fair_ring_interleaves_one_unit_per_model(engine):
    sa, a = model(engine, "a")
    sb, b = model(engine, "b")
    fa = engine.submit(sa, a, 1, "ha", "long", op("A", units=6, sleep=0.01), encode)
    time.sleep(0.005)
    fb = engine.submit(sb, b, 1, "hb", "short", op("B", units=1), encode)
    wait(engine, fa), wait(engine, fb)
    events = [(e[1], e[0]) for e in engine.worker.events if e[2] in ("long", "short")]
    b_done = events.index((b, "done"))
    a_done = events.index((a, "done"))
    assert b_done < a_done  # B's one-unit request finishes while A's six-unit request is still running
    a_units_before_b = sum(1 for e in events[:b_done] if e == (a, "unit"))
    assert a_units_before_b <= 2


def test_failure_fails_the_future_and_the_queue_goes_on(engine):
    session, mid = model(engine)
    bad = engine.submit(session, mid, 1, "h1", "bad", op("bad", units=3, fail_at=1), encode)
    good = engine.submit(session, mid, 2, "h2", "good", op("good"), encode)
    with pytest.raises(ServiceError) as info:
        wait(engine, bad)
    assert info.value.code == "internal_error" and info.value.category == "server"
    assert "error id" in info.value.message and "bad failed" not in info.value.message  # no traceback leaks
    assert wait(engine, good)["tag"] == "good"


def test_user_errors_keep_their_code(engine):
    session, mid = model(engine)

    def make(handle, seq):
        return single_unit(lambda: (_ for _ in ()).throw(ServiceError("shape_mismatch", "rows differ")))

    fut = engine.submit(session, mid, 1, "h", "x", make, encode)
    with pytest.raises(ServiceError) as info:
        wait(engine, fut)
    assert info.value.code == "shape_mismatch" and info.value.category == "user"


def test_io_task_completes_after_io(engine):
    session, mid = model(engine)
    order = []

    def make(handle, seq):
        return single_unit(lambda: IOTask(lambda: order.append("io") or {"written": True}))

    assert wait(engine, engine.submit(session, mid, 1, "h", "save", make, encode)) == {"written": True}
    assert order == ["io"]


def test_closing_a_session_fails_pending_work_and_deletes_models(engine):
    session, mid = model(engine)
    running = engine.submit(session, mid, 1, "h1", "long", op("A", units=50, sleep=0.01), encode)
    queued = engine.submit(session, mid, 2, "h2", "next", op("B"), encode)
    blocked = engine.submit(session, mid, 5, "h5", "gap", op("C"), encode)
    time.sleep(0.05)
    engine.close_session(session)
    for fut in (running, queued, blocked):
        with pytest.raises(ServiceError) as info:
            wait(engine, fut)
        assert info.value.code == "session_closed"
    deadline = time.time() + 5
    while mid not in engine.backend.deleted and time.time() < deadline:
        time.sleep(0.01)
    assert engine.backend.deleted == [mid]
    with pytest.raises(ServiceError) as info:
        engine.session(session.id, "owner")
    assert info.value.code == "unknown_session"


def test_sessions_belong_to_their_owner(engine):
    session = engine.create_session("alice")
    with pytest.raises(ServiceError) as info:
        engine.session(session.id, "mallory")
    assert info.value.status == 404


def test_futures_are_owned_expire_to_410_and_repolls_are_identical():
    store = FuturesStore(ttl_s=0.2, budget_bytes=1 << 20)
    fut = store.create("alice", "x")
    store.complete(fut, b'{"a": 1}')
    assert store.get(fut.request_id, "alice").body == store.get(fut.request_id, "alice").body == b'{"a": 1}'
    with pytest.raises(ServiceError) as info:
        store.get(fut.request_id, "mallory")
    assert info.value.status == 404
    time.sleep(0.3)
    with pytest.raises(ServiceError) as info:
        store.get(fut.request_id, "alice")
    assert info.value.status == 410 and info.value.code == "future_expired"
    with pytest.raises(ServiceError) as info:
        store.get("req_unknown", "alice")
    assert info.value.status == 404


def test_future_budget_evicts_oldest_finished_and_refuses_pending_overflow():
    store = FuturesStore(ttl_s=60, budget_bytes=100)
    a, b = store.create("o", "x"), store.create("o", "x")
    store.complete(a, b"x" * 60)
    store.complete(b, b"y" * 60)  # over budget: a (oldest finished) goes
    with pytest.raises(ServiceError) as info:
        store.get(a.request_id, "o")
    assert info.value.code == "future_expired"
    assert store.get(b.request_id, "o").body == b"y" * 60
    store.create("o", "x", request_bytes=90)
    with pytest.raises(ServiceError) as info:
        store.create("o", "x", request_bytes=20)
    assert info.value.status == 429


def test_long_poll_waits_and_wakes_on_completion():
    store = FuturesStore(ttl_s=60, budget_bytes=1 << 20)
    fut = store.create("o", "x")

    async def poll(timeout):
        t = time.monotonic()
        done = await store.wait(fut, timeout)
        return done, time.monotonic() - t

    done, took = asyncio.run(poll(0.3))
    assert not done and 0.25 < took < 2
    threading.Timer(0.1, lambda: store.complete(fut, b"{}")).start()
    done, took = asyncio.run(poll(5))
    assert done and took < 2


def test_call_on_worker_runs_between_units(engine):
    assert engine.call_on_worker(lambda: threading.current_thread().name) == "losskit-device"
