"""Every served built-in against a plain-torch oracle on the same logits: loss, logprobs and accumulated gradients.

The oracle runs on the server's device worker (an in-process test hook): it takes the model's logits for the same
rows, computes the loss with plain torch, and differentiates it with respect to the adapter parameters.
losskit's own two built-ins are compared with ``kernels.cross_entropy`` and the loss-modifier pipeline called
in-process on the same logits.
"""

import pytest
import torch

from losskit import kernels
from losskit.modifiers import create_loss_modifier_pipeline
from tests.service.conftest import internal_id

B, T, V = 3, 12, 264


def _rows(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, T), generator=g)


def _oracle(server, mid, rows, loss_of_logits):
    engine = server.engine
    state = engine.find_model(mid)

    def run():
        with torch.enable_grad():
            logits = server.service.backend._logits(state.handle, rows)
            loss = loss_of_logits(logits)
            grads = torch.autograd.grad(loss, state.handle.params)
        return loss.detach(), logits.detach(), [g.clone() for g in grads]

    return engine.call_on_worker(run)


def assert_grads_close(got, want):
    """rtol 1e-5, with an absolute floor of 1e-5 of the largest entry (float32 rounding of tiny entries)."""
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def _check(server, client, alias, rows, result, oracle):
    loss, _, grads = oracle
    mid = internal_id(client, alias)
    got = server.engine.debug_gradients(mid)
    torch.testing.assert_close(torch.tensor(result["metrics"].get("loss:sum", result["loss"])), loss.float(),
                               rtol=1e-5, atol=1e-6)
    assert_grads_close(got.values(), grads)


def _lp(logits, tt):
    """Plain torch: the logprobs of ``tt`` ``[B, T]``."""
    return torch.log_softmax(logits, dim=-1).gather(-1, tt[..., None]).squeeze(-1)


def test_cross_entropy_with_negative_weights(server, client):
    alias = client.create_model("ce_neg", rank=8, seed=0)
    rows = _rows(0)
    g = torch.Generator().manual_seed(1)
    tt = torch.randint(0, V, (B, T), generator=g)
    w = torch.randn(B, T, generator=g)
    res = client.forward_backward(alias, rows.tolist(), "cross_entropy", {"target_tokens": tt, "weights": w})
    oracle = _oracle(server, internal_id(client, alias), rows, lambda z: -(_lp(z, tt) * w).sum())
    _check(server, client, alias, rows, res, oracle)
    lp = _lp(oracle[1], tt)
    for i, out in enumerate(res["loss_fn_outputs"]):
        torch.testing.assert_close(torch.tensor(out["logprobs"]), lp[i], rtol=1e-5, atol=1e-6)


def test_cross_entropy_rank_2_targets(server, client):
    alias = client.create_model("ce_k", rank=8, seed=0)
    rows = _rows(2)
    g = torch.Generator().manual_seed(3)
    tt = torch.randint(0, V, (B, T, 3), generator=g)
    w = torch.rand(B, T, 3, generator=g)
    res = client.forward_backward(alias, rows.tolist(), "cross_entropy", {"target_tokens": tt, "weights": w})
    oracle = _oracle(server, internal_id(client, alias), rows,
                     lambda z: -(torch.log_softmax(z, -1).gather(-1, tt) * w).sum())
    _check(server, client, alias, rows, res, oracle)
    assert torch.tensor(res["loss_fn_outputs"][0]["logprobs"]).shape == (T, 3)


@pytest.mark.parametrize("loss_fn,config,formula", [
    ("importance_sampling", {}, lambda lp, q, a: -(torch.exp(lp - q) * a).sum()),
    ("ppo", {}, lambda lp, q, a: -torch.minimum(torch.exp(lp - q) * a, torch.clamp(torch.exp(lp - q), 0.8, 1.2) * a)
     .sum()),
    ("ppo", {"clip_low_threshold": 0.5, "clip_high_threshold": 3.0},
     lambda lp, q, a: -torch.minimum(torch.exp(lp - q) * a, torch.clamp(torch.exp(lp - q), 0.5, 3.0) * a).sum()),
    ("cispo", {}, lambda lp, q, a: -(torch.clamp(torch.exp(lp - q), 0.0, 4.0).detach() * lp * a).sum()),
    ("dro", {"beta": 0.3}, lambda lp, q, a: -(lp * a - 0.15 * (lp - q) ** 2).sum()),
])
def test_rl_losses_with_extreme_ratios(server, client, loss_fn, config, formula):
    alias = client.create_model(f"rl_{loss_fn}_{len(config)}", rank=8, seed=0)
    rows = _rows(4)
    g = torch.Generator().manual_seed(5)
    tt = torch.randint(0, V, (B, T), generator=g)
    learner = torch.tensor([o["logprobs"] for o in client.forward(alias, rows.tolist(), "cross_entropy",
                                                                  {"target_tokens": tt})["loss_fn_outputs"]])
    q = learner + 6.0 * torch.randn(B, T, generator=g)  # ratios far outside [0.01, 100]
    assert torch.exp(learner - q).max() > 100 and torch.exp(learner - q).min() < 0.01
    adv = torch.randn(B, T, generator=g)
    res = client.forward_backward(alias, rows.tolist(), loss_fn, {"target_tokens": tt, "logprobs": q,
                                                                  "advantages": adv}, **config)
    oracle = _oracle(server, internal_id(client, alias), rows, lambda z: formula(_lp(z, tt), q, adv))
    _check(server, client, alias, rows, res, oracle)


def test_label_smoothed_cross_entropy_is_kernels_cross_entropy(server, client):
    alias = client.create_model("ls", rank=8, seed=0)
    rows = _rows(6)
    config = {"label_smoothing": 0.2, "smoothing_convention": "fairseq", "smoothing_exclude": [256, 257, 258],
              "z_loss": 1e-3}
    res = client.forward_backward(alias, rows.tolist(), "label_smoothed_cross_entropy", loss_fn_config=config)
    target = torch.tensor(rows.tolist())[:, 1:]
    inputs = rows[:, :-1]  # the server shifts: rows[:, :-1] predict rows[:, 1:]
    oracle = _oracle(server, internal_id(client, alias), inputs,
                     lambda z: kernels.cross_entropy(z, target, **config))
    loss, _, grads = oracle
    assert res["loss"] == pytest.approx(float(loss), rel=1e-6)
    assert_grads_close(server.engine.debug_gradients(internal_id(client, alias)).values(), grads)


def test_loss_modifiers_is_the_pipeline_on_the_same_logits(server, client):
    alias = client.create_model("mods", rank=8, seed=0)
    rows = _rows(7)
    config = {"target_smoothing_enabled": True, "target_smoothing_factor": 0.1, "entropy_modifier_enabled": True,
              "mask_ratio_weight_enabled": True}
    res = client.forward_backward(alias, rows.tolist(), "loss_modifiers", loss_fn_config=config)
    target = rows[:, 1:]
    pipe = create_loss_modifier_pipeline({"loss_modifiers_enabled": True, **config}, verbose=False)
    oracle = _oracle(server, internal_id(client, alias), rows[:, :-1], lambda z: pipe.compute(z, target).loss)
    loss, _, grads = oracle
    assert res["loss"] == pytest.approx(float(loss), rel=1e-6)
    metrics = {k: float(v) for k, v in pipe.get_all_metrics().items()}
    assert metrics and all(k.startswith("loss_modifiers/") for k in metrics)
    for key, value in metrics.items():
        assert res["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-7)
    assert_grads_close(server.engine.debug_gradients(internal_id(client, alias)).values(), grads)


def test_loss_modifier_keys_are_validated_like_losskit_train(client):
    from losskit.client import RequestFailed

    alias = client.create_model("mods_bad", rank=4, seed=0)
    with pytest.raises(RequestFailed) as info:
        client.forward_backward(alias, [[1, 2, 3, 4]], "loss_modifiers", target_smoothing_factr=0.1)
    assert info.value.status == 400 and "did you mean 'target_smoothing_factor'" in info.value.message
    descriptions = client.list_loss_functions()["descriptions"]
    assert "mean over the supervised tokens" in descriptions["loss_modifiers"]
    assert "mean over the supervised tokens" in descriptions["label_smoothed_cross_entropy"]
