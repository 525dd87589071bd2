"""Concurrency (two sessions in parallel, the one-unit fairness bound) and sampling parameters."""

import math
import time

import pytest

from losskit.client import TinkerClient
from tests.service.conftest import DATA_A, DATA_B, check_parallel_equals_alone, internal_id


def _train(server, alias, data, steps, out):
    """Train one model in its own session; record its final adapter and its optimizer's parameters."""
    with TinkerClient(server.url) as c:
        model = c.create_model(alias, rank=8, seed=3)
        for _ in range(steps):
            c.forward_backward(model, data, "cross_entropy")
            c.optim_step(model, learning_rate=1e-3)
        mid = internal_id(c, model)
        state = server.engine.find_model(mid)
        opt = server.engine.optimizer_of(mid)
        out[alias] = {
            "adapter": server.engine.adapter_state(mid),
            "params": {id(p) for p in state.handle.params},
            "optimizer": {id(p) for g in opt.param_groups for p in g["params"]},
        }


@pytest.mark.slow
def test_two_sessions_in_parallel_equal_training_alone(server):
    check_parallel_equals_alone(lambda alias, data, steps, out: _train(server, alias, data, steps, out),
                                {"a": DATA_A, "b": DATA_B})


def test_one_model_waits_at_most_a_unit(start_server):
    srv = start_server(max_tokens_per_step=64)
    with TinkerClient(srv.url) as a, TinkerClient(srv.url) as b:
        ma = a.create_model("a", rank=4, seed=0)
        mb = b.create_model("b", rank=4, seed=0)
        b.forward_backward(mb, [[1, 2, 3]], "cross_entropy")
        rows = [list(range(65)) for _ in range(64)]  # 64 micro-batches of one 64-token row
        long = a.forward_backward_async(ma, rows, "cross_entropy")
        lane_a = internal_id(a, ma)
        lane_b = internal_id(b, mb)
        events = srv.engine.worker.events
        deadline = time.monotonic() + 60
        while not any(e[0] == "unit" and e[1] == lane_a and e[2] == "forward_backward" for e in list(events)):
            assert time.monotonic() < deadline
            time.sleep(0.001)
        step = b.optim_step(mb)
        assert step["metrics"]["grad_norm"] > 0
        long.result(120)
        log = [e for e in list(events) if e[1] in (lane_a, lane_b)]
        a_done = next(i for i, e in enumerate(log) if e[0] == "done" and e[1] == lane_a and e[2] == "forward_backward")
        b_done = next(i for i, e in enumerate(log) if e[0] == "done" and e[1] == lane_b and e[2] == "optim_step")
        assert b_done < a_done  # B's step did not wait for A's 64-unit request
        a_units = [e for e in log[:a_done] if e[0] == "unit" and e[1] == lane_a and e[2] == "forward_backward"]
        assert len(a_units) == 64  # one unit per micro-batch


def test_sampling_parameters(client):
    model = client.create_model("s", rank=4, seed=0)
    prompt = list(b"Sampling: ")
    greedy = client.sample(model, prompt, max_tokens=12, temperature=0.0)["sequences"][0]
    top1 = client.sample(model, prompt, max_tokens=12, top_k=1, seed=7)["sequences"][0]
    assert top1["tokens"] == greedy["tokens"] and all(lp == 0.0 for lp in top1["logprobs"])
    assert greedy["stop_reason"] == "length" and len(greedy["tokens"]) == 12
    s1 = client.sample(model, prompt, 3, max_tokens=10, seed=11, top_p=0.9)
    s2 = client.sample(model, prompt, 3, max_tokens=10, seed=11, top_p=0.9)
    assert s1["sequences"] == s2["sequences"]
    many = client.sample(model, prompt, 16, max_tokens=96, seed=0, stop=[258])["sequences"]
    stopped = [s for s in many if s["stop_reason"] == "stop"]
    assert stopped and all(s["tokens"][-1] == 258 for s in stopped)
    assert all(len(s["tokens"]) == 96 and 258 not in s["tokens"] for s in many if s["stop_reason"] == "length")
    dots = client.sample(model, prompt, 16, max_tokens=96, seed=1, stop=["."])["sequences"]
    dotted = [s for s in dots if s["stop_reason"] == "stop"]
    assert dotted and all(s["tokens"][-1] == ord(".") and "." in s["text"] for s in dotted)
    none = client.sample(model, prompt, 2, max_tokens=40, seed=0, stop=[])["sequences"]
    assert all(s["stop_reason"] == "length" and len(s["tokens"]) == 40 for s in none)

    with_prompt = client.sample(model, prompt, max_tokens=1, prompt_logprobs=True, topk_prompt_logprobs=3)
    plp = with_prompt["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(prompt)  # NaN on the wire is null
    forward = client.forward(model, [prompt], "cross_entropy")["loss_fn_outputs"][0]["logprobs"]
    assert max(abs(a - b) for a, b in zip(plp[1:], forward)) < 1e-5
    assert with_prompt["topk_prompt_logprobs"][0] is None and len(with_prompt["topk_prompt_logprobs"][1]) == 3
    last = client.sample(model, prompt, max_tokens=1, prompt_logprobs=True, prompt_logprobs_last_n=3)
    assert last["prompt_logprobs"][:-3] == [None] * (len(prompt) - 3)
    assert max(abs(a - b) for a, b in zip(last["prompt_logprobs"][-3:], forward[-3:])) < 1e-5
    text = client.sample(model, "Hello", max_tokens=5, temperature=0.0)["sequences"][0]
    assert isinstance(text["text"], str) and len(text["tokens"]) == 5
    base = client.sample(None, prompt, base_model="losskit/tiny-lm", max_tokens=5, temperature=0.0)
    assert base["sequences"][0]["tokens"] == greedy["tokens"][:5]  # a fresh adapter is the base model (B = 0)
    assert all(math.isfinite(x) for x in greedy["logprobs"])
