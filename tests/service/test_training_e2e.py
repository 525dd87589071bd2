"""End to end through a real server and losskit.client: SFT, forward == forward_backward, RL with sampled logprobs."""

import itertools
import math

import pytest
import torch

from losskit.client import RequestFailed
from tests.service.conftest import SENTENCES, internal_id


def tokens(text: str) -> list[int]:
    return list(text.encode())


def test_sft_loop_learns_and_forward_equals_forward_backward(client, server):
    model = client.create_model("sft", rank=8, seed=0)
    data = [tokens(s) for s in SENTENCES]
    per_token = []
    for _ in range(20):
        out = client.forward_backward(model, data, "cross_entropy")
        client.optim_step(model, learning_rate=1e-3)
        m = out["metrics"]
        assert all(k.count(":") == 1 for k in m) and "loss:sum" in m
        assert [len(o["logprobs"]) for o in out["loss_fn_outputs"]] == [len(r) - 1 for r in data]
        per_token.append(m["loss:sum"] / m["weights:sum"])
    assert per_token[-1] <= 0.85 * per_token[0], per_token
    moving = [sum(per_token[i:i + 5]) / 5 for i in range(len(per_token) - 4)]
    assert all(b <= a + 1e-6 for a, b in itertools.pairwise(moving)), moving

    forward = client.forward(model, data, "cross_entropy")
    grads = server.engine.debug_gradients(internal_id(client, model))
    assert all(g is None for g in grads.values())  # forward accumulates nothing
    fb = client.forward_backward(model, data, "cross_entropy")
    assert forward["loss_fn_outputs"] == fb["loss_fn_outputs"]  # bitwise: same floats
    assert forward["metrics"] == fb["metrics"]
    grads = server.engine.debug_gradients(internal_id(client, model))
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())


def _rl_datums(prompt, samples):
    rows, logprobs, advantages = [], [], []
    for i, seq in enumerate(samples):
        full = prompt + seq["tokens"]
        rows.append(full[:-1])
        # Pre-shifted: position t predicts full[t + 1]; the prompt part has advantage 0.
        n_prompt = len(prompt) - 1
        logprobs.append([0.0] * n_prompt + seq["logprobs"])
        advantages.append([0.0] * n_prompt + [1.0 if i % 2 == 0 else -1.0] * len(seq["tokens"]))
    targets = [(prompt + s["tokens"])[1:] for s in samples]
    return rows, {"target_tokens": targets, "logprobs": logprobs, "advantages": advantages}


def test_rl_step_with_sampled_logprobs(client):
    model = client.create_model("rl", rank=8, seed=0)
    prompt = tokens("Once upon a time")
    out = client.sample(model, prompt, num_samples=4, max_tokens=16, temperature=1.0, seed=0)
    again = client.sample(model, prompt, num_samples=4, max_tokens=16, temperature=1.0, seed=0)
    assert [s["tokens"] for s in out["sequences"]] == [s["tokens"] for s in again["sequences"]]
    for s in out["sequences"]:
        assert len(s["logprobs"]) == len(s["tokens"]) > 0
    rows, inputs = _rl_datums(prompt, out["sequences"])
    res = client.forward_backward(model, rows, "importance_sampling", inputs)
    for row_lp, seq in zip(res["loss_fn_outputs"], out["sequences"]):
        learner = row_lp["logprobs"][len(prompt) - 1:]
        assert max(abs(a - b) for a, b in zip(learner, seq["logprobs"])) < 1e-4  # the sampler's logprobs align
    assert res["metrics"]["ratio:mean"] == pytest.approx(1.0, abs=1e-4)
    client.optim_step(model, learning_rate=1e-4)
    ppo = client.forward_backward(model, rows, "ppo", inputs, clip_low_threshold=0.8, clip_high_threshold=1.2)
    assert "clipped_fraction:mean" in ppo["metrics"]
    cispo = client.forward_backward(model, rows, "cispo", inputs)
    assert math.isfinite(cispo["loss"])
    with pytest.raises(RequestFailed) as info:
        client.forward_backward(model, rows, "dro", inputs)
    assert info.value.category == "user" and info.value.code == "missing_config" and info.value.status == 400
    dro = client.forward_backward(model, rows, "dro", inputs, beta=0.1)
    assert math.isfinite(dro["loss"])


def test_unsupported_and_unknown_losses_are_named(client):
    model = client.create_model("u", rank=4, seed=0)
    with pytest.raises(RequestFailed) as info:
        client.forward_backward(model, [tokens("hello")], "gspo")
    assert info.value.code == "unknown_loss" and "cross_entropy" in info.value.message
