"""Sessions through the unmodified Tinker SDK: client config, create_session, the heartbeat (the SDK's own call),
telemetry (accepted; logged with ``--telemetry-log``), finish (unloads the session's models), server capabilities,
and concurrency: two SDK clients training in parallel equal training alone, and the one-unit fairness bound."""

import asyncio
import json
import time

import pytest
from tinker._client import AsyncTinker

from tests.service.conftest import DATA_A, DATA_B, check_parallel_equals_alone
from tests.service.tinker_sdk import service_client, shifted, tinker, training_client, types

#: The two models' data, pre-shifted as the SDK takes it.
SDK_DATA = {"a": [shifted(t) for t in DATA_A], "b": [shifted(t) for t in DATA_B]}


def test_session_lifecycle_through_the_sdk(server):
    with service_client(server.url) as sdk:
        caps = tinker.RestClient(base_url=server.url, api_key="tml-test").get_server_capabilities().result(60)
        tiny = next(m for m in caps.supported_models if m.model_name == "losskit/tiny-lm")
        assert tiny.max_context_length == 1024
        sid = sdk.holder.get_session_id()
        assert sid.startswith("sess_") and len(sid) == 27
        tc = training_client(sdk, rank=4)
        assert tc.model_id == f"{sid}:train:0"  # the SDK's own scheme
        assert tc.get_info().model_data.tokenizer_id.count(":") == 0

        async def heartbeat():  # the call of the SDK's heartbeat loop, made now instead of after 10 s
            client = AsyncTinker(base_url=server.url, api_key="tml-test")
            try:
                return await client.service.session_heartbeat(session_id=sid, max_retries=0, timeout=10)
            finally:
                await client.close()

        assert asyncio.run(heartbeat()).type == "session_heartbeat"
        assert tc.model_id in server.engine.models
    assert sid not in server.engine.sessions  # close() finished the session ...
    assert tc.model_id not in server.engine.models  # ... and unloaded its model
    with pytest.raises(tinker.APIStatusError) as info:
        asyncio.run(heartbeat())
    assert info.value.status_code == 410  # the status that stops the SDK's heartbeat loop


def test_telemetry_is_accepted_and_logged_on_request(start_server, tmp_path, monkeypatch):
    log = tmp_path / "telemetry.jsonl"
    srv = start_server(telemetry_log=str(log))
    monkeypatch.setenv("TINKER_TELEMETRY", "1")
    with service_client(srv.url) as sdk:
        sid = sdk.holder.get_session_id()
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert events and all(e["owner"] and e["session_id"] == sid for e in events)
    assert any(ev.get("event") == "SESSION_START" for e in events for ev in e["events"])


def _train(url, engine, data, steps, out, key):
    with service_client(url) as sdk:
        tc = training_client(sdk, seed=3)
        for _ in range(steps):
            tc.forward_backward(data, "cross_entropy")
            tc.optim_step(types.AdamParams(learning_rate=1e-3)).result(60)
        state = engine.find_model(tc.model_id)
        opt = engine.optimizer_of(tc.model_id)
        out[key] = {"adapter": engine.adapter_state(tc.model_id), "params": {id(p) for p in state.handle.params},
                    "optimizer": {id(p) for g in opt.param_groups for p in g["params"]}}


def test_two_sdk_clients_in_parallel_equal_training_alone(server):
    check_parallel_equals_alone(lambda key, data, steps, out: _train(server.url, server.engine, data, steps, out, key),
                                SDK_DATA)


def test_one_model_waits_at_most_a_unit(start_server):
    srv = start_server(max_tokens_per_step=64)
    with service_client(srv.url) as a, service_client(srv.url) as b:
        ta, tb = training_client(a, rank=4), training_client(b, rank=4)
        tb.forward_backward([shifted([1, 2, 3, 4])], "cross_entropy").result(60)
        long = ta.forward_backward([shifted(list(range(65))) for _ in range(64)], "cross_entropy")
        events = srv.engine.worker.events
        deadline = time.monotonic() + 60
        while not any(e[0] == "unit" and e[1] == ta.model_id and e[2] == "forward_backward" for e in list(events)):
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert tb.optim_step(types.AdamParams(learning_rate=1e-3)).result(60).metrics["grad_norm"] > 0
        long.result(120)
        log = [e for e in list(events) if e[1] in (ta.model_id, tb.model_id)]
        a_done = next(i for i, e in enumerate(log) if e[:3] == ("done", ta.model_id, "forward_backward"))
        b_done = next(i for i, e in enumerate(log) if e[:3] == ("done", tb.model_id, "optim_step"))
        assert b_done < a_done  # B's step did not wait for A's 64-unit request
        units = [e for e in log[:a_done] if e[:3] == ("unit", ta.model_id, "forward_backward")]
        assert len(units) == 64  # one unit per micro-batch of one 64-token row
