"""Trace a seed-002 loss function into a ``losskit.native/1`` graph (the client side of a custom-loss upload).

``trace_native_loss(fn, name=...)`` follows five steps:

1. **Signature.** The first three positional parameters bind to ``model_outputs``, ``loss_fn_inputs`` and
   ``attention_mask``, whatever their names. Every further parameter needs a JSON-scalar default and becomes a
   hyperparameter (``beta=0.1``). ``**kwargs`` is allowed when the function reads it only as
   ``kwargs.get("x", default)`` (an optional hyperparameter) or ``kwargs["x"]`` (required in each request), with
   constant names; ``*args`` is rejected.
2. **Trace** with a ``torch.fx.Tracer``. ``torch.no_grad``, ``enable_grad``, ``set_grad_enabled`` and
   ``inference_mode`` raise "use .detach() instead" while tracing, because fx silently drops grad-mode context
   managers (which would change the gradient). ``float()``, ``int()`` or ``bool()`` on a traced value and
   branching on a tensor raise ``CustomLossTraceError`` with the alternative (``.item()`` for diagnostics,
   ``torch.where`` for branches).
3. **Normalise the output.** A returned ``LossFnOutput`` or ``(loss, logprobs, diagnostics)`` tuple becomes the
   output tuple; no class is ever recorded as a call target.
4. **``.item()``** nodes are rewritten to ``.detach()``: the value stays a 0-d tensor with the same number and no
   gradient, which is what a Python float is to autograd. The server turns diagnostics into floats after the
   backward pass, in one host sync.
5. **Check.** The graph is encoded (public names from ``allowlist``) and parsed by the server's own checks
   (``custom_loss.parse_graph``), so a disallowed op fails here, at decoration time.

The grad-mode functions are swapped on the ``torch`` module for the duration of the trace (a fraction of a
second); another thread of the same process that enters ``torch.no_grad()`` during that window gets the error.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import inspect
import math
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx
from torch.fx.node import _get_qualified_name

from losskit.contract import LossFnOutput
from losskit.service import allowlist
from losskit.service.custom_loss import NATIVE_KIND, LossProgram, parse_graph
from losskit.service.loss_graph import CustomLossError, is_json_scalar

__all__ = ["CustomLossTraceError", "TracedLoss", "encode_graph", "trace_native_loss"]

_GRAD_MODES = ("no_grad", "enable_grad", "set_grad_enabled", "inference_mode")


class CustomLossTraceError(CustomLossError):
    """A loss function cannot be traced into an uploadable graph; the message says why and what to do."""

    def __init__(self, message: str) -> None:
        super().__init__("trace_error", message)


@dataclasses.dataclass(frozen=True)
class TracedLoss:
    """The result of tracing: the ``GraphModule`` (runs locally), the wire JSON, and the checked program."""

    graph_module: torch.fx.GraphModule
    graph: dict[str, Any]
    program: LossProgram


def _fn_name(fn: Callable) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


@dataclasses.dataclass(frozen=True)
class _Signature:
    positional: tuple[str, str, str]
    hyper: tuple[tuple[str, Any], ...]          # named parameters with defaults
    kwargs: tuple[tuple[str, Any], ...]         # names read from **kwargs; default or _REQUIRED
    kwargs_name: str | None


_REQUIRED = object()


def _signature(fn: Callable, name: str) -> _Signature:
    params = list(inspect.signature(fn).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 3:
        raise CustomLossTraceError(
            f"custom loss {name!r}: {_fn_name(fn)} must take (model_outputs, loss_fn_inputs, attention_mask) as its "
            f"first three positional parameters, got {[p.name for p in params]}"
        )
    first = tuple(p.name for p in positional[:3])
    hyper: list[tuple[str, Any]] = []
    kwargs_name = None
    for p in params:
        if p.name in first:
            if p.default is not p.empty:
                raise CustomLossTraceError(f"custom loss {name!r}: parameter {p.name!r} cannot have a default")
            continue
        if p.kind == p.VAR_POSITIONAL:
            raise CustomLossTraceError(f"custom loss {name!r}: *{p.name} is not supported; name each hyperparameter")
        if p.kind == p.VAR_KEYWORD:
            kwargs_name = p.name
            continue
        if p.default is p.empty or not is_json_scalar(p.default):
            raise CustomLossTraceError(
                f"custom loss {name!r}: hyperparameter {p.name!r} needs a JSON-scalar default (a number, bool, "
                f"string or None), got {'none' if p.default is p.empty else repr(p.default)}"
            )
        hyper.append((p.name, p.default))
    kwargs = _kwargs_reads(fn, name, kwargs_name) if kwargs_name else ()
    taken = {h for h, _ in hyper}
    clash = [k for k, _ in kwargs if k in taken or k in first]
    if clash:
        raise CustomLossTraceError(f"custom loss {name!r}: kwargs reads {clash[0]!r}, which is also a parameter")
    return _Signature(first, tuple(hyper), kwargs, kwargs_name)


def _kwargs_reads(fn: Callable, name: str, kwargs_name: str) -> tuple[tuple[str, Any], ...]:
    """The ``kwargs.get("x", d)`` / ``kwargs["x"]`` reads of ``fn``'s source, in order of appearance."""
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        raise CustomLossTraceError(
            f"custom loss {name!r}: **{kwargs_name} needs the function's source to find the hyperparameters it "
            "reads; name them as parameters with defaults instead"
        ) from None
    tree = ast.parse(source)
    func = next((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    if func is None:
        raise CustomLossTraceError(f"custom loss {name!r}: cannot find the definition of {_fn_name(fn)}")
    parents = {child: node for node in ast.walk(func) for child in ast.iter_child_nodes(node)}
    reads: dict[str, Any] = {}

    def bad(node: ast.AST) -> CustomLossTraceError:
        return CustomLossTraceError(
            f"custom loss {name!r}: line {getattr(node, 'lineno', '?')} uses {kwargs_name} other than as "
            f'{kwargs_name}.get("name", default) or {kwargs_name}["name"] with a constant name'
        )

    for node in ast.walk(func):
        if not (isinstance(node, ast.Name) and node.id == kwargs_name):
            continue
        parent = parents.get(node)
        if isinstance(parent, ast.Subscript) and parent.value is node:
            key = parent.slice
            if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
                raise bad(node)
            reads[key.value] = _REQUIRED  # a subscript read makes it required, whatever .get() reads say
            continue
        call = parents.get(parent)
        if not (isinstance(parent, ast.Attribute) and parent.attr == "get" and isinstance(call, ast.Call)
                and call.func is parent and 1 <= len(call.args) <= 2 and not call.keywords):
            raise bad(node)
        key = call.args[0]
        if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
            raise bad(node)
        default = None
        if len(call.args) == 2:
            try:
                default = ast.literal_eval(call.args[1])
            except ValueError:
                raise CustomLossTraceError(
                    f"custom loss {name!r}: the default of {kwargs_name}.get({key.value!r}, ...) must be a constant"
                ) from None
        if not is_json_scalar(default):
            raise CustomLossTraceError(
                f"custom loss {name!r}: the default of {kwargs_name}.get({key.value!r}, ...) must be a JSON scalar"
            )
        previous = reads.get(key.value, default)
        if previous is not _REQUIRED and previous != default:
            raise CustomLossTraceError(f"custom loss {name!r}: {kwargs_name}.get({key.value!r}) has two defaults")
        if previous is not _REQUIRED:
            reads[key.value] = default
    return tuple(reads.items())


class _TraceProxy(torch.fx.Proxy):
    """A Proxy that explains, instead of failing obscurely, what cannot be traced."""

    @staticmethod
    def _host(what: str) -> CustomLossTraceError:
        return CustomLossTraceError(
            f"{what}() of a traced value: a custom loss cannot turn a tensor into a Python number while it is "
            "traced; keep tensors (use .item() only for diagnostics, torch.where for choices)"
        )

    def __float__(self):
        raise self._host("float")

    def __int__(self):
        raise self._host("int")

    def __index__(self):
        raise self._host("int")


class _Tracer(torch.fx.Tracer):
    def __init__(self, fn: Callable, sig: _Signature, name: str) -> None:
        super().__init__(autowrap_modules=(math,))
        self._fn = fn
        self._sig = sig
        self._name = name

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _TraceProxy(node, self)

    def to_bool(self, obj: torch.fx.Proxy) -> bool:
        raise CustomLossTraceError(
            f"custom loss {self._name!r}: bool() of a traced value (an if/while on a tensor, `and`/`or`, or "
            "bool()): the graph cannot branch on data; use torch.where(cond, a, b)"
        )

    def iter(self, obj: torch.fx.Proxy) -> Iterator:
        raise CustomLossTraceError(
            f"custom loss {self._name!r}: iterating over a traced value (a for loop over a tensor or over "
            "loss_fn_inputs) cannot be recorded; index with constants instead"
        )

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, LossFnOutput):
            return self.create_arg((a.loss, a.logprobs, dict(a.diagnostics)))
        return super().create_arg(a)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        sig = self._sig
        args = [self.create_proxy("placeholder", n, (), {}) for n in sig.positional]
        # Required hyperparameters first, so that the GraphModule's forward() is valid Python.
        ordered = [(n, d) for n, d in sig.kwargs if d is _REQUIRED] + list(sig.hyper)
        ordered += [(n, d) for n, d in sig.kwargs if d is not _REQUIRED]
        named = [(n, self.create_proxy("placeholder", n, () if d is _REQUIRED else (d,), {})) for n, d in ordered]
        keys = [n for n, _ in named]
        fn = self._fn

        def root(*values):
            return fn(*values[:3], **dict(zip(keys, values[3:], strict=True)))

        return root, args + [p for _, p in named]


@contextlib.contextmanager
def _grad_modes_forbidden(name: str) -> Iterator[None]:
    def forbidden(*_args, **_kwargs):
        raise CustomLossTraceError(
            f"custom loss {name!r}: torch.no_grad / enable_grad / set_grad_enabled / inference_mode cannot be "
            "recorded (torch.fx drops them, which would change the gradient); use .detach() instead"
        )

    saved = [(mod, n, getattr(mod, n)) for mod in (torch, torch.autograd) for n in _GRAD_MODES if hasattr(mod, n)]
    try:
        for mod, n, _ in saved:
            setattr(mod, n, forbidden)
        yield
    finally:
        for mod, n, value in saved:
            setattr(mod, n, value)


def _wire_target(target: Any) -> str:
    name = allowlist.public_name(target)
    if name is not None:
        return name
    qualified = _get_qualified_name(target)
    return "operator." + qualified[len("_operator."):] if qualified.startswith("_operator.") else qualified


def _encode_arg(arg: Any) -> Any:
    if isinstance(arg, torch.fx.Node):
        return {"ref": arg.name}
    if isinstance(arg, float) and not math.isfinite(arg):
        return {"float": str(arg)}
    if arg is None or isinstance(arg, (bool, int, float, str)):
        return arg
    if isinstance(arg, list):
        return [_encode_arg(a) for a in arg]
    if isinstance(arg, tuple):
        return {"tuple": [_encode_arg(a) for a in arg]}
    if isinstance(arg, dict) and all(isinstance(k, str) for k in arg):
        return {"dict": {k: _encode_arg(v) for k, v in arg.items()}}
    if isinstance(arg, slice):
        return {"slice": [_encode_arg(a) for a in (arg.start, arg.stop, arg.step)]}
    if arg is Ellipsis:
        return {"ellipsis": True}
    for cls, tag in ((torch.dtype, "dtype"), (torch.device, "device"), (torch.layout, "layout"),
                     (torch.memory_format, "memory_format")):
        if isinstance(arg, cls):
            return {tag: str(arg).removeprefix("torch.")}
    raise CustomLossTraceError(
        f"a {type(arg).__name__} argument cannot be sent to the server (captured objects are not allowed)"
    )


def encode_graph(graph: torch.fx.Graph, *, kind: str | None = None,
                 hyperparameters: dict[str, Any] | None = None) -> dict[str, Any]:
    """An fx graph as the wire JSON ``{"format": 1, "nodes": [...]}`` (plus ``kind`` and ``hyperparameters``)."""
    nodes = []
    for node in graph.nodes:
        target = _wire_target(node.target) if node.op == "call_function" else str(node.target)
        nodes.append({
            "op": node.op, "name": node.name, "target": target,
            "args": [_encode_arg(a) for a in node.args],
            "kwargs": {k: _encode_arg(v) for k, v in node.kwargs.items()},
        })
    out: dict[str, Any] = {"format": 1, "nodes": nodes}
    if kind is not None:
        out["kind"] = kind
    if hyperparameters is not None:
        out["hyperparameters"] = hyperparameters
    return out


def trace_native_loss(fn: Callable, *, name: str, max_nodes: int = 2000) -> TracedLoss:
    """Trace ``fn`` (seed 002's loss signature) into a checked ``losskit.native/1`` graph (see the module doc).

    Raises:
        CustomLossTraceError: the function cannot be traced, with the reason and the alternative.
        CustomLossError: the traced graph fails the server's checks (``loss_op_not_allowed`` names the node).
    """
    sig = _signature(fn, name)
    tracer = _Tracer(fn, sig, name)
    try:
        with _grad_modes_forbidden(name):
            graph = tracer.trace(fn)
    except CustomLossError:
        raise
    except Exception as exc:  # noqa: BLE001 - any tracing failure is reported with its reason
        raise CustomLossTraceError(f"custom loss {name!r}: {_fn_name(fn)} cannot be traced: {exc}") from None
    for node in graph.nodes:
        if node.op == "call_method" and node.target == "item":
            node.target = "detach"
    out = next(n for n in graph.nodes if n.op == "output")
    result = out.args[0]
    if not (isinstance(result, tuple) and len(result) == 3 and isinstance(result[2], dict)):
        raise CustomLossTraceError(
            f"custom loss {name!r} must return LossFnOutput(loss=..., logprobs=..., diagnostics={{...}}) or a "
            "(loss, logprobs, diagnostics) tuple"
        )
    graph.lint()
    module = torch.fx.GraphModule(tracer.root, graph)
    hyper = {n: d for n, d in sig.hyper}
    hyper.update({n: d for n, d in sig.kwargs if d is not _REQUIRED})
    wire = encode_graph(graph, kind=NATIVE_KIND, hyperparameters=hyper)
    program = parse_graph(wire, name=name, max_nodes=max_nodes)
    return TracedLoss(graph_module=module, graph=wire, program=program)

