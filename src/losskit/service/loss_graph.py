"""The custom-loss graph wire format: limits, argument decoding and node resolution through the allowlist.

A custom loss is a torch.fx graph sent as JSON (the Tinker SDK's ``CustomLossGraph`` format 1)::

    {"format": 1, "nodes": [{"op", "name", "target", "args", "kwargs"}, ...]}

Nodes are listed in execution order; ``op`` is ``placeholder``, ``call_function``, ``call_method`` or ``output``
(``get_attr`` and ``call_module`` are always rejected). Arguments are JSON scalars, strings and lists plus one-key
objects: ``{"ref": name}``, ``{"tuple": [...]}``, ``{"dict": {...}}``, ``{"slice": [start, stop, step]}``,
``{"ellipsis": true}``, ``{"float": "inf"|"-inf"|"nan"}``, ``{"dtype": ...}``, ``{"device": ...}``,
``{"layout": ...}`` and ``{"memory_format": ...}``.

``parse_nodes`` checks the limits and the structure (placeholders first, references to earlier nodes only,
unique names, one output and it comes last) and resolves every call target through ``allowlist`` by dict
lookup: no request string is ever evaluated, imported or used as an attribute name. The binding of the
placeholders (what a loss takes and returns) is ``custom_loss``'s job. Imports only torch and the standard
library.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from losskit.service import allowlist

GRAPH_FORMAT = 1

MAX_NODES = 2000
MAX_GRAPH_BYTES = 1 << 20
MAX_STRING = 256
MAX_LIST = 1024
MAX_DEPTH = 32
MAX_TINKER_INPUTS = 16
#: Each produced tensor may hold at most this many times the logits' elements.
ELEMENT_FACTOR = 4
#: Python integers produced by arithmetic stay within int64 (repeated squaring would otherwise exhaust memory).
INT_BOUND = 1 << 63

NODE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")
INPUT_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")
PARAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
INPUT_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
TINKER_METRIC_KEY = re.compile(r"custom/[a-z0-9_./-]{1,64}:(sum|mean)")
DIAGNOSTIC_KEY = re.compile(r"[A-Za-z0-9_./:-]{1,128}")
_OPS = ("placeholder", "call_function", "call_method", "output")
_NODE_KEYS = {"op", "name", "target", "args", "kwargs"}


class CustomLossError(ValueError):
    """A custom loss is invalid or failed. ``code`` is the service's error code; ``detail`` names the node."""

    def __init__(self, code: str, message: str, detail: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = dict(detail or {})


@dataclasses.dataclass(frozen=True)
class Ref:
    """A reference to an earlier node's value."""

    name: str


class _ExecDevice:
    """A ``{"device": ...}`` argument: always the execution device (the logits' device)."""

    def __repr__(self) -> str:
        return "<execution device>"


EXEC_DEVICE = _ExecDevice()


@dataclasses.dataclass(frozen=True)
class Node:
    """One resolved node: ``op`` is ``allowlist.Op`` for calls, None otherwise."""

    kind: str  # placeholder | call_function | call_method | output
    name: str
    target: str
    op: allowlist.Op | None
    args: tuple
    kwargs: tuple[tuple[str, Any], ...]


def is_json_scalar(value: Any) -> bool:
    """None, a bool, a bounded int, a float or a short string."""
    if value is None or isinstance(value, (bool, float)):
        return True
    if isinstance(value, int):
        return abs(value) < INT_BOUND
    return isinstance(value, str) and len(value) <= MAX_STRING


def invalid(message: str, **detail: Any) -> CustomLossError:
    return CustomLossError("invalid_loss_graph", message, detail)


def not_allowed(loss: str, node: str, op: str, target: str, why: str = "which is not on the allowlist"):
    what = {"call_function": "calls", "call_method": "calls method", "get_attr": "reads attribute",
            "call_module": "calls module"}.get(op, "uses")
    return CustomLossError(
        "loss_op_not_allowed",
        f"custom loss {loss!r}: node {node!r} {what} {target}, {why}",
        {"node": node, "op": op, "target": target},
    )


def _decode(value: Any, loss: str, node: str, seen: set[str], depth: int = 0) -> Any:
    """Decode one encoded argument into Python values with ``Ref`` for node references."""
    if depth > MAX_DEPTH:
        raise invalid(f"custom loss {loss!r}: node {node!r} nests arguments deeper than {MAX_DEPTH}", node=node)
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise invalid(f"custom loss {loss!r}: node {node!r} has a non-finite float; encode it as "
                           '{"float": "inf"}', node=node)
        return value
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise invalid(f"custom loss {loss!r}: node {node!r} has a string longer than {MAX_STRING}", node=node)
        return value
    if isinstance(value, list):
        if len(value) > MAX_LIST:
            raise invalid(f"custom loss {loss!r}: node {node!r} has a list longer than {MAX_LIST}", node=node)
        return [_decode(v, loss, node, seen, depth + 1) for v in value]
    if not isinstance(value, dict) or len(value) != 1:
        raise invalid(f"custom loss {loss!r}: node {node!r} has an argument that is not a JSON scalar, a list or a "
                       f"one-key tagged object: {str(value)[:80]}", node=node)
    (tag, inner), = value.items()
    if tag == "ref":
        if not isinstance(inner, str) or inner not in seen:
            raise invalid(f"custom loss {loss!r}: node {node!r} refers to {inner!r}, which is not an earlier node",
                           node=node)
        return Ref(inner)
    if tag == "tuple":
        if not isinstance(inner, list) or len(inner) > MAX_LIST:
            raise invalid(f"custom loss {loss!r}: node {node!r} has a bad tuple", node=node)
        return tuple(_decode(v, loss, node, seen, depth + 1) for v in inner)
    if tag == "dict":
        if not isinstance(inner, dict) or len(inner) > MAX_LIST or not all(isinstance(k, str) and
                                                                            len(k) <= MAX_STRING for k in inner):
            raise invalid(f"custom loss {loss!r}: node {node!r} has a bad dict (string keys only)", node=node)
        return {k: _decode(v, loss, node, seen, depth + 1) for k, v in inner.items()}
    if tag == "slice":
        if not isinstance(inner, list) or len(inner) != 3:
            raise invalid(f"custom loss {loss!r}: node {node!r} has a slice that is not [start, stop, step]",
                           node=node)
        return slice(*(_decode(v, loss, node, seen, depth + 1) for v in inner))
    if tag == "ellipsis":
        return Ellipsis
    if tag == "float":
        table = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
        if inner not in table:
            raise invalid(f"custom loss {loss!r}: node {node!r} has float {inner!r} (expected inf, -inf or nan)",
                           node=node)
        return table[inner]
    tables = {"dtype": allowlist.DTYPES, "layout": allowlist.LAYOUTS, "memory_format": allowlist.MEMORY_FORMATS}
    if tag in tables:
        if inner not in tables[tag]:
            raise invalid(f"custom loss {loss!r}: node {node!r} has {tag} {str(inner)[:40]!r} (accepted: "
                           f"{', '.join(tables[tag])})", node=node)
        return tables[tag][inner]
    if tag == "device":
        if not isinstance(inner, str) or len(inner) > MAX_STRING:
            raise invalid(f"custom loss {loss!r}: node {node!r} has a bad device", node=node)
        return EXEC_DEVICE
    raise invalid(f"custom loss {loss!r}: node {node!r} has an argument tagged {str(tag)[:40]!r} (accepted: ref, "
                   "tuple, dict, slice, ellipsis, float, dtype, device, layout, memory_format)", node=node)


def refs(value: Any):
    if isinstance(value, Ref):
        yield value.name
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from refs(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from refs(v)
    elif isinstance(value, slice):
        yield from refs([value.start, value.stop, value.step])


def canonical_graph_json(graph: Mapping[str, Any]) -> str:
    """The graph as canonical JSON (sorted keys, no spaces): what the content hash is taken of."""
    return json.dumps(graph, sort_keys=True, separators=(",", ":"), allow_nan=False)


def parse_nodes(graph: Mapping[str, Any], loss: str, max_nodes: int) -> tuple[Node, ...]:
    """Check ``graph["nodes"]`` and resolve them (see the module docstring)."""
    nodes_in = graph.get("nodes")
    if not isinstance(nodes_in, list) or not nodes_in:
        raise invalid(f"custom loss {loss!r}: nodes must be a non-empty list")
    if len(nodes_in) > max_nodes:
        raise invalid(f"custom loss {loss!r}: graph has {len(nodes_in)} nodes, above the limit of {max_nodes}")
    seen: set[str] = set()
    nodes: list[Node] = []
    for i, raw in enumerate(nodes_in):
        nodes.append(_parse_node(raw, i, len(nodes_in), loss, seen, nodes))
        seen.add(nodes[-1].name)
    return tuple(nodes)


def _parse_node(raw: Any, i: int, count: int, loss: str, seen: set[str], previous: list[Node]) -> Node:
    if not isinstance(raw, dict) or not {"op", "name", "target"} <= set(raw) or set(raw) - _NODE_KEYS:
        raise invalid(f"custom loss {loss!r}: node #{i} must be an object with op, name, target, args, kwargs")
    op, node_name, target = raw["op"], raw["name"], raw["target"]
    if not isinstance(node_name, str) or not NODE_NAME.fullmatch(node_name):
        raise invalid(f"custom loss {loss!r}: node #{i} has a bad name {str(node_name)[:40]!r}")
    if node_name in seen:
        raise invalid(f"custom loss {loss!r}: node name {node_name!r} is used twice", node=node_name)
    if not isinstance(target, str) or len(target) > MAX_STRING:
        raise invalid(f"custom loss {loss!r}: node {node_name!r} has a bad target", node=node_name)
    if op in ("get_attr", "call_module"):
        why = ("a tensor captured by the loss (a global, or a factory such as torch.zeros with constant sizes, "
               "which runs while tracing); a custom loss may only read its inputs" if op == "get_attr"
               else "a custom loss cannot use nn modules, only functions such as torch.nn.functional")
        raise not_allowed(loss, node_name, op, target, why)
    if op not in _OPS:
        raise invalid(f"custom loss {loss!r}: node {node_name!r} has op {str(op)[:40]!r} (accepted: "
                       f"{', '.join(_OPS)})", node=node_name)
    args_in, kwargs_in = raw.get("args", []), raw.get("kwargs", {})
    if not isinstance(args_in, list) or not isinstance(kwargs_in, dict) or len(args_in) > MAX_LIST:
        raise invalid(f"custom loss {loss!r}: node {node_name!r} needs a list args and an object kwargs",
                       node=node_name)
    if op == "placeholder" and previous and previous[-1].kind != "placeholder":
        raise invalid(f"custom loss {loss!r}: placeholder {node_name!r} comes after a computation; placeholders "
                       "come first", node=node_name)
    if op == "output" and i != count - 1:
        raise invalid(f"custom loss {loss!r}: output node {node_name!r} must be the last node", node=node_name)
    if op != "output" and i == count - 1:
        raise invalid(f"custom loss {loss!r}: the last node must be the output node")
    args = tuple(_decode(a, loss, node_name, seen) for a in args_in)
    kwargs = tuple((str(k), _decode(v, loss, node_name, seen)) for k, v in kwargs_in.items())
    resolved = None
    if op == "call_function":
        resolved = allowlist.FUNCTIONS.get(target)
        if resolved is None:
            raise not_allowed(loss, node_name, op, target)
    elif op == "call_method":
        resolved = allowlist.METHODS.get(target)
        if resolved is None:
            why = "which is not on the allowlist"
            if target.endswith("_") and not target.endswith("__"):
                why = "an in-place method (not on the allowlist; use the out-of-place form)"
            elif target == "item":
                why = "which is not on the allowlist (losskit.client rewrites .item() to .detach())"
            raise not_allowed(loss, node_name, op, target, why)
    if resolved is not None:
        bad = [k for k, _ in kwargs if k in allowlist.FORBIDDEN_KWARGS]
        if bad:
            raise not_allowed(loss, node_name, op, f"{target}(..., {bad[0]}=...)",
                               "and out= arguments are not allowed")
        if resolved.kind == "getattr":
            attr = args[1] if len(args) == 2 else None
            if not isinstance(attr, str) or attr not in allowlist.GETATTR_ATTRIBUTES:
                raise not_allowed(loss, node_name, op, f"getattr(..., {str(attr)[:40]!r})",
                                   f"which is not allowed (attributes: {', '.join(allowlist.GETATTR_ATTRIBUTES)})")
    return Node(op, node_name, target, resolved, args, kwargs)
