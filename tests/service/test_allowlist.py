"""Every allowlist entry runs through the interpreter and equals eager torch; forbidden families are rejected."""

import math
import operator
import pathlib

import pytest
import torch

from losskit.service import allowlist
from losskit.service.custom_loss import CustomLossError
from losskit.service.loss_graph import parse_nodes
from losskit.service.loss_interpreter import Interpreter


def _names(text):
    return text.split()


def R(name):
    return {"ref": name}


def _inputs():
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(3, 4, generator=g, dtype=torch.float64),
        "y": torch.rand(3, 4, generator=g, dtype=torch.float64) * 0.9 + 0.05,
        "v": torch.randn(4, generator=g, dtype=torch.float64),
        "z": torch.randn(2, 3, 3, generator=g, dtype=torch.float64),
        "i": torch.randint(0, 4, (3, 4), generator=g),
        "t": torch.randint(0, 4, (3,), generator=g),
        "b": torch.rand(3, 4, generator=g) > 0.5,
        "c": torch.rand(3, 4, generator=g) > 0.5,
        "s": 0.5,
    }


X, Y, V, Z, I, T, B, C, S = (R(n) for n in "xyvzitbcs")

# (wire target, op, args, kwargs); the reference resolves the wire name with Python attribute lookups.
FUNCTION_CASES = [
    *[(f"torch.{n}", [X], {}) for n in _names(
        "exp log1p expm1 sigmoid tanh abs sign square sum mean prod std var isnan isfinite nan_to_num argmax "
        "argmin flatten squeeze logical_not zeros_like ones_like amin amax min max norm")],
    *[(f"torch.{n}", [Y], {}) for n in ("log", "log2", "sqrt", "rsqrt")],
    ("torch.pow", [X, 2], {}), ("torch.clamp", [X, -0.5, 0.5], {}), ("torch.clip", [X], {"min": -0.1}),
    ("torch.minimum", [X, Y], {}), ("torch.maximum", [X, Y], {}), ("torch.where", [B, X, 0.0], {}),
    ("torch.logsumexp", [X], {"dim": -1}), ("torch.softmax", [X, -1], {}), ("torch.log_softmax", [X, -1], {}),
    ("torch.cumsum", [X], {"dim": 0}), ("torch.gather", [X, 1, I], {}),
    ("torch.take_along_dim", [X, I], {"dim": 1}), ("torch.stack", [[X, Y]], {}), ("torch.cat", [[X, Y]], {"dim": 1}),
    ("torch.split", [X, 2], {}), ("torch.chunk", [X, 2], {}), ("torch.reshape", [X, {"tuple": [4, 3]}], {}),
    ("torch.unsqueeze", [X, 0], {}), ("torch.transpose", [X, 0, 1], {}),
    ("torch.permute", [X, {"tuple": [1, 0]}], {}), ("torch.matmul", [X, V], {}), ("torch.bmm", [Z, Z], {}),
    ("torch.einsum", ["ij,j->i", X, V], {}), ("torch.full_like", [X, 2.0], {}),
    ("torch.logical_and", [B, C], {}), ("torch.logical_or", [B, C], {}), ("torch.logical_xor", [B, C], {}),
    ("torch.topk", [X, 2], {}), ("torch.sort", [X], {"dim": -1}),
    *[(f"torch.{n}", [X, 0.0], {}) for n in ("eq", "ne", "lt", "le", "gt", "ge")],
    ("torch.linalg.vector_norm", [X], {"ord": 2}),
    *[(f"torch.nn.functional.{n}", [X], {}) for n in ("logsigmoid", "softplus", "relu", "silu", "gelu",
                                                      "normalize")],
    ("torch.nn.functional.log_softmax", [X], {"dim": -1}), ("torch.nn.functional.softmax", [X], {"dim": -1}),
    ("torch.nn.functional.cross_entropy", [X, T], {"reduction": "sum"}),
    ("torch.nn.functional.nll_loss", [X, T], {}), ("torch.nn.functional.kl_div", [X, Y], {"reduction": "sum"}),
    ("torch.nn.functional.mse_loss", [X, Y], {}), ("torch.nn.functional.smooth_l1_loss", [X, Y], {}),
    ("torch.nn.functional.binary_cross_entropy_with_logits", [X, Y], {}),
    ("torch.nn.functional.one_hot", [T], {"num_classes": 4}), ("torch.nn.functional.pad", [X, [1, 1]], {}),
    ("torch.nn.functional.cosine_similarity", [X, Y], {}),
    *[(f"operator.{n}", [X, Y], {}) for n in ("add", "sub", "mul", "truediv", "floordiv", "mod", "eq", "ne", "lt",
                                             "le", "gt", "ge")],
    ("operator.pow", [X, 2], {}), ("operator.matmul", [X, V], {}),
    *[(f"operator.{n}", [X], {}) for n in ("neg", "pos", "abs")],
    *[(f"operator.{n}", [B, C], {}) for n in ("and_", "or_", "xor")], ("operator.invert", [B], {}),
    ("operator.getitem", [X, {"tuple": [{"slice": [None, 2, None]}, 1]}], {}),
    *[(f"math.{n}", [S], {}) for n in ("exp", "log", "log1p", "expm1", "sqrt", "tanh", "sin", "cos", "isfinite")],
    ("math.pow", [S, 3.0], {}), ("builtins.getattr", [X, "shape"], {}),
]

METHOD_CASES = [
    *[(n, [X], {}) for n in _names(
        "exp log1p expm1 sigmoid tanh abs sign square sum mean prod std var isnan isfinite nan_to_num argmax "
        "argmin flatten squeeze amin amax min max norm float double half bfloat16 long int bool detach clone "
        "contiguous t size dim numel all any neg reciprocal logical_not")],
    *[(n, [Y], {}) for n in ("log", "log2", "sqrt", "rsqrt")],
    ("pow", [X, 2], {}), ("clamp", [X, -0.5, 0.5], {}), ("clip", [X], {"max": 0.3}), ("minimum", [X, Y], {}),
    ("maximum", [X, Y], {}), ("where", [X, B, 0.0], {}), ("logsumexp", [X, -1], {}), ("softmax", [X, -1], {}),
    ("log_softmax", [X], {"dim": -1}), ("cumsum", [X, 1], {}), ("gather", [X], {"dim": -1, "index": I}),
    ("take_along_dim", [X, I, 1], {}), ("split", [X, 2], {}), ("chunk", [X, 2], {}), ("reshape", [X, 12], {}),
    ("unsqueeze", [X, -1], {}), ("transpose", [X, 0, 1], {}), ("permute", [X, 1, 0], {}),
    ("matmul", [X, V], {}), ("bmm", [Z, Z], {}), ("logical_and", [B, C], {}), ("logical_or", [B, C], {}),
    ("logical_xor", [B, C], {}), ("topk", [X, 3], {}), ("sort", [X], {"descending": True}),
    *[(n, [X, 0.0], {}) for n in ("eq", "ne", "lt", "le", "gt", "ge")],
    ("to", [X, {"dtype": "float32"}], {}), ("type_as", [I, X], {}), ("view", [X, 4, 3], {}), ("view_as", [X, Y], {}),
    ("expand", [V, 3, 4], {}), ("expand_as", [V, X], {}), ("repeat", [X, 2, 1], {}),
    ("masked_fill", [X, B, -1.0], {}), ("new_zeros", [X, {"tuple": [2, 2]}], {}), ("new_ones", [X, 3], {}),
    ("new_full", [X, {"tuple": [2]}, 7.0], {}), ("add", [X, Y], {"alpha": 2}), ("sub", [X, Y], {}),
    ("mul", [X, 3.0], {}), ("div", [X, Y], {}), ("clamp_min", [X, 0.0], {}), ("clamp_max", [X, 0.0], {}),
]


def _graph(op, target, args, kwargs):
    names = list(_inputs())
    nodes = [{"op": "placeholder", "name": n, "target": n, "args": [], "kwargs": {}} for n in names]
    nodes.append({"op": op, "name": "result", "target": target, "args": args, "kwargs": kwargs})
    nodes.append({"op": "output", "name": "output", "target": "output", "args": [R("result")], "kwargs": {}})
    return {"format": 1, "nodes": nodes}


def _interpret(op, target, args, kwargs):
    values = _inputs()
    nodes = parse_nodes(_graph(op, target, args, kwargs), "t", 100)
    return Interpreter("t", nodes, torch.device("cpu"), 10_000, math.inf).run(list(values.values())), values


def _resolve_reference(target):
    module, _, name = target.rpartition(".")
    root = {"torch": torch, "operator": operator, "math": math, "builtins": __builtins__}
    head, *rest = module.split(".")
    obj = root[head]
    for part in rest:
        obj = getattr(obj, part)
    return obj[name] if isinstance(obj, dict) else getattr(obj, name)


def _decode(a, values):
    if isinstance(a, dict):
        (tag, inner), = a.items()
        return {"ref": lambda: values[inner], "tuple": lambda: tuple(_decode(v, values) for v in inner),
                "slice": lambda: slice(*inner), "dtype": lambda: getattr(torch, inner)}[tag]()
    if isinstance(a, list):
        return [_decode(v, values) for v in a]
    return a


def _assert_same(got, want):
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    elif isinstance(want, (tuple, list)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            _assert_same(g, w)
    else:
        assert got == want or (isinstance(want, float) and math.isnan(want) and math.isnan(got))


@pytest.mark.parametrize("target,args,kwargs", FUNCTION_CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_every_function_runs_and_equals_eager(target, args, kwargs):
    got, values = _interpret("call_function", target, args, kwargs)
    fn = getattr if target == "builtins.getattr" else _resolve_reference(target)
    want = fn(*_decode(args, values), **{k: _decode(v, values) for k, v in kwargs.items()})
    _assert_same(got, want)


@pytest.mark.parametrize("target,args,kwargs", METHOD_CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_every_method_runs_and_equals_eager(target, args, kwargs):
    got, values = _interpret("call_method", target, args, kwargs)
    recv, *rest = _decode(args, values)
    want = getattr(recv, target)(*rest, **{k: _decode(v, values) for k, v in kwargs.items()})
    _assert_same(got, want)


def test_the_cases_cover_every_entry():
    public = {op.name for op in allowlist.FUNCTIONS.values()}
    assert public == {t for t, _, _ in FUNCTION_CASES}, public ^ {t for t, _, _ in FUNCTION_CASES}
    assert set(allowlist.METHODS) == {t for t, _, _ in METHOD_CASES}, set(allowlist.METHODS) ^ {
        t for t, _, _ in METHOD_CASES}


def test_qualified_aliases_resolve_to_the_public_entry():
    assert allowlist.FUNCTIONS["torch._C._nn.log_sigmoid"] is allowlist.FUNCTIONS["torch.nn.functional.logsigmoid"]
    assert allowlist.FUNCTIONS["_operator.mul"] is allowlist.FUNCTIONS["operator.mul"]
    assert allowlist.public_name(torch.nn.functional.logsigmoid) == "torch.nn.functional.logsigmoid"


# ---- forbidden families -------------------------------------------------------------------------------------

CANARY_TARGETS = [
    ("call_function", "torch.load", lambda p: [str(p)]),
    ("call_function", "torch.save", lambda p: [X, str(p)]),
    ("call_function", "builtins.eval", lambda p: [f"open({str(p)!r}, 'w')"]),
    ("call_function", "os.system", lambda p: [f"touch {p}"]),
    ("call_function", "builtins.open", lambda p: [str(p), "w"]),
    ("call_function", "torch.from_file", lambda p: [str(p)]),
    ("call_function", "torch.zeros", lambda p: [10**12]),
    ("call_function", "torch.hub.load", lambda p: ["x", "y"]),
    ("call_function", "torch.ops.aten.add", lambda p: [X, X]),
    ("call_function", "operator.setitem", lambda p: [X, 0, 1.0]),
    ("call_method", "add_", lambda p: [X, 1.0]),
    ("call_method", "backward", lambda p: [X]),
    ("call_method", "item", lambda p: [X]),
    ("call_method", "tolist", lambda p: [X]),
    ("call_method", "numpy", lambda p: [X]),
    ("call_method", "register_hook", lambda p: [X, None]),
    ("call_method", "cuda", lambda p: [X]),
    ("call_method", "as_strided", lambda p: [X, [1], [1]]),
    ("call_method", "__reduce_ex__", lambda p: [X, 2]),
    ("call_function", "builtins.getattr", lambda p: [X, "__class__"]),
    ("call_module", "linear", lambda p: [X]),
    ("get_attr", "weight", lambda p: []),
]


@pytest.mark.parametrize("op,target,make", CANARY_TARGETS, ids=[t for _, t, _ in CANARY_TARGETS])
def test_forbidden_ops_are_rejected_naming_node_and_target(tmp_path, op, target, make):
    canary = tmp_path / "canary"
    graph = _graph(op, target, make(canary), {})
    with pytest.raises(CustomLossError) as info:
        nodes = parse_nodes(graph, "evil", 100)
        Interpreter("evil", nodes, torch.device("cpu"), 10_000, math.inf).run(list(_inputs().values()))
    assert info.value.code == "loss_op_not_allowed"
    assert info.value.detail["node"] == "result" and info.value.detail["op"] == op
    assert target.split(".")[-1] in info.value.detail["target"] or "__class__" in info.value.detail["target"]
    assert "result" in str(info.value) and "evil" in str(info.value)
    assert not canary.exists()
    assert not pathlib.Path("canary").exists()


def test_out_kwarg_is_rejected():
    with pytest.raises(CustomLossError, match="out= arguments") as info:
        parse_nodes(_graph("call_function", "torch.exp", [X], {"out": Y}), "evil", 100)
    assert info.value.code == "loss_op_not_allowed"


def test_to_refuses_devices():
    with pytest.raises(CustomLossError, match="dtype only") as info:
        _interpret("call_method", "to", [X, "cuda"], {})
    assert info.value.code == "loss_runtime_error"


@pytest.mark.parametrize("target,args", [
    ("new_zeros", [X, {"tuple": [10**6, 10**6]}]),
    ("repeat", [X, 10**5, 10**5]),
    ("expand", [V, 10**9, 4]),
])
def test_oversized_results_are_refused_before_allocation(target, args):
    with pytest.raises(CustomLossError, match="above the limit") as info:
        _interpret("call_method", target, args, {})
    assert info.value.code == "loss_too_large"


@pytest.mark.parametrize("case", [
    ("call_function", "torch.gather", [X, 1, {"ref": "big"}], {}),
    ("call_method", "gather", [X, 1, {"ref": "big"}], {}),
    ("call_function", "torch.take_along_dim", [X, {"ref": "big"}], {"dim": 1}),
    ("call_function", "operator.getitem", [X, 7], {}),
    ("call_function", "operator.getitem", [X, {"ref": "big"}], {}),
    ("call_function", "torch.nn.functional.one_hot", [{"ref": "big"}], {"num_classes": 4}),
])
def test_out_of_range_indices_are_user_errors_before_the_op(case):
    op, target, args, kwargs = case
    graph = _graph(op, target, args, kwargs)
    graph["nodes"].insert(len(_inputs()), {"op": "placeholder", "name": "big", "target": "big", "args": [],
                                           "kwargs": {}})
    nodes = parse_nodes(graph, "t", 100)
    values = [*_inputs().values(), torch.full((3, 4), 9)]
    with pytest.raises(CustomLossError, match="out of range|must lie in") as info:
        Interpreter("t", nodes, torch.device("cpu"), 10_000, math.inf).run(values)
    assert info.value.code == "loss_runtime_error" and info.value.detail["node"] == "result"


def test_python_integer_arithmetic_stays_bounded():
    graph = _graph("call_function", "operator.pow", [10, 10**3], {})
    with pytest.raises(CustomLossError, match="exponent"):
        Interpreter("t", parse_nodes(graph, "t", 100), torch.device("cpu"), 10, math.inf).run(
            list(_inputs().values()))
    mul = _graph("call_function", "operator.mul", [2**62, 2**62], {})
    with pytest.raises(CustomLossError, match="int64"):
        Interpreter("t", parse_nodes(mul, "t", 100), torch.device("cpu"), 10, math.inf).run(list(_inputs().values()))
    strings = _graph("call_function", "operator.mul", ["a", 10**9], {})
    with pytest.raises(CustomLossError, match="tensors and numbers"):
        Interpreter("t", parse_nodes(strings, "t", 100), torch.device("cpu"), 10, math.inf).run(
            list(_inputs().values()))


def test_time_limit_is_enforced_between_nodes():
    nodes = parse_nodes(_graph("call_function", "torch.exp", [X], {}), "slow", 100)
    with pytest.raises(CustomLossError) as info:
        Interpreter("slow", nodes, torch.device("cpu"), 10_000, 0.0).run(list(_inputs().values()))
    assert info.value.code == "loss_time_limit"


def test_allowlist_version_is_published():
    assert allowlist.ALLOWLIST_VERSION == "1"
