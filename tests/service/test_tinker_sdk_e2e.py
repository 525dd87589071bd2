"""The unmodified ``tinker`` SDK against a real ``losskit serve``: an SFT loop, an RL step with sampled logprobs,
custom losses (client-side callable, server-side graph) against the built-ins, and the sampling parameters."""

import itertools
import math

import pytest
import torch

from tests.service.tinker_sdk import (
    logprobs_of,
    sentence_data,
    service_client,
    shifted,
    tinker,
    training_client,
    types,
)


@pytest.fixture
def sdk(server):
    with service_client(server.url) as client:
        yield client


def _no_gradients(server, model_id) -> bool:
    return all(g is None for g in server.engine.debug_gradients(model_id).values())


def test_sft_loop_learns_and_forward_equals_forward_backward(sdk, server):
    tc = training_client(sdk)
    info = tc.get_info()
    assert info.model_data.model_name == "losskit/tiny-lm" and info.lora_rank == 8
    assert tc.get_tokenizer().encode("hi", add_special_tokens=False) == [104, 105]  # resolves offline
    data = sentence_data()
    per_token = []
    for _ in range(20):
        fb = tc.forward_backward(data, "cross_entropy")
        step = tc.optim_step(types.AdamParams(learning_rate=1e-3))  # pipelined: sent before fb finishes
        out, metrics = fb.result(60), step.result(60).metrics
        assert all(k.count(":") == 1 for k in out.metrics) and "loss:sum" in out.metrics
        assert [len(lp) for lp in logprobs_of(out)] == [d.model_input.length for d in data]
        assert metrics["grad_norm"] > 0 and metrics["learning_rate"] == pytest.approx(1e-3)
        per_token.append(out.metrics["loss:sum"] / out.metrics["weights:sum"])
    assert per_token[-1] <= 0.85 * per_token[0], per_token
    moving = [sum(per_token[i:i + 5]) / 5 for i in range(len(per_token) - 4)]
    assert all(b <= a + 1e-6 for a, b in itertools.pairwise(moving)), moving

    forward = tc.forward(data, "cross_entropy").result(60)
    assert _no_gradients(server, tc.model_id)  # forward accumulates nothing
    fb = tc.forward_backward(data, "cross_entropy").result(60)
    assert logprobs_of(forward) == logprobs_of(fb)  # bitwise: the same float32 values
    assert forward.metrics == fb.metrics
    assert not _no_gradients(server, tc.model_id)


def _rl_datums(prompt, sequences, key="logprobs"):
    data = []
    for i, seq in enumerate(sequences):
        full = prompt + seq.tokens
        n_prompt = len(prompt) - 1
        sampled = [0.0] * n_prompt + seq.logprobs
        advantages = [0.0] * n_prompt + [1.0 if i % 2 == 0 else -1.0] * len(seq.tokens)
        data.append(shifted(full, **{key: sampled}, advantages=advantages))
    return data


def test_rl_step_with_sampled_logprobs(sdk):
    tc = training_client(sdk)
    sampler = tc.save_weights_and_get_sampling_client().result(60)
    prompt = list(b"Once upon a time")
    params = types.SamplingParams(max_tokens=16, temperature=1.0, seed=0)
    out = sampler.sample(types.ModelInput.from_ints(prompt), 4, params).result(60)
    again = sampler.sample(types.ModelInput.from_ints(prompt), 4, params).result(60)
    assert [s.tokens for s in out.sequences] == [s.tokens for s in again.sequences]
    assert len({s.sequence_id for s in out.sequences}) == 4
    for s in out.sequences:
        assert len(s.logprobs) == len(s.tokens) > 0 and s.stop_reason in ("stop", "length")
    data = _rl_datums(prompt, out.sequences)
    res = tc.forward_backward(data, "importance_sampling").result(60)
    for learner, seq in zip(logprobs_of(res), out.sequences):
        completion = learner[len(prompt) - 1:]
        assert max(abs(a - b) for a, b in zip(completion, seq.logprobs)) < 1e-4  # the sampler's logprobs align
    assert res.metrics["ratio:mean"] == pytest.approx(1.0, abs=1e-4)
    assert tc.optim_step(types.AdamParams(learning_rate=1e-4)).result(60).metrics["grad_norm"] > 0
    ppo = tc.forward_backward(data, "ppo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}).result(60)
    assert "clipped_fraction:mean" in ppo.metrics and math.isfinite(ppo.metrics["loss:sum"])
    cispo = tc.forward_backward(data, "cispo").result(60)
    assert math.isfinite(cispo.metrics["loss:sum"])
    with pytest.raises(tinker.BadRequestError) as info:
        tc.forward_backward(data, "dro").result(60)
    assert info.value.body["category"] == "user" and info.value.body["code"] == "missing_config"
    dro = tc.forward_backward(data, "dro", {"beta": 0.1}).result(60)
    assert math.isfinite(dro.metrics["loss:sum"])

    logprobs = sampler.compute_logprobs(types.ModelInput.from_ints(prompt)).result(60)
    fresh = training_client(sdk)  # the sampler holds the initial weights: a fresh model with the same seed
    forward = logprobs_of(fresh.forward([shifted(prompt)], "cross_entropy").result(60))[0]
    assert logprobs[0] is None and len(logprobs) == len(prompt)
    assert max(abs(a - b) for a, b in zip(logprobs[1:], forward)) < 1e-5


def test_unsupported_losses_and_inputs_are_named(sdk):
    tc = training_client(sdk, rank=4)
    data = [shifted(list(b"hello world"))]
    with pytest.raises(tinker.BadRequestError) as info:
        tc.forward_backward(data, "gspo").result(60)
    assert info.value.body["code"] == "unsupported_loss" and "importance_sampling" in info.value.body["error"]
    with pytest.raises(tinker.BadRequestError) as info:
        tc.forward_backward(data, "importance_sampling").result(60)
    assert info.value.body["code"] == "loss_input_missing"
    assert tc.forward_backward(data, "cross_entropy").result(60).metrics["loss:sum"] > 0  # seqs burned, not stuck


# ---- custom losses ---------------------------------------------------------------------------------------------
def _is_datums():
    g = torch.Generator().manual_seed(0)
    data = []
    for text in ("custom losses equal", "the built-in ones", "on the same datums"):
        tokens = list(text.encode())
        n = len(tokens) - 1
        sampled = (-5.5 + 0.3 * torch.randn(n, generator=g)).tolist()
        advantages = [(1.0 if i % 3 else -1.0) * (0.5 + i / n) for i in range(n)]
        data.append(shifted(tokens, logprobs=sampled, sampling_logprobs=sampled, advantages=advantages))
    return data


def is_per_datum(logprobs, sampling_logprobs, advantages):
    loss = -(torch.exp(logprobs - sampling_logprobs) * advantages).sum()
    return loss, {"custom/is_loss:sum": loss}


def ce_per_datum(logprobs, weights):
    loss = -(logprobs * weights).sum()
    return loss, {"custom/ce_loss:sum": loss, "custom/mean_lp:mean": logprobs.mean()}


def is_callable(data, logprobs_list):
    total = sum(-(torch.exp(lp - d.loss_fn_inputs["sampling_logprobs"].to_torch()) *
                  d.loss_fn_inputs["advantages"].to_torch()).sum() for d, lp in zip(data, logprobs_list))
    return total, {}


def ce_callable(data, logprobs_list):
    total = sum(-(lp * d.loss_fn_inputs["weights"].to_torch()).sum() for d, lp in zip(data, logprobs_list))
    return total, {}


CASES = {
    "importance_sampling": (is_callable, is_per_datum, {"logprobs": 1, "sampling_logprobs": 1, "advantages": 1},
                            "custom/is_loss:sum"),
    "cross_entropy": (ce_callable, ce_per_datum, {"logprobs": 1, "weights": 1}, "custom/ce_loss:sum"),
}


def _three_ways(server, builtin):
    callable_loss, per_datum, ranks, metric = CASES[builtin]
    data = _is_datums()
    with service_client(server.url) as sdk:
        a, b, c = (training_client(sdk, seed=5) for _ in range(3))
        handle = sdk.create_custom_loss(per_datum, ranks).result(60)
        out_a = a.forward_backward(data, builtin).result(60)
        out_b = b.forward_backward_custom(data, callable_loss).result(60)
        out_c = c.forward_backward_custom(data, handle).result(60)
        grads = [server.engine.debug_gradients(t.model_id) for t in (a, b, c)]
        return handle, (out_a, out_b, out_c), grads, metric


@pytest.mark.parametrize("builtin", list(CASES))
def test_custom_losses_equal_the_builtin(server, builtin):
    handle, (out_a, out_b, out_c), grads, metric = _three_ways(server, builtin)
    assert handle.loss_id is not None  # uploaded: it ran on the server
    for x, y in itertools.combinations(grads, 2):
        for key in x:
            torch.testing.assert_close(x[key], y[key], atol=1e-6, rtol=1e-5)
    ref = out_a.metrics["loss:sum"]
    for out in (out_b, out_c):
        assert out.metrics["loss:sum"] == pytest.approx(ref, rel=1e-5, abs=1e-5)
    assert out_c.metrics[metric] == pytest.approx(ref, rel=1e-5)
    assert "surrogate_loss:sum" in out_b.metrics
    assert logprobs_of(out_a) == logprobs_of(out_c)
    if builtin == "cross_entropy":
        lps = [torch.tensor(lp) for lp in logprobs_of(out_c)]
        assert out_c.metrics["custom/mean_lp:mean"] == pytest.approx(float(sum(lp.mean() for lp in lps) / 3), rel=1e-5)


@pytest.mark.slow
def test_custom_loss_runs_on_the_client_when_the_server_says_so(start_server):
    srv = start_server(tinker_custom_loss="client")
    handle, (out_a, _, out_c), grads, _ = _three_ways(srv, "importance_sampling")
    assert handle.loss_id is None  # the SDK runs it itself
    for x, y in itertools.combinations(grads, 2):
        for key in x:
            torch.testing.assert_close(x[key], y[key], atol=1e-6, rtol=1e-5)
    assert out_c.metrics["loss:sum"] == pytest.approx(out_a.metrics["loss:sum"], rel=1e-5)


def test_custom_loss_with_a_scalar_input(sdk):
    def needs(logprobs, bonus):
        return -(logprobs * bonus).sum(), {}

    handle = sdk.create_custom_loss(needs, {"logprobs": 1, "bonus": 0}).result(60)
    tc = training_client(sdk, rank=4)
    good = shifted(list(b"a scalar input"))
    scalar = types.Datum(model_input=good.model_input,
                         loss_fn_inputs={**good.loss_fn_inputs, "bonus": types.TensorData(data=[2.0], dtype="float32",
                                                                                          shape=[])})
    out = tc.forward_backward_custom([scalar], handle).result(60)
    assert out.metrics["loss:sum"] == pytest.approx(-2 * sum(logprobs_of(out)[0]), rel=1e-5)
    with pytest.raises(ValueError):  # the SDK checks the declared inputs before sending
        tc.forward_backward_custom([good], handle).result(60)


def test_a_forbidden_graph_is_refused_by_the_server(sdk, server):
    import httpx

    sid = sdk.holder.get_session_id()
    graph = {"format": 1, "nodes": [
        {"op": "placeholder", "name": "logprobs", "target": "logprobs", "args": [], "kwargs": {}},
        {"op": "call_function", "name": "save_1", "target": "torch.save", "args": [{"ref": "logprobs"}, "/tmp/x"],
         "kwargs": {}},
        {"op": "output", "name": "output", "target": "output", "args": [{"tuple": [{"ref": "logprobs"}, {"dict": {}}]}],
         "kwargs": {}}]}
    r = httpx.post(server.url + "/api/v1/create_custom_loss", headers={"X-API-Key": "tml-test"},
                   json={"session_id": sid, "custom_loss_seq_id": 99, "name": "bad", "graph": graph,
                         "inputs": [{"name": "logprobs", "rank": 1}], "type": "create_custom_loss"})
    assert r.status_code == 400 and r.json()["code"] == "loss_op_not_allowed"
    assert r.json()["detail"] == {"node": "save_1", "op": "call_function", "target": "torch.save"}


# ---- sampling parameters ------------------------------------------------------------------------------------------
def test_sampling_parameters(sdk):
    tc = training_client(sdk, rank=4)
    sampler = tc.save_weights_and_get_sampling_client().result(60)
    prompt = list(b"Sampling: ")
    mi = types.ModelInput.from_ints(prompt)

    def sample(n=1, **params):
        return sampler.sample(mi, n, types.SamplingParams(**params)).result(60).sequences

    greedy = sample(max_tokens=12, temperature=0.0)[0]
    top1 = sample(max_tokens=12, top_k=1, seed=7)[0]
    assert top1.tokens == greedy.tokens and greedy.stop_reason == "length" and len(greedy.tokens) == 12
    s1 = [s.tokens for s in sample(3, max_tokens=10, seed=11, top_p=0.9)]
    assert s1 == [s.tokens for s in sample(3, max_tokens=10, seed=11, top_p=0.9)]
    many = sample(16, max_tokens=96, seed=0, stop=[258])
    stopped = [s for s in many if s.stop_reason == "stop"]
    assert stopped and all(s.tokens[-1] == 258 for s in stopped)
    assert all(len(s.tokens) == 96 for s in many if s.stop_reason == "length")
    dots = sample(16, max_tokens=96, seed=1, stop=["."])
    dotted = [s for s in dots if s.stop_reason == "stop"]
    assert dotted and all(s.tokens[-1] == ord(".") for s in dotted)
    assert all(s.stop_reason == "length" and len(s.tokens) == 30 for s in sample(2, max_tokens=30, seed=0, stop=[]))

    full = sampler.sample(mi, 1, types.SamplingParams(max_tokens=1), include_prompt_logprobs=True,
                          topk_prompt_logprobs=3, topk_sample_logprobs=2).result(60)
    forward = logprobs_of(tc.forward([shifted(prompt)], "cross_entropy").result(60))[0]
    plp = full.prompt_logprobs
    assert plp[0] is None and len(plp) == len(prompt)  # NaN on the wire
    assert max(abs(a - b) for a, b in zip(plp[1:], forward)) < 1e-5
    assert full.topk_prompt_logprobs[0] is None and len(full.topk_prompt_logprobs[1]) == 3
    assert len(full.sequences[0].topk_logprobs[0]) == 2
    last = sampler.sample(mi, 1, types.SamplingParams(max_tokens=1), include_prompt_logprobs=True,
                          prompt_logprobs_last_n=3).result(60).prompt_logprobs
    assert last[:-3] == [None] * (len(prompt) - 3)
    assert max(abs(a - b) for a, b in zip(last[-3:], forward[-3:])) < 1e-5

    base = sdk.create_sampling_client(base_model="losskit/tiny-lm").result(60)
    assert base.sample(mi, 1, types.SamplingParams(max_tokens=5, temperature=0.0)).result(60).sequences[0].tokens \
        == greedy.tokens[:5]  # a fresh adapter is the base model (B = 0)
    saved = tc.save_weights_for_sampler("sampler-0").result(60).path
    from_path = sdk.create_sampling_client(model_path=saved).result(60)
    assert from_path.get_base_model() == "losskit/tiny-lm"
    assert from_path.sample(mi, 1, types.SamplingParams(max_tokens=12, temperature=0.0)).result(60) \
        .sequences[0].tokens == greedy.tokens
