"""``torch.compile`` of a training step that calls losskit: eager results, one documented graph break per call."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo

from losskit import kernels
from losskit.modifiers import create_loss_modifier_pipeline


def _model_and_batch(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 40))
    x = torch.randn(2, 6, 12)
    t = torch.randint(0, 40, (2, 6))
    t[1, 4:] = -100
    return model, x, t


PIPE = {"loss_modifiers_enabled": True, "entropy_modifier_enabled": True, "target_smoothing_enabled": True,
        "target_smoothing_factor": 0.1, "mask_ratio_weight_enabled": True}

LOSSES = {
    "cross_entropy in place": lambda z, t: kernels.cross_entropy(z, t, label_smoothing=0.1, z_loss=1e-3,
                                                                 inplace_grad=True),
    "fused_token_loss deferred": lambda z, t: kernels.fused_token_loss(
        z, t, grad_mode="backward", label_smoothing=0.2, smoothing_exclude=[0, 1], normalizer=5.0).loss,
    "token_stats combination": lambda z, t: (kernels.token_stats(z, t).nll
                                             + 0.1 * kernels.token_stats(z, t).entropy).sum(),
    "modifier pipeline": None,  # built per test (it holds metrics)
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_compiled_step_equals_eager_with_one_break_per_losskit_call(name):
    model, x, t = _model_and_batch()
    pipe = create_loss_modifier_pipeline(PIPE, verbose=False) if LOSSES[name] is None else None
    loss_fn = LOSSES[name] or (lambda z, t: pipe.compute(z, t).loss)

    def step(x, t):
        z = model(x)
        loss = loss_fn(z, t)
        loss.backward()
        return loss.detach()

    model.zero_grad()
    eager = step(x, t)
    eager_grads = [p.grad.clone() for p in model.parameters()]
    calls = 2 if name == "token_stats combination" else 1
    assert dynamo.explain(step)(x, t).graph_break_count == calls
    model.zero_grad()
    dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager")(x, t)
    assert torch.allclose(compiled, eager, rtol=1e-6, atol=1e-7)
    for p, g in zip(model.parameters(), eager_grads, strict=True):
        assert torch.allclose(p.grad, g, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_inductor_compiled_step_equals_eager():
    model, x, t = _model_and_batch(1)

    def step(x, t):
        loss = kernels.cross_entropy(model(x), t, label_smoothing=0.1, inplace_grad=True)
        loss.backward()
        return loss.detach()

    model.zero_grad()
    eager = step(x, t)
    g_eager = model[0].weight.grad.clone()
    model.zero_grad()
    dynamo.reset()
    compiled = torch.compile(step)(x, t)
    assert torch.allclose(compiled, eager, rtol=1e-6)
    assert torch.allclose(model[0].weight.grad, g_eager, rtol=1e-5, atol=1e-7)
