"""The Tinker wire protocol through raw HTTP with SDK-encoded bodies, where a check needs it: ordering and
duplicates, seq gaps and stale seqs, long-poll, expiry, SDK chunking, auth, malformed input and a fuzz of the
protobuf route; and the SDK's own polling, chunking and auth errors."""

import json
import logging
import random
import threading
import time

import httpx
import pytest
import torch
from tinker.proto.request_conv import forward_backward_request_to_proto
from tinker.proto.response_conv import deserialize_forward_backward_output

from tests.service.tinker_sdk import sentence_data, service_client, shifted, tinker, training_client, types

KEY = {"X-API-Key": "tml-test"}
PROTOBUF = "application/x-protobuf"
ROW = list(b"ordering matters here")


def post(h, path, body, headers=KEY):
    return h.post(f"/api/v1/{path}", json=body, headers=headers)


def new_session(h, headers=KEY, **extra):
    r = h.post("/api/v1/create_session", headers={**headers, **extra},
               json={"tags": [], "user_metadata": {}, "sdk_version": "0.38.0", "type": "create_session"})
    assert r.status_code == 200, r.text
    return r.json()["session_id"]


def retrieve(h, request_id, headers=KEY):
    """Poll until the request is no longer pending; the final reply."""
    for _ in range(60):
        r = h.post("/api/v1/retrieve_future", json={"request_id": request_id, "allow_metadata_only": False},
                   headers={**headers, "Accept": PROTOBUF}, timeout=60)
        if r.headers["content-type"].startswith(PROTOBUF) or r.json().get("type") != "try_again":
            return r
    raise AssertionError("still pending")


def new_model(h, sid, seq=0, seed=0, rank=4):
    r = post(h, "create_model", {"session_id": sid, "model_seq_id": seq, "base_model": "losskit/tiny-lm",
                                 "lora_config": {"rank": rank, "seed": seed}, "type": "create_model"})
    assert r.status_code == 200, r.text
    assert retrieve(h, r.json()["request_id"]).json()["model_id"] == r.json()["model_id"]
    return r.json()["model_id"]


def fb_body(model_id, seq, data=None, loss_fn="cross_entropy", forward_only=False) -> bytes:
    data = data or [shifted(ROW)]
    req = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn=loss_fn), model_id=model_id, seq_id=seq)
    msg = forward_backward_request_to_proto(req)
    msg.forward_only = forward_only
    return msg.SerializeToString()


def post_fb(h, body, headers=KEY, ctype=PROTOBUF):
    return h.post("/api/v1/forward_backward", content=body, headers={**headers, "content-type": ctype})


def optim(h, model_id, seq, lr=1e-3):
    return post(h, "optim_step", {"model_id": model_id, "seq_id": seq, "adam_params": {"learning_rate": lr},
                                  "type": "optim_step"})


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as h:
        yield h


@pytest.fixture(scope="module")
def small(start_server):
    """Small limits: 2 datums per request, 0.25 MiB bodies, a 2 s seq gap, a 1 s long-poll, 2 s results."""
    return start_server(max_datums_per_request=2, max_request_mb=0.25, seq_gap_timeout_s=2.0, long_poll_s=1.0,
                        future_ttl_s=2.0)


# ---- ordering and duplicates ----------------------------------------------------------------------------------
def test_optim_step_sent_first_runs_after_its_forward_backward(server, http):
    mid = new_model(http, new_session(http))
    step = optim(http, mid, 2)
    assert step.status_code == 200
    fb = post_fb(http, fb_body(mid, 1))
    assert fb.status_code == 200 and fb.json()["model_id"] == mid
    out = deserialize_forward_backward_output(retrieve(http, fb.json()["request_id"]).content)
    assert out.metrics["loss:sum"] > 0
    metrics = retrieve(http, step.json()["request_id"]).json()["metrics"]
    assert metrics["grad_norm"] > 0  # it saw the gradients of seq 1
    assert all(g is None for g in server.engine.debug_gradients(mid).values())


def test_identical_resend_runs_once_and_a_different_body_conflicts(server, http):
    sid = new_session(http)
    once, twice = new_model(http, sid, 0), new_model(http, sid, 1)
    body = fb_body(twice, 1)
    first, second = post_fb(http, body), post_fb(http, body)
    assert first.json()["request_id"] == second.json()["request_id"]
    done = retrieve(http, first.json()["request_id"])
    assert post_fb(http, body).json()["request_id"] == first.json()["request_id"]  # after completion too
    again = retrieve(http, first.json()["request_id"])
    assert again.content == done.content  # the stored bytes, re-polled
    retrieve(http, post_fb(http, fb_body(once, 1)).json()["request_id"])
    for a, b in zip(server.engine.debug_gradients(once).values(), server.engine.debug_gradients(twice).values()):
        assert torch.equal(a, b)  # accumulated once
    conflict = post_fb(http, fb_body(twice, 1, [shifted(ROW[:-1])]))
    assert conflict.status_code == 400 and conflict.json()["code"] == "seq_conflict"


def test_rejected_requests_consume_their_seq(http):
    mid = new_model(http, new_session(http))
    bad = post_fb(http, fb_body(mid, 1, loss_fn="dro"))
    assert bad.status_code == 400 and bad.json()["code"] == "loss_input_missing"
    ok = post_fb(http, fb_body(mid, 2))
    assert retrieve(http, ok.json()["request_id"]).headers["content-type"].startswith(PROTOBUF)


def test_seq_gap_times_out_then_the_late_seq_is_stale_and_pending_answers_try_again(small):
    with httpx.Client(base_url=small.url, timeout=60) as h:
        mid = new_model(h, new_session(h))
        blocked = post_fb(h, fb_body(mid, 2)).json()["request_id"]
        start = time.monotonic()
        r = h.post("/api/v1/retrieve_future", json={"request_id": blocked}, headers=KEY)
        waited = time.monotonic() - start
        assert r.json() == {"type": "try_again", "request_id": blocked, "queue_state": "active"}
        assert 0.8 < waited < 1.8  # a long-poll of --long-poll-s 1, not an instant answer
        failed = retrieve(h, blocked).json()
        assert failed["code"] == "seq_gap_timeout" and "seq_id 1" in failed["error"]
        assert failed["category"] == "user"
        late = post_fb(h, fb_body(mid, 1))
        assert late.status_code == 400 and late.json()["code"] == "seq_stale"
        ok = post_fb(h, fb_body(mid, 3)).json()["request_id"]
        first, second = retrieve(h, ok), retrieve(h, ok)
        assert first.content == second.content  # identical bytes within the TTL
        time.sleep(2.6)
        gone = h.post("/api/v1/retrieve_future", json={"request_id": ok}, headers=KEY)
        assert gone.status_code == 410 and gone.json()["code"] == "future_expired"


def test_the_sdk_long_polls_about_once_a_second(small, caplog):
    with service_client(small.url) as sdk:
        tc = training_client(sdk, rank=4)
        busy = threading.Thread(target=small.engine.call_on_worker, args=(lambda: time.sleep(3.5),))
        busy.start()
        time.sleep(0.1)
        with caplog.at_level(logging.WARNING, logger="tinker.lib.api_future_impl"):
            start = time.monotonic()
            tc.forward([shifted(ROW)], "cross_entropy").result(60)
            elapsed = time.monotonic() - start
        busy.join()
    polls = [r for r in caplog.records if "try_again" in r.getMessage()]
    assert elapsed > 3.0 and 2 <= len(polls) <= 5, (elapsed, len(polls))


def test_sdk_chunking_gives_the_gradients_of_one_request(small, server):
    data = sentence_data()[:5]
    grads = []
    for srv in (small, server):
        with service_client(srv.url) as sdk:
            tc = training_client(sdk, seed=4)
            out = tc.forward_backward(data, "cross_entropy").result(60)
            assert len(out.loss_fn_outputs) == 5
            grads.append(srv.engine.debug_gradients(tc.model_id))
            chunks = srv.engine.find_model(tc.model_id).seq.next_seq - 1
            assert chunks == (3 if srv is small else 1)  # 2 + 2 + 1 datums under --max-datums-per-request 2
    for key, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][key], atol=1e-6, rtol=1e-5)
    with httpx.Client(base_url=small.url, timeout=60) as h:
        mid = new_model(h, new_session(h))
        r = post_fb(h, fb_body(mid, 1, data))
        assert r.status_code == 400 and "--max-datums-per-request" in r.json()["error"]


# ---- auth -----------------------------------------------------------------------------------------------------
ROUTES = [("POST", p) for p in (
    "client/config", "client/dynamic_config", "create_session", "session_heartbeat", "telemetry", "sessions/x/finish",
    "create_model", "get_info", "forward_backward", "optim_step", "save_weights", "save_weights_for_sampler",
    "load_weights", "create_sampling_session", "asample", "create_custom_loss", "retrieve_future", "cancel_future",
    "weights_info", "save_weights_external", "copy_weights", "join_sampling_session", "retrieve_futures",
    "auth/token")] + [("GET", p) for p in ("get_server_capabilities", "samplers/x", "training_runs/x",
                                         "training_runs/x/checkpoints")]


def _json_error(r):
    body = r.json()
    assert isinstance(body.get("error"), str) and body["error"], r.text
    assert body.get("category") in ("user", "server"), r.text
    return body


def test_every_route_needs_the_key(start_server):
    srv = start_server(api_key=["tml-secret"])
    with httpx.Client(base_url=srv.url, timeout=30) as h:
        for method, path in ROUTES:
            for headers in ({}, {"X-API-Key": "tml-wrong"}):
                r = h.request(method, f"/api/v1/{path}", json={}, headers=headers)
                assert r.status_code == 401 and _json_error(r)["code"] == "unauthorized", (method, path)
        assert h.get("/api/v1/healthz").json() == {"status": "ok"}
        assert new_session(h, {"X-API-Key": "tml-secret"}).startswith("sess_")
    with pytest.raises(tinker.AuthenticationError), service_client(srv.url, api_key="tml-wrong") as sdk:
        sdk.create_lora_training_client("losskit/tiny-lm", rank=4).result(60)


# ---- malformed input ----------------------------------------------------------------------------------------
def test_malformed_input_gets_named_4xx(small):
    with httpx.Client(base_url=small.url, timeout=30) as h:
        mid = new_model(h, new_session(h))
        r = post_fb(h, b"\x0a\xff\xff\xff garbage")
        assert r.status_code == 400 and r.json()["code"] == "invalid_protobuf"
        r = post_fb(h, json.dumps({"model_id": mid}).encode(), ctype="application/json")
        assert r.status_code == 415 and r.json()["code"] == "unsupported_media_type"
        r = post_fb(h, b"\0" * (300 * 1024))
        assert r.status_code == 413 and r.json()["code"] == "payload_too_large"
        r = post_fb(h, fb_body(mid, 1, [shifted([1, 2, 300])]))
        assert r.status_code == 400 and r.json()["code"] == "token_out_of_range"
        r = h.post("/api/v1/create_model", content=b"{broken", headers={**KEY, "content-type": "application/json"})
        assert r.status_code == 400 and r.json()["code"] == "invalid_json"
        r = post(h, "create_model", {"session_id": "sess_x", "model_seq_id": 0})
        assert r.status_code == 400 and "'base_model'" in r.json()["error"]
        r = h.post("/api/v1/create_model", content=b"\x08\x01", headers={**KEY, "content-type": PROTOBUF})
        assert r.status_code == 415
        r = post(h, "get_info", {"model_id": "sess_nope:train:0"})
        assert r.status_code == 404 and _json_error(r)
        r = post(h, "retrieve_future", {"request_id": "req_" + "0" * 32})
        assert r.status_code == 404 and r.json()["code"] == "not_found"
        for path in ("tinker://../weights/x", "tinker://run/weights/a/b", "file:///etc/passwd"):
            r = post(h, "load_weights", {"model_id": mid, "seq_id": 1, "path": path, "optimizer": False})
            assert r.status_code == 400 and "tinker://" in r.json()["error"], path


def test_random_and_truncated_protobuf_bodies_always_get_json_4xx(small):
    """Every body a protobuf route can be sent, mangled: each strict prefix of a valid request, random bytes, bit
    flips; the same through Content-Encoding zstd (prefixes of the compressed frame, random frames, a bomb); and
    random protobuf-typed bytes on every JSON route. A fixed number of requests, each with a timeout."""
    import zstandard

    rng = random.Random(0)
    start = time.monotonic()
    with httpx.Client(base_url=small.url, timeout=30) as h:
        mid = new_model(h, new_session(h))
        valid = fb_body(mid, 1, [shifted(ROW), shifted(list(b"second datum"))])
        bodies = [valid[:n] for n in range(len(valid))]  # every strict prefix
        bodies += [bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 300))) for _ in range(150)]
        flipped = []
        for _ in range(100):
            b = bytearray(valid)
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            flipped.append(bytes(b))
        sent = 0
        for body in bodies + flipped:
            r = post_fb(h, body)
            sent += 1
            if body in flipped and r.status_code == 200:
                continue  # a flip inside a token or weight can leave a valid request
            assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
            _json_error(r)

        zstd = {**KEY, "content-encoding": "zstd"}
        frame = zstandard.ZstdCompressor().compress(valid)
        mangled = [frame[:n] for n in range(0, len(frame), 3)]
        mangled += [b"\x28\xb5\x2f\xfd" + rng.randbytes(rng.randrange(1, 200)) for _ in range(40)]  # zstd magic
        mangled += [rng.randbytes(64) for _ in range(20)]
        for body in mangled:
            r = post_fb(h, body, headers=zstd)
            sent += 1
            assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
            _json_error(r)
        bomb = zstandard.ZstdCompressor().compress(b"\0" * (2 * 2**20))  # 2 MiB > --max-request-mb 0.25
        r = post_fb(h, bomb, headers=zstd)
        assert r.status_code == 413 and _json_error(r)["code"] == "payload_too_large"
        compressed = post_fb(h, zstandard.ZstdCompressor().compress(fb_body(mid, 2)), headers=zstd)
        assert compressed.status_code == 200, compressed.text  # a well-formed compressed request is accepted
        r = post_fb(h, valid, headers={**KEY, "content-encoding": "br"})
        assert r.status_code == 415 and _json_error(r)

        for method, path in ROUTES:
            if method == "POST" and path != "forward_backward":
                for body in (rng.randbytes(64), valid[: len(valid) // 2]):
                    r = h.post(f"/api/v1/{path}", content=body, headers={**KEY, "content-type": PROTOBUF})
                    sent += 1
                    assert 400 <= r.status_code < 500 and _json_error(r), path
    assert sent > 400 and time.monotonic() - start < 60  # bounded: a few seconds on two cores


def test_every_route_answers_json_errors(small):
    with httpx.Client(base_url=small.url, timeout=30) as h:
        for method, path in ROUTES + [("GET", "nope"), ("DELETE", "training_runs/x/checkpoints/weights/y")]:
            for body in (None, b"", b"{}", b"[]", b'{"session_id": 5, "model_id": "sess_x:train:0"}'):
                r = h.request(method, f"/api/v1/{path}", content=body,
                              headers={**KEY, "content-type": "application/json"})
                assert r.status_code != 500, (method, path, r.text)
                if r.status_code >= 400:
                    _json_error(r)


# ---- sessions -----------------------------------------------------------------------------------------------
def test_session_idempotency_heartbeat_and_finish(http):
    key = {"X-Idempotency-Key": "stainless-python-retry-abc"}
    sid = new_session(http, KEY, **key)
    assert new_session(http, KEY, **key) == sid  # a retried create_session gets the same session
    assert new_session(http) != sid
    hb = post(http, "session_heartbeat", {"session_id": sid, "type": "session_heartbeat"})
    assert hb.json() == {"type": "session_heartbeat"}
    assert post(http, f"sessions/{sid}/finish", {"reason": {"type": "success"}, "detail": None}).json() == {}
    assert post(http, f"sessions/{sid}/finish", {"reason": {"type": "success"}}).json() == {}  # first finish wins
    gone = post(http, "session_heartbeat", {"session_id": sid, "type": "session_heartbeat"})
    assert gone.status_code == 410 and gone.json()["code"] == "session_closed"
    assert post(http, "create_model", {"session_id": sid, "model_seq_id": 0, "base_model": "losskit/tiny-lm"}) \
        .status_code == 404
    config = post(http, "client/config", {"sdk_version": "0.38.0"}).json()
    assert config["custom_loss_server_side"] is True and config["pjwt_auth_enabled"] is False
    old = http.post("/api/v1/create_session", headers=KEY,
                    json={"tags": [], "user_metadata": None, "sdk_version": "0.37.1", "type": "create_session"})
    assert "tinker>=0.38,<0.39" in old.json()["warning_message"]


# ---- optimizers and cancellation ------------------------------------------------------------------------------
def test_only_adamw_is_accepted(http):
    sid = new_session(http)
    mid = new_model(http, sid)
    r = post(http, "optim_step", {"model_id": mid, "seq_id": 1, "optimizer_params": {"type": "dimuon"},
                                  "type": "optim_step"})
    assert r.status_code == 400 and r.json()["code"] == "unsupported_optimizer" and "AdamParams" in r.json()["error"]
    r = post(http, "create_model", {"session_id": sid, "model_seq_id": 1, "base_model": "losskit/tiny-lm",
                                    "optimizer_config": {"type": "dimuon", "version": 1}, "type": "create_model"})
    assert r.status_code == 400 and r.json()["code"] == "unsupported_optimizer" and "adamw" in r.json()["error"]
    ok = retrieve(http, optim(http, mid, 2).json()["request_id"]).json()  # seq 1 was used by the refusal
    assert ok["metrics"]["learning_rate"] == pytest.approx(1e-3)


def test_a_sample_that_has_not_started_can_be_cancelled(server, http):
    sid = new_session(http)
    sampler = post(http, "create_sampling_session", {"session_id": sid, "sampling_session_seq_id": 0,
                                                     "base_model": "losskit/tiny-lm",
                                                     "type": "create_sampling_session"}).json()["sampling_session_id"]
    assert sampler == f"{sid}:sample:0"
    gate = threading.Event()
    busy = threading.Thread(target=server.engine.call_on_worker, args=(lambda: gate.wait(30),))
    busy.start()  # hold the device worker so the sample cannot start
    try:
        body = {"num_samples": 2, "prompt": {"chunks": [{"type": "encoded_text", "tokens": ROW}]},
                "sampling_params": {"max_tokens": 4}, "sampling_session_id": sampler, "seq_id": 0, "type": "sample"}
        sub = post(http, "asample", body).json()
        assert sub["sample_sequence_ids"] == [f"{sampler}:0:0", f"{sampler}:0:1"]
        assert post(http, "cancel_future", {"request_id": sub["request_id"]}).json() == {}
    finally:
        gate.set()
        busy.join()
    failed = retrieve(http, sub["request_id"]).json()
    assert failed["code"] == "cancelled" and failed["category"] == "user"
    mid = new_model(http, sid)
    r = post(http, "cancel_future", {"request_id": optim(http, mid, 1).json()["request_id"]})
    assert r.status_code == 400 and r.json()["code"] == "unsupported_feature"
