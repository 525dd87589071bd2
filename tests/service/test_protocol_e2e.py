"""The wire protocol through raw HTTP: ordering and duplicates, futures and long-poll, auth, malformed input."""

import json
import time

import httpx
import pytest
import torch

from losskit.client import RequestFailed, TinkerClient

ROW = list(b"ordering matters here")


def _session(h):
    sid = h.post("/v1/sessions", json={}).json()["session_id"]
    return {"X-Losskit-Session": sid}


def _model(h, headers, alias, seed=0):
    r = h.post("/v1/models", json={"model_id": alias, "rank": 4, "seed": seed, "wait_s": 20}, headers=headers)
    assert r.status_code == 200 and r.json()["status"] == "complete", r.text
    return f"{headers['X-Losskit-Session']}:native:{alias}"


def _post(h, path, body, headers, **kw):
    return h.post(path, content=json.dumps(body).encode(), headers={**headers, "content-type": "application/json"},
                  **kw)


def _result(h, headers, request_id):
    r = h.post("/v1/retrieve_future", json={"request_id": request_id, "timeout_s": 20}, headers=headers)
    assert r.status_code == 200
    return r.json()


def test_optim_step_sent_first_runs_after_its_forward_backward(server, http):
    headers = _session(http)
    mid = _model(http, headers, "o")
    step = _post(http, "/v1/optim_step", {"model_id": "o", "seq_id": 2, "adam_params": {"learning_rate": 1e-3}},
                 headers)
    assert step.status_code == 202
    fb = _post(http, "/v1/forward_backward", {"model_id": "o", "seq_id": 1, "data": [ROW], "wait_s": 20}, headers)
    assert fb.json()["status"] == "complete"
    metrics = _result(http, headers, step.json()["request_id"])["result"]["metrics"]
    assert metrics["grad_norm"] > 0  # it saw the gradients of seq 1
    assert all(g is None for g in server.engine.debug_gradients(mid).values())


def test_identical_resend_runs_once_and_a_different_body_conflicts(server, http):
    headers = _session(http)
    once = _model(http, headers, "once")
    twice = _model(http, headers, "twice")
    body = {"model_id": "twice", "seq_id": 1, "data": [ROW]}
    first = _post(http, "/v1/forward_backward", body, headers)
    second = _post(http, "/v1/forward_backward", body, headers)
    assert first.status_code == second.status_code == 202
    assert first.json()["request_id"] == second.json()["request_id"]
    _result(http, headers, first.json()["request_id"])
    third = _post(http, "/v1/forward_backward", body, headers)  # after completion too
    assert third.json()["request_id"] == first.json()["request_id"]
    _post(http, "/v1/forward_backward", {**body, "model_id": "once", "wait_s": 20}, headers)
    g_once, g_twice = server.engine.debug_gradients(once), server.engine.debug_gradients(twice)
    for a, b in zip(g_once.values(), g_twice.values()):
        assert torch.equal(a, b)  # accumulated once
    conflict = _post(http, "/v1/forward_backward", {**body, "data": [ROW[:-1]]}, headers)
    assert conflict.status_code == 400 and conflict.json()["code"] == "seq_conflict"


def test_rejected_requests_consume_their_seq(http):
    headers = _session(http)
    _model(http, headers, "r")
    bad = _post(http, "/v1/forward_backward", {"model_id": "r", "seq_id": 1, "data": [ROW], "loss_fn": "dro"},
                headers)
    assert bad.status_code == 400
    ok = _post(http, "/v1/forward_backward", {"model_id": "r", "seq_id": 2, "data": [ROW], "wait_s": 20}, headers)
    assert ok.json()["status"] == "complete"


@pytest.fixture(scope="module")
def tight(start_server):
    return start_server(seq_gap_timeout_s=2, future_ttl_s=1.5, long_poll_s=1)


def test_seq_gap_times_out(tight):
    with httpx.Client(base_url=tight.url, timeout=30) as h:
        headers = _session(h)
        _model(h, headers, "gap")
        blocked = _post(h, "/v1/optim_step", {"model_id": "gap", "seq_id": 2}, headers).json()["request_id"]
        start = time.monotonic()
        while True:
            reply = _result(h, headers, blocked)
            if reply["status"] != "pending":
                break
            assert time.monotonic() - start < 15
        assert reply["status"] == "failed" and reply["code"] == "seq_gap_timeout" and "seq_id 1" in reply["error"]
        assert 1.5 < time.monotonic() - start < 15


def _slow_work(h, headers, alias):
    rows = [list(range(256)) * 2 for _ in range(32)]
    return [_post(h, "/v1/forward_backward", {"model_id": alias, "seq_id": i, "data": rows}, headers).json()
            for i in (1, 2, 3)]


def test_futures_long_poll_repoll_and_expiry(tight):
    with httpx.Client(base_url=tight.url, timeout=30) as h:
        headers = _session(h)
        _model(h, headers, "f")
        submitted = _slow_work(h, headers, "f")
        last = submitted[-1]["request_id"]
        start = time.monotonic()
        pending = h.post("/v1/retrieve_future", json={"request_id": last, "timeout_s": 25}, headers=headers)
        took = time.monotonic() - start
        assert pending.json() == {"status": "pending", "request_id": last}
        assert 0.8 < took < 5  # the long poll waited --long-poll-s, not 25 s and not 0
        wait = _post(h, "/v1/optim_step", {"model_id": "f", "seq_id": 4, "wait_s": 0.1}, headers)
        assert wait.status_code == 202 and wait.json()["request_id"]  # never a fake success
        done = None
        while done is None or done.json()["status"] == "pending":
            done = h.post("/v1/retrieve_future", json={"request_id": last, "timeout_s": 25}, headers=headers)
        again = h.post("/v1/retrieve_future", json={"request_id": last, "timeout_s": 25}, headers=headers)
        assert done.content == again.content and done.json()["status"] == "complete"
        time.sleep(2.0)
        expired = h.post("/v1/retrieve_future", json={"request_id": last, "timeout_s": 1}, headers=headers)
        assert expired.status_code == 410 and expired.json()["code"] == "future_expired"
        unknown = h.post("/v1/retrieve_future", json={"request_id": "req_nope", "timeout_s": 1}, headers=headers)
        assert unknown.status_code == 404


def test_foreign_futures_are_unknown(http):
    a, b = _session(http), _session(http)
    _model(http, a, "x")
    rid = _post(http, "/v1/optim_step", {"model_id": "x", "seq_id": 1}, a).json()["request_id"]
    reply = http.post("/v1/retrieve_future", json={"request_id": rid, "timeout_s": 1}, headers=b)
    assert reply.status_code == 404 and reply.json()["category"] == "user"


def _all_routes(server):
    out = []
    for route in server.app.fastapi.routes:
        for method in sorted(getattr(route, "methods", ()) or ()):
            if method == "HEAD":
                continue
            out.append((method, route.path.replace("{session_id}", "sess_x").replace("{model_id}", "m")
                        .replace("{name}", "n")))
    return out


def test_auth_is_required_everywhere_but_health(start_server):
    secured = start_server(api_key=["tml-secret"])
    with httpx.Client(base_url=secured.url, timeout=30) as h:
        assert h.get("/healthz").status_code == 200
        for method, path in _all_routes(secured):
            if path == "/healthz":
                continue
            for headers in ({}, {"X-API-Key": "tml-wrong"}, {"Authorization": "Bearer tml-wrong"}):
                reply = h.request(method, path, headers=headers, json={})
                assert reply.status_code == 401, (method, path, reply.status_code)
                body = reply.json()
                assert body["code"] == "unauthorized" and body["category"] == "user"
        ok = h.get("/v1/info", headers={"X-API-Key": "tml-secret"})
        assert ok.status_code == 200 and ok.json()["allow_pickled_code"] is False
        assert h.get("/v1/info", headers={"Authorization": "Bearer tml-secret"}).status_code == 200
    with pytest.raises(RequestFailed) as info:
        TinkerClient(secured.url, api_key="tml-wrong").list_loss_functions()
    assert info.value.status == 401
    with TinkerClient(secured.url, api_key="tml-secret") as c:
        assert "cross_entropy" in c.list_loss_functions()["available_loss_functions"]


def test_malformed_input_gets_named_400s(server, http):
    headers = _session(http)
    _model(http, headers, "mal")
    broken = http.post("/v1/forward_backward", content=b'{"model_id": "mal", "data": [', headers={
        **headers, "content-type": "application/json"})
    assert broken.status_code == 400 and broken.json()["code"] == "invalid_json"
    missing = _post(http, "/v1/forward_backward", {"model_id": "mal"}, headers)
    assert missing.status_code == 400 and "'data'" in missing.json()["error"]
    extra = _post(http, "/v1/forward_backward", {"model_id": "mal", "data": [ROW], "bogus": 1}, headers)
    assert extra.status_code == 400 and "bogus" in extra.json()["error"]
    wrong_type = http.post("/v1/forward_backward", content=b"model_id=mal", headers={
        **headers, "content-type": "application/x-www-form-urlencoded"})
    assert wrong_type.status_code == 415 and wrong_type.json()["code"] == "unsupported_media_type"
    huge = http.post("/v1/forward_backward", content=b"[" + b"0," * (5 << 20) + b"0]", headers={
        **headers, "content-type": "application/json"})
    assert huge.status_code == 413 and huge.json()["code"] == "payload_too_large"
    vocab = _post(http, "/v1/forward_backward", {"model_id": "mal", "data": [ROW],
                                                 "loss_fn_inputs": {"target_tokens": [[999] * len(ROW)]}}, headers)
    assert vocab.status_code == 400 and vocab.json()["code"] == "token_out_of_range"
    bad_row = _post(http, "/v1/forward_backward", {"model_id": "mal", "data": [[300, 1]]}, headers)
    assert bad_row.status_code == 400 and bad_row.json()["code"] == "token_out_of_range"
    length = _post(http, "/v1/forward_backward", {"model_id": "mal", "data": [ROW],
                                                  "loss_fn_inputs": {"weights": [[1.0] * 3]}}, headers)
    assert length.status_code == 400 and "len(row) - 1" in length.json()["error"]
    no_session = _post(http, "/v1/optim_step", {"model_id": "mal"}, {})
    assert no_session.status_code == 400 and "X-Losskit-Session" in no_session.json()["error"]
    path = _post(http, "/v1/load_state", {"path": "tinker://../weights/x"}, headers)
    assert path.status_code == 400
    extra_part = _post(http, "/v1/load_state", {"path": "tinker://a/weights/x/y"}, headers)
    assert extra_part.status_code == 400
    assert http.get("/nope").status_code == 404 and http.delete("/healthz").status_code == 405


def test_every_error_reply_is_json_with_error_and_category(server, http):
    headers = _session(http)
    bodies = [None, b"", b"{", b"[]", b"null", b'{"model_id": 5}', b'{"request_id": []}', b"\xff\xfe"]
    for method, path in _all_routes(server):
        for body in bodies:
            for extra in ({}, headers):
                reply = http.request(method, path, content=body, headers={**extra, "content-type": "application/json"})
                if reply.status_code < 400:
                    continue
                assert reply.status_code != 500, (method, path, body, reply.text)
                data = reply.json()
                assert data["error"] and data["category"] in ("user", "server"), (method, path, body)


def test_health_info_and_metrics(server, http):
    assert http.get("/healthz").json()["status"] == "ok"
    info = http.get("/v1/info").json()
    assert info["surfaces"] == ["native", "tinker"] and info["allowlist_version"] == "1"
    assert info["models"][0]["model_name"] == "losskit/tiny-lm" and info["models"][0]["max_context_length"] == 1024
    text = http.get("/metrics").text
    assert "losskit_requests_total" in text and "losskit_request_seconds_bucket" in text
    assert "losskit_queue_depth" in text


def test_result_tensors_as_lists_or_b64_are_the_same_numbers(http):
    from losskit.service.tensors import decode_tensor

    headers = _session(http)
    _model(http, headers, "enc")
    body = {"model_id": "enc", "data": [ROW, ROW[:5]], "forward_only": True, "wait_s": 20}
    lists = _post(http, "/v1/forward", {**body, "seq_id": 1}, headers).json()["result"]["loss_fn_outputs"]
    b64 = _post(http, "/v1/forward", {**body, "seq_id": 2, "tensor_encoding": "b64"}, headers).json()
    outs = b64["result"]["loss_fn_outputs"]
    assert all(o["logprobs"]["dtype"] == "float32" and "b64" in o["logprobs"] for o in outs)
    assert [decode_tensor(o["logprobs"], "x").tolist() for o in outs] == [o["logprobs"] for o in lists]
