"""Custom losses through a real server: the guide's examples as written, graph safety, names and ownership, and
the opt-in pickled upload."""

import base64
import copy
import math
import pathlib
import pickle
import runpy

import pytest
import torch

from losskit.client import LossFnOutput, RequestFailed, TinkerClient, custom_loss
from tests.service.conftest import internal_id

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"
# The guide lives beside the checkout (as in CI); the fidelity check is skipped where it is absent.
SEED = pathlib.Path(__file__).resolve().parents[3] / "shared" / "seeds" / "002_12ab648ee9070cb7.txt"


def run_example(name, url, **kwargs):
    return runpy.run_path(str(EXAMPLES / f"{name}.py"))["main"](url, **kwargs)


def quickstart_loss(model_outputs, loss_fn_inputs, attention_mask):
    target_tokens = loss_fn_inputs["target_tokens"]
    log_probs = torch.nn.functional.log_softmax(model_outputs, dim=-1)
    target_logprobs = log_probs.gather(dim=-1, index=target_tokens.unsqueeze(-1)).squeeze(-1)
    loss = (-target_logprobs * attention_mask).sum()
    return LossFnOutput(loss=loss, logprobs=target_logprobs, diagnostics={"loss": loss.item()})


ROWS = [list(b"The quick brown fox."), list(b"Jumps over the dog, twice."), list(b"Hello!")]


@pytest.mark.skipif(not SEED.exists(), reason="the guide's text is not available")
def test_examples_contain_the_guides_losses_as_written():
    import re

    text = SEED.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    quick = (EXAMPLES / "quickstart.py").read_text()
    dpo = (EXAMPLES / "dpo_seed.py").read_text()

    def body(block, start):
        lines = block[block.index(start):].splitlines()
        out = [lines[0]]
        for line in lines[1:]:
            if line and not line.startswith((" ", "\t")):
                break
            out.append(line)
        return [line.strip() for line in out if line.strip()]

    for start, example in (("def my_loss(model_outputs, loss_fn_inputs, attention_mask):", quick),
                           ("def dpo_loss(", dpo)):
        block = next(b for b in blocks if start in b)
        normalised = [line.strip() for line in example.splitlines() if line.strip()]
        wanted = body(block, start)
        i = normalised.index(wanted[0])
        assert normalised[i:i + len(wanted)] == wanted, start
    assert "from tinker_client import TinkerClient, custom_loss, LossFnOutput" in text
    assert "from losskit.client import TinkerClient, custom_loss, LossFnOutput" in quick


def test_quickstart_and_the_other_guide_snippets_run(server):
    out = run_example("quickstart", server.url)
    client = out["client"]
    try:
        result = out["quickstart"]
        assert result["metrics"]["loss"] == result["loss"]
        listed = out["losses"]["available_loss_functions"]
        assert {"cross_entropy", "importance_sampling", "ppo", "cispo", "dro"} <= set(listed)
        assert {"my_custom_loss", "my_loss", "loss_a", "loss_b", "rich_diagnostics"} <= set(listed)
        assert out["loss_a"]["loss"] > 0 and out["loss_b"]["loss"] > 0
        diagnostics = out["diagnostics"]["metrics"]
        assert set(diagnostics) == {"loss", "accuracy", "perplexity", "mean_logprob", "std_logprob", "grad_norm"}
        assert all(isinstance(v, float) for v in diagnostics.values())
        custom = {c["name"]: c for c in out["losses"]["custom"]}
        assert custom["my_loss"]["hyperparameters"] == {"temperature": 0.07, "weight_decay": 0.01}
    finally:
        client.close()


def test_quickstart_loss_equals_builtin_cross_entropy_with_equal_gradients(server, client):
    custom_loss(client, name="quick")(quickstart_loss)
    a = client.create_model("a", rank=8, seed=0)
    b = client.create_model("b", rank=8, seed=0)
    res_custom = client.forward_backward(model_id=a, data=ROWS, loss_fn="quick", loss_fn_inputs={"target_tokens": ...})
    res_builtin = client.forward_backward(b, ROWS, "cross_entropy")
    assert res_custom["metrics"]["loss"] == res_custom["loss"]
    assert res_custom["loss"] == pytest.approx(res_builtin["loss"], rel=1e-5)
    ga = server.engine.debug_gradients(internal_id(client, a))
    gb = server.engine.debug_gradients(internal_id(client, b))
    for x, y in zip(ga.values(), gb.values()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    for out_c, out_b in zip(res_custom["loss_fn_outputs"], res_builtin["loss_fn_outputs"]):
        torch.testing.assert_close(torch.tensor(out_c["logprobs"]), torch.tensor(out_b["logprobs"]), rtol=1e-5,
                                   atol=1e-6)


def test_seed_dpo_example(server):
    out = run_example("dpo_seed", server.url)
    client = out["client"]
    try:
        first = out["history"][0]
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert isinstance(first["metrics"]["reward_accuracy"], float)
        assert isinstance(first["metrics"]["mean_policy_diff"], float)
        assert out["final"]["loss"] < math.log(2)
        # beta as a keyword changes the diagnostics as an eager run of the same function predicts
        model = internal_id(client, "my-model")
        served = client.forward("my-model", out["data"], "dpo", out["inputs"], beta=0.5)
        state = server.engine.find_model(model)
        width = max(len(r) for r in out["data"])

        def pad(rows, value):  # the server's batching: right-padded rows, mask 1 on real tokens
            return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows])

        ids = pad(out["data"], 256)  # tiny-lm's <pad>
        mask = pad([[1.0] * len(r) for r in out["data"]], 0.0)
        inputs = {k: pad(v, 0 if isinstance(v[0][0], int) else 0.0) for k, v in out["inputs"].items()}

        def eager():
            with torch.no_grad():
                logits = server.service.backend._logits(state.handle, ids)
                return out["loss_fn"](logits, inputs, mask, beta=0.5)

        predicted = server.engine.call_on_worker(eager)
        assert served["loss"] == pytest.approx(float(predicted.loss), rel=1e-5, abs=1e-7)
        for key in ("loss", "reward_accuracy", "mean_policy_diff"):
            assert served["metrics"][key] == pytest.approx(predicted.diagnostics[key], rel=1e-5, abs=1e-7)
        default = client.forward("my-model", out["data"], "dpo", out["inputs"])
        assert default["loss"] != pytest.approx(served["loss"], rel=1e-3)
    finally:
        client.close()


def test_pairwise_dpo_example_matches_functional_policy_dpo(server):
    from losskit.functional import policy

    out = run_example("dpo_pairwise", server.url)
    client = out["client"]
    try:
        pairs = len(out["rows"]) // 2
        assert out["history"][0]["loss"] == pytest.approx(pairs * math.log(2), rel=1e-6)
        assert out["final"]["loss"] < out["history"][0]["loss"]
        fwd = client.forward(out["model_id"], out["rows"], "cross_entropy", {"weights": out["weights"]})
        seq = torch.tensor([sum(lp * w for lp, w in zip(o["logprobs"], ws))
                            for o, ws in zip(fwd["loss_fn_outputs"], out["weights"])], dtype=torch.float64)
        ref = torch.tensor(out["reference"], dtype=torch.float64)
        want = policy.dpo(seq[0::2], seq[1::2], ref[0::2], ref[1::2], beta=0.1)
        assert out["final"]["loss"] == pytest.approx(float(want.loss), rel=1e-5)
        assert out["final"]["metrics"]["reward_accuracy"] == pytest.approx(
            float(want.diagnostics["reward_accuracy:mean"]))
    finally:
        client.close()


# ---- names and ownership --------------------------------------------------------------------------------------


def test_builtins_are_protected_and_custom_losses_are_per_session(server):
    a, b = TinkerClient(server.url), TinkerClient(server.url)
    try:
        with pytest.raises(RequestFailed) as info:
            custom_loss(a, name="cross_entropy")(quickstart_loss)
        assert info.value.status == 409 and info.value.code == "builtin_protected"

        @custom_loss(a, name="loss_a")
        def loss_a(model_outputs, loss_fn_inputs, attention_mask):
            return quickstart_loss(model_outputs, loss_fn_inputs, attention_mask)

        custom_loss(a, name="only_a")(quickstart_loss)
        ma = a.create_model("m", rank=4, seed=0)
        before = a.forward(ma, ROWS, "loss_a")

        @custom_loss(b, name="loss_a")
        def loss_a_b(model_outputs, loss_fn_inputs, attention_mask):
            return LossFnOutput(loss=model_outputs.sum() * 0, logprobs=None, diagnostics={"x": 1.0})

        assert "only_a" not in b.list_loss_functions()["available_loss_functions"]
        mb = b.create_model("m", rank=4, seed=0)
        for call in (lambda: b.forward(mb, ROWS, "only_a"), lambda: b.unregister_custom_loss("only_a")):
            with pytest.raises(RequestFailed) as info:
                call()
            assert info.value.status == 404
        assert b.forward(mb, ROWS, "loss_a")["metrics"] == {"x": 1.0, "loss": 0.0}
        assert a.forward(ma, ROWS, "loss_a")["loss"] == before["loss"]  # A's loss is untouched
        reply = a.register_custom_loss("loss_a", quickstart_loss)
        assert reply["replaced"] is True and reply["version"] == 2
        with pytest.raises(RequestFailed) as info:
            a.unregister_custom_loss("cross_entropy")
        assert info.value.status == 403
    finally:
        a.close()
        b.close()


# ---- graph safety (native surface) -----------------------------------------------------------------------------


def _quick_graph():
    from losskit.service.fx_trace import trace_native_loss

    return trace_native_loss(quickstart_loss, name="q").graph


def _inject(graph, node):
    g = copy.deepcopy(graph)
    nodes = g["nodes"]
    nodes.insert(len(nodes) - 1, node)
    out = nodes[-1]
    loss_ref = out["args"][0]["tuple"][0]
    nodes.insert(len(nodes) - 1, {"op": "call_function", "name": "mix", "target": "operator.add",
                                  "args": [loss_ref, 0.0], "kwargs": {}})
    return g


EVIL = [
    ("call_function", "torch.load", lambda p: [str(p)]),
    ("call_function", "torch.save", lambda p: [{"ref": "model_outputs"}, str(p)]),
    ("call_function", "builtins.eval", lambda p: [f"open({str(p)!r}, 'w')"]),
    ("call_function", "os.system", lambda p: [f"touch {p}"]),
    ("call_module", "lm_head", lambda p: [{"ref": "model_outputs"}]),
    ("get_attr", "weight", lambda p: []),
    ("call_method", "mul_", lambda p: [{"ref": "model_outputs"}, 0.0]),
    ("call_function", "torch.zeros", lambda p: [{"tuple": [10**6, 10**6]}]),
    ("call_function", "builtins.getattr", lambda p: [{"ref": "model_outputs"}, "__class__"]),
]


@pytest.mark.parametrize("op,target,make", EVIL, ids=[t for _, t, _ in EVIL])
def test_hand_edited_graphs_are_rejected(http, client, tmp_path, op, target, make):
    canary = tmp_path / "canary"
    graph = _inject(_quick_graph(), {"op": op, "name": "evil", "target": target, "args": make(canary),
                                     "kwargs": {}})
    reply = http.post("/v1/losses", json={"name": "evil", "graph": graph},
                      headers={"X-Losskit-Session": client.session_id})
    assert reply.status_code == 400, reply.text
    body = reply.json()
    assert body["code"] == "loss_op_not_allowed" and body["category"] == "user"
    assert body["detail"]["node"] == "evil" and target.split(".")[-1] in body["detail"]["target"]
    assert "evil" in body["error"]
    assert not canary.exists()


def test_out_of_range_gather_index_is_a_user_error(client):
    @custom_loss(client, name="gather_idx")
    def gather_idx(model_outputs, loss_fn_inputs, attention_mask):
        picked = model_outputs.gather(dim=-1, index=loss_fn_inputs["idx"].unsqueeze(-1)).squeeze(-1)
        return LossFnOutput(loss=(picked * attention_mask).sum(), logprobs=picked, diagnostics={})

    model = client.create_model("g", rank=4, seed=0)
    rows = [[1, 2, 3, 4]]
    ok = client.forward(model, rows, "gather_idx", {"idx": [[0, 1, 2, 3]]})
    assert math.isfinite(ok["loss"])
    with pytest.raises(RequestFailed) as info:
        client.forward(model, rows, "gather_idx", {"idx": [[0, 1, 2, 10**6]]})
    assert info.value.category == "user" and info.value.code == "loss_runtime_error"
    assert "out of range" in info.value.message
    assert math.isfinite(client.forward(model, rows, "gather_idx", {"idx": [[0, 1, 2, 3]]})["loss"])  # still serving


# ---- pickled upload (opt-in, unsafe) ---------------------------------------------------------------------------


class _Canary:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _pickled_attempts(server, tmp_path):
    import httpx

    canary = tmp_path / "pickle_canary"
    payload = base64.b64encode(pickle.dumps(_Canary(canary))).decode()
    client = TinkerClient(server.url, api_key=server.settings.api_keys[0] if server.settings.api_keys else None)
    headers = {"X-Losskit-Session": client.session_id}
    if server.settings.api_keys:
        headers["X-API-Key"] = server.settings.api_keys[0]
    with httpx.Client(base_url=server.url) as h:
        replies = [
            h.post("/v1/losses", json={"name": "p", "format": "cloudpickle", "payload_b64": payload,
                                       "python": "3.11.0"}, headers=headers),
            h.post("/register_custom_loss", json={"loss_name": "p", "loss_fn_serialized": payload}, headers=headers),
        ]
    return client, replies, canary


def test_pickled_upload_is_forbidden_by_default(server, tmp_path):
    client, replies, canary = _pickled_attempts(server, tmp_path)
    try:
        for reply in replies:
            assert reply.status_code == 403
            body = reply.json()
            assert body["code"] == "forbidden_pickled_code"
            assert "--allow-pickled-code" in body["error"] and "API key" in body["error"]
        assert not canary.exists()
        with pytest.raises(RequestFailed) as info:
            client.register_custom_loss("p", quickstart_loss, mode="pickle")
        assert info.value.status == 403
    finally:
        client.close()


def test_pickled_upload_needs_the_flag_and_a_key(start_server, tmp_path):
    no_key = start_server(allow_pickled_code=True)
    client, replies, canary = _pickled_attempts(no_key, tmp_path)
    client.close()
    assert [r.status_code for r in replies] == [403, 403] and not canary.exists()

    keyed = start_server(allow_pickled_code=True, api_key=["tml-pickle"])
    with TinkerClient(keyed.url, api_key="tml-pickle") as c:
        reply = c.register_custom_loss("pickled_ce", quickstart_loss, mode="pickle")
        assert reply["unsafe"] is True
        listed = {x["name"]: x for x in c.list_loss_functions()["custom"]}
        assert listed["pickled_ce"]["unsafe"] is True
        model = c.create_model("m", rank=4, seed=0)
        tt = [row[1:] + [0] for row in ROWS]  # pickled losses see rows as given: no shift
        res = c.forward_backward(model, ROWS, "pickled_ce", {"target_tokens": tt})
        assert res["metrics"]["loss"] == pytest.approx(res["loss"])
        bad = dict(format="cloudpickle", payload_b64=base64.b64encode(b"x").decode(), python="2.7.18", name="old")
        with pytest.raises(RequestFailed) as info:
            c._call("POST", "/v1/losses", bad)
        assert info.value.code == "pickle_version_mismatch"
