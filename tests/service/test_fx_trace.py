"""fx_trace: seed-002 loss functions become checked native graphs; untraceable code fails with the reason."""

import math

import pytest
import torch

from losskit.contract import LossFnOutput
from losskit.service.custom_loss import REQUIRED, CustomLossError
from losskit.service.fx_trace import CustomLossTraceError, trace_native_loss


def seed_quickstart(model_outputs, loss_fn_inputs, attention_mask):
    target_tokens = loss_fn_inputs["target_tokens"]
    log_probs = torch.nn.functional.log_softmax(model_outputs, dim=-1)
    target_logprobs = log_probs.gather(dim=-1, index=target_tokens.unsqueeze(-1)).squeeze(-1)
    loss = (-target_logprobs * attention_mask).sum()
    return LossFnOutput(loss=loss, logprobs=target_logprobs, diagnostics={"loss": loss.item()})


def _batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 7, generator=g, requires_grad=True)
    return logits, {"target_tokens": torch.randint(0, 7, (2, 4), generator=g)}, torch.ones(2, 4)


def test_quickstart_traces_item_becomes_detach_and_matches_eager():
    traced = trace_native_loss(seed_quickstart, name="my_custom_loss")
    targets = [n["target"] for n in traced.graph["nodes"] if n["op"] == "call_method"]
    assert "item" not in targets and "detach" in targets
    assert traced.graph["kind"] == "losskit.native/1" and traced.graph["hyperparameters"] == {}
    assert traced.program.inputs_read == ("target_tokens",)
    logits, inputs, mask = _batch()
    res = traced.program.run_native(logits, inputs, mask, {})
    eager = seed_quickstart(logits, inputs, mask)
    assert torch.equal(res.loss.detach(), eager.loss.detach())
    assert float(res.diagnostics["loss"]) == eager.diagnostics["loss"]
    loss, logprobs, _ = traced.graph_module(logits, inputs, mask)  # runs locally too
    assert torch.equal(loss, eager.loss) and torch.equal(logprobs, eager.logprobs)


def test_tuple_output_and_no_class_target():
    def f(mo, inputs, mask):
        loss = mo.logsumexp(-1).sum()
        return loss, None, {"n": mask.sum()}

    traced = trace_native_loss(f, name="t")
    assert all("LossFnOutput" not in n["target"] for n in traced.graph["nodes"])


def test_hyperparameters_from_defaults_and_kwargs_reads():
    def f(model_outputs, loss_fn_inputs, attention_mask, temperature=0.07, weight_decay=0.01, **kwargs):
        scale = kwargs.get("scale", 2.0)
        shift = kwargs["shift"]
        loss = (model_outputs / temperature * scale + shift + weight_decay).mean()
        return LossFnOutput(loss=loss, logprobs=None, diagnostics={"t": temperature, "e": math.exp(temperature)})

    traced = trace_native_loss(f, name="h")
    hyper = dict(traced.program.hyperparameters)
    assert hyper == {"temperature": 0.07, "weight_decay": 0.01, "scale": 2.0, "shift": REQUIRED}
    logits, inputs, mask = _batch()
    bound = traced.program.bind_hyperparameters({"shift": 1.0, "temperature": 0.5})
    res = traced.program.run_native(logits, inputs, mask, bound)
    eager = f(logits, inputs, mask, temperature=0.5, shift=1.0)
    assert torch.equal(res.loss.detach(), eager.loss.detach())
    assert res.diagnostics == {"t": 0.5, "e": math.exp(0.5)}


@pytest.mark.parametrize("body,message", [
    ("with torch.no_grad():\n        x = mo * 2", "use .detach\\(\\) instead"),
    ("with torch.enable_grad():\n        x = mo * 2", "use .detach\\(\\) instead"),
    ("torch.set_grad_enabled(False)\n    x = mo", "use .detach\\(\\) instead"),
    ("x = mo * float(mo.sum())", "float\\(\\) of a traced value"),
    ("x = mo * int(mo.sum())", "int\\(\\) of a traced value"),
    ("x = mo if mo.sum() > 0 else -mo", "torch.where"),
    ("x = mo\n    for k in inputs:\n        x = x + 1", "iterating"),
])
def test_untraceable_code_explains_itself(body, message):
    src = f"def f(mo, inputs, mask):\n    {body}\n    return x.sum(), None, {{}}\n"
    ns = {"torch": torch}
    exec(src, ns)  # noqa: S102 - builds the loss under test
    with pytest.raises(CustomLossTraceError, match=message):
        trace_native_loss(ns["f"], name="bad")
    assert torch.no_grad is torch.autograd.grad_mode.no_grad  # restored after the trace


def test_signature_rules():
    with pytest.raises(CustomLossTraceError, match="first three positional"):
        trace_native_loss(lambda a, b: a, name="x")
    with pytest.raises(CustomLossTraceError, match="JSON-scalar default"):
        trace_native_loss(lambda a, b, c, beta: a, name="x")
    with pytest.raises(CustomLossTraceError, match=r"\*rest is not supported"):
        trace_native_loss(lambda a, b, c, *rest: a, name="x")

    def uses_kwargs_badly(mo, inputs, mask, **kwargs):
        return mo.sum() * len(kwargs), None, {}

    with pytest.raises(CustomLossTraceError, match="other than as kwargs.get"):
        trace_native_loss(uses_kwargs_badly, name="x")


def test_disallowed_op_fails_at_trace_time_naming_the_node():
    def f(mo, inputs, mask):
        z = torch.zeros(mo.shape)
        return (mo.sum() + z.sum()), None, {}

    with pytest.raises(CustomLossError) as info:
        trace_native_loss(f, name="z")
    assert info.value.code == "loss_op_not_allowed" and info.value.detail["target"] == "torch.zeros"

    def constant(mo, inputs, mask):
        return (mo.sum() + torch.zeros(10, 10).sum()), None, {}  # runs while tracing: a captured tensor

    with pytest.raises(CustomLossError, match="captured by the loss") as info:
        trace_native_loss(constant, name="z")
    assert info.value.detail["op"] == "get_attr"


def test_captured_tensor_is_rejected():
    captured = torch.ones(3)

    def f(mo, inputs, mask):
        return (mo.sum() * captured.sum()), None, {}

    with pytest.raises(CustomLossError) as info:
        trace_native_loss(f, name="cap")
    assert info.value.code in ("loss_op_not_allowed", "trace_error")
