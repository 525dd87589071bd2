"""custom_loss / loss_graph: structure checks, kind binding, hyperparameters, and programs against eager torch."""

import copy

import pytest
import torch

from losskit.contract import LossFnOutput
from losskit.service.custom_loss import NATIVE_KIND, REQUIRED, CustomLossError, parse_graph
from losskit.service.fx_trace import trace_native_loss


def ph(name, *args):
    return {"op": "placeholder", "name": name, "target": name, "args": list(args), "kwargs": {}}


def call(name, target, *args, op="call_function", **kwargs):
    return {"op": op, "name": name, "target": target, "args": list(args), "kwargs": kwargs}


def out(arg):
    return {"op": "output", "name": "output", "target": "output", "args": [arg], "kwargs": {}}


def R(n):
    return {"ref": n}


def native(*nodes, hyper=None):
    g = {"format": 1, "kind": NATIVE_KIND,
         "nodes": [ph("model_outputs"), ph("loss_fn_inputs"), ph("attention_mask"), *nodes]}
    if hyper is not None:
        g["hyperparameters"] = hyper
    return g


def _ce_graph():
    return native(
        call("tt", "operator.getitem", R("loss_fn_inputs"), "target_tokens"),
        call("lsm", "torch.nn.functional.log_softmax", R("model_outputs"), dim=-1),
        call("un", "unsqueeze", R("tt"), -1, op="call_method"),
        call("g", "gather", R("lsm"), op="call_method", dim=-1, index=R("un")),
        call("lp", "squeeze", R("g"), -1, op="call_method"),
        call("neg", "operator.neg", R("lp")),
        call("m", "operator.mul", R("neg"), R("attention_mask")),
        call("loss", "sum", R("m"), op="call_method"),
        out({"tuple": [R("loss"), R("lp"), {"dict": {"loss": R("loss"), "const": 3}}]}),
    )


def _batch(B=2, T=5, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, requires_grad=True)
    tt = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[1, 3:] = 0
    return logits, tt, mask


def test_native_program_equals_eager_including_gradients():
    prog = parse_graph(_ce_graph(), name="ce")
    assert prog.inputs_read == ("target_tokens",) and prog.hyperparameters == ()
    logits, tt, mask = _batch()
    res = prog.run_native(logits, {"target_tokens": tt}, mask, {})
    (g1,) = torch.autograd.grad(res.loss, logits)
    lp = logits.log_softmax(-1).gather(-1, tt[..., None])[..., 0]
    ref = (-lp * mask).sum()
    (g2,) = torch.autograd.grad(ref, logits)
    assert torch.equal(res.loss.detach(), ref.detach()) and torch.equal(g1, g2)
    assert res.diagnostics["const"] == 3 and res.diagnostics["loss"].dim() == 0
    assert not res.diagnostics["loss"].requires_grad


def test_content_hash_is_stable_and_changes_with_the_graph():
    a, b = parse_graph(_ce_graph(), name="a"), parse_graph(_ce_graph(), name="b")
    assert a.content_hash == b.content_hash
    g = _ce_graph()
    g["nodes"][-2]["target"] = "mean"
    assert parse_graph(g, name="c").content_hash != a.content_hash


def test_missing_input_fails_before_compute():
    prog = parse_graph(_ce_graph(), name="ce")
    logits, _, mask = _batch()
    with pytest.raises(CustomLossError) as info:
        prog.run_native(logits, {}, mask, {})
    assert info.value.code == "loss_input_missing" and "target_tokens" in str(info.value)


def test_hyperparameters_bind_by_name_with_defaults_and_required():
    g = native(
        ph("beta", 0.1), ph("scale"),
        call("a", "operator.mul", R("model_outputs"), R("beta")),
        call("b", "operator.mul", R("a"), R("scale")),
        call("loss", "sum", R("b"), op="call_method"),
        out({"tuple": [R("loss"), None, {"dict": {"beta": R("beta")}}]}), hyper={"beta": 0.1},
    )
    prog = parse_graph(g, name="h")
    assert dict(prog.hyperparameters) == {"beta": 0.1, "scale": REQUIRED}
    assert prog.required_hyperparameters == ("scale",)
    with pytest.raises(CustomLossError) as info:
        prog.bind_hyperparameters({})
    assert info.value.code == "missing_config" and "scale" in str(info.value)
    with pytest.raises(CustomLossError, match="no hyperparameter 'gamma'"):
        prog.bind_hyperparameters({"scale": 1.0, "gamma": 2})
    with pytest.raises(CustomLossError, match="JSON scalar"):
        prog.bind_hyperparameters({"scale": [1, 2]})
    bound = prog.bind_hyperparameters({"scale": 2.0, "beta": 0.5})
    logits, _, mask = _batch()
    res = prog.run_native(logits, {}, mask, bound)
    assert float(res.loss.detach()) == pytest.approx(float((logits.detach() * 0.5 * 2.0).sum()), rel=1e-6)
    assert res.diagnostics["beta"] == 0.5


def test_diagnostic_with_many_elements_is_rejected():
    g = native(call("loss", "sum", R("model_outputs"), op="call_method"),
               out({"tuple": [R("loss"), None, {"dict": {"all": R("attention_mask")}}]}))
    prog = parse_graph(g, name="d")
    logits, _, mask = _batch()
    with pytest.raises(CustomLossError) as info:
        prog.run_native(logits, {}, mask, {})
    assert info.value.code == "diagnostic_not_scalar" and "'all'" in str(info.value)


def test_non_scalar_loss_is_rejected():
    g = native(out({"tuple": [R("attention_mask"), None, {"dict": {}}]}))
    logits, _, mask = _batch()
    with pytest.raises(CustomLossError) as info:
        parse_graph(g, name="d").run_native(logits, {}, mask, {})
    assert info.value.code == "invalid_loss_output"


def _broken(mutate):
    g = copy.deepcopy(_ce_graph())
    mutate(g)
    return g


@pytest.mark.parametrize("mutate,message", [
    (lambda g: g["nodes"].insert(5, ph("late")), "placeholders come first"),
    (lambda g: g["nodes"][4]["args"].__setitem__(0, R("nope")), "not an earlier node"),
    (lambda g: g["nodes"][4]["args"].__setitem__(0, R("loss")), "not an earlier node"),
    (lambda g: g["nodes"].__setitem__(4, {**g["nodes"][4], "name": "tt"}), "used twice"),
    (lambda g: g["nodes"].append(out(None)), "must be the last node"),
    (lambda g: g["nodes"].pop(), "last node must be the output"),
    (lambda g: g.__setitem__("format", 2), "format must be 1"),
    (lambda g: g.__setitem__("kind", "other/1"), "kind must be one of"),
    (lambda g: g.__setitem__("extra", 1), "unknown key"),
    (lambda g: g["nodes"][3].__setitem__("args", [R("loss_fn_inputs"), "a" * 300]), "longer than 256"),
    (lambda g: g["nodes"][4]["kwargs"].__setitem__("dim", {"weird": 1}), "tagged 'weird'"),
    (lambda g: g["nodes"][4]["kwargs"].__setitem__("dim", {"dtype": "complex128"}), "dtype 'complex128'"),
    (lambda g: g["nodes"][4]["kwargs"].__setitem__("dim", list(range(2000))), "longer than 1024"),
    (lambda g: g["nodes"][4].__setitem__("op", "call_pickle"), "has op"),
    (lambda g: g["nodes"].insert(4, call("bad", "sum", R("loss_fn_inputs"), op="call_method")),
     "uses loss_fn_inputs other than"),
    (lambda g: g["nodes"][3]["args"].__setitem__(1, R("attention_mask")), "uses loss_fn_inputs other than"),
])
def test_structural_errors_are_named(mutate, message):
    with pytest.raises(CustomLossError, match=message) as info:
        parse_graph(_broken(mutate), name="bad")
    assert info.value.code in ("invalid_loss_graph", "loss_op_not_allowed")


def test_node_and_size_limits():
    nodes = [call(f"n{i}", "torch.exp", R("model_outputs")) for i in range(20)]
    g = native(*nodes, out({"tuple": [R("n0"), None, {"dict": {}}]}))
    with pytest.raises(CustomLossError, match="above the limit of 10"):
        parse_graph(g, name="big", max_nodes=10)
    huge = native(call("a", "torch.exp", R("model_outputs"), "x" * 200), out(R("a")))
    huge["nodes"] += [call(f"p{i}", "torch.exp", "y" * 250) for i in range(5000)]
    with pytest.raises(CustomLossError, match="bytes of JSON"):
        parse_graph(huge, name="big", max_nodes=10**6)


def test_tinker_kind_binding_and_run_datum():
    g = {"format": 1, "nodes": [
        ph("logprobs"), ph("advantages"),
        call("m", "operator.mul", R("logprobs"), R("advantages")),
        call("s", "torch.sum", R("m")),
        call("loss", "operator.neg", R("s")),
        out({"tuple": [R("loss"), {"dict": {"custom/adv:sum": R("s")}}]}),
    ]}
    prog = parse_graph(g, name="t")
    assert prog.kind == "tinker/1" and prog.inputs_read == ("advantages",)
    lp = torch.tensor([-1.0, -2.0], requires_grad=True)
    loss, metrics = prog.run_datum(lp, {"advantages": torch.tensor([1.0, 2.0])})
    assert float(loss.detach()) == 5.0 and float(metrics["custom/adv:sum"]) == -5.0
    bad = copy.deepcopy(g)
    bad["nodes"][-1] = out({"tuple": [R("loss"), {"dict": {"Adv": R("s")}}]})
    with pytest.raises(CustomLossError, match="custom/<name>:sum"):
        parse_graph(bad, name="t")
    first = copy.deepcopy(g)
    first["nodes"][0] = ph("lp")
    first["nodes"][2]["args"][0] = R("lp")
    with pytest.raises(CustomLossError, match="takes logprobs first"):
        parse_graph(first, name="t")


def test_seed_dpo_traced_program_equals_eager():
    def dpo_loss(model_outputs, loss_fn_inputs, attention_mask, beta=0.1):
        chosen_tokens = loss_fn_inputs["chosen_tokens"]
        rejected_tokens = loss_fn_inputs["rejected_tokens"]
        ref_c = loss_fn_inputs["reference_chosen_logprobs"]
        ref_r = loss_fn_inputs["reference_rejected_logprobs"]
        log_probs = torch.nn.functional.log_softmax(model_outputs, dim=-1)
        pc = log_probs.gather(dim=-1, index=chosen_tokens.unsqueeze(-1)).squeeze(-1) * attention_mask
        pr = log_probs.gather(dim=-1, index=rejected_tokens.unsqueeze(-1)).squeeze(-1) * attention_mask
        n = attention_mask.sum(dim=1, keepdim=True).clamp(min=1)
        diff = pc.sum(dim=1) / n.squeeze() - pr.sum(dim=1) / n.squeeze()
        ref = ref_c.sum(dim=1) / n.squeeze() - ref_r.sum(dim=1) / n.squeeze()
        loss = -torch.nn.functional.logsigmoid(beta * (diff - ref)).mean()
        return LossFnOutput(loss=loss, logprobs=pc, diagnostics={"loss": loss.item(),
                                                                 "acc": (diff > 0).float().mean().item()})

    traced = trace_native_loss(dpo_loss, name="dpo")
    logits, tt, mask = _batch(B=3, T=6, seed=3)
    g = torch.Generator().manual_seed(4)
    inputs = {"chosen_tokens": tt, "rejected_tokens": torch.randint(0, 11, tt.shape, generator=g),
              "reference_chosen_logprobs": -torch.rand(tt.shape, generator=g),
              "reference_rejected_logprobs": -torch.rand(tt.shape, generator=g)}
    for beta in (0.1, 0.5):
        res = traced.program.run_native(logits, inputs, mask, traced.program.bind_hyperparameters({"beta": beta}))
        (g1,) = torch.autograd.grad(res.loss, logits)
        eager = dpo_loss(logits, inputs, mask, beta=beta)
        (g2,) = torch.autograd.grad(eager.loss, logits)
        assert torch.equal(res.loss.detach(), eager.loss.detach()) and torch.equal(g1, g2)
        assert float(res.diagnostics["loss"]) == eager.diagnostics["loss"]
        assert float(res.diagnostics["acc"]) == eager.diagnostics["acc"]
