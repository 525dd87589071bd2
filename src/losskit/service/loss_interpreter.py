"""The interpreter of a custom loss: runs resolved nodes one by one, with bounds, size and time checks.

Never generated code: each node's callable comes from the allowlist and is called with the decoded arguments.
Before the call, indices of ``gather``, ``take_along_dim``, ``one_hot`` and tensor indexing are bounds-checked
(on CUDA an out-of-range index is a device-side assert that kills the process), and a shape-only dry run on the
``meta`` device refuses a result above the element cap before any memory is allocated (ops without a meta form
are checked after the call). The time limit is checked between nodes. Python arithmetic is limited to numbers
and tensors, and integer results stay within int64.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Mapping
from typing import Any

import torch

from losskit.service import allowlist
from losskit.service.loss_graph import ELEMENT_FACTOR, EXEC_DEVICE, INT_BOUND, CustomLossError, Node, Ref

# ------------------------------------------------------------------------------------------------------------


class InputsView(Mapping):
    """Read-only view of ``loss_fn_inputs``: the only thing a graph can do with it is ``view["key"]``."""

    def __init__(self, data: Mapping[str, torch.Tensor]) -> None:
        self._data = data

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


_NUMBER = (bool, int, float)


def _meta(value: Any) -> Any:
    """``value`` with every tensor replaced by an empty one of the same shape on the ``meta`` device."""
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    if isinstance(value, list):
        return [_meta(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: _meta(v) for k, v in value.items()}
    if value is EXEC_DEVICE:
        return torch.device("meta")
    return value


def _numel(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, (list, tuple)):
        return max((_numel(v) for v in value), default=0)
    return 0


class Interpreter:
    """Runs ``nodes`` of the loss ``name`` on ``device`` with an element cap and a monotonic deadline."""

    def __init__(self, name: str, nodes: tuple[Node, ...], device: torch.device, cap: int, deadline: float) -> None:
        self.name = name
        self.nodes = nodes
        self.device = device
        self.cap = cap
        self.deadline = deadline
        self.env: dict[str, Any] = {}

    def run(self, values: list) -> Any:
        nodes = self.nodes
        placeholders = [n for n in nodes if n.kind == "placeholder"]
        for node, value in zip(placeholders, values, strict=True):
            self.env[node.name] = value
        for node in nodes[len(placeholders):]:
            if time.monotonic() > self.deadline:
                raise CustomLossError(
                    "loss_time_limit",
                    f"custom loss {self.name!r} ran past its time limit before node {node.name!r}",
                    {"node": node.name},
                )
            if node.kind == "output":
                return self.value(node.args[0])
            args = tuple(self.value(a) for a in node.args)
            kwargs = {k: self.value(v) for k, v in node.kwargs}
            try:
                result = self.call(node, args, kwargs)
            except CustomLossError:
                raise
            except (RuntimeError, IndexError, TypeError, ValueError, OverflowError, ZeroDivisionError) as exc:
                raise CustomLossError(
                    "loss_runtime_error",
                    f"custom loss {self.name!r}: node {node.name!r} ({node.target}) failed: {exc}",
                    {"node": node.name, "target": node.target},
                ) from None
            self.check_size(node, result)
            self.env[node.name] = result
        raise AssertionError("the parser guarantees an output node")  # pragma: no cover

    def value(self, a: Any) -> Any:
        if isinstance(a, Ref):
            return self.env[a.name]
        if isinstance(a, list):
            return [self.value(v) for v in a]
        if isinstance(a, tuple):
            return tuple(self.value(v) for v in a)
        if isinstance(a, dict):
            return {k: self.value(v) for k, v in a.items()}
        if isinstance(a, slice):
            return slice(self.value(a.start), self.value(a.stop), self.value(a.step))
        if a is EXEC_DEVICE:
            return self.device
        return a

    def fail(self, node: Node, message: str) -> CustomLossError:
        return CustomLossError(
            "loss_runtime_error", f"custom loss {self.name!r}: node {node.name!r} ({node.target}): {message}",
            {"node": node.name, "target": node.target},
        )

    def check_size(self, node: Node, result: Any) -> None:
        n = _numel(result)
        if n > self.cap:
            raise CustomLossError(
                "loss_too_large",
                f"custom loss {self.name!r}: node {node.name!r} ({node.target}) produces {n} elements, above the "
                f"limit of {self.cap} ({ELEMENT_FACTOR} x the logits)",
                {"node": node.name, "target": node.target},
            )

    def call(self, node: Node, args: tuple, kwargs: dict) -> Any:
        op = node.op
        kind = op.kind
        if node.kind == "call_method" and (not args or not isinstance(args[0], torch.Tensor)):
            got = type(args[0]).__name__ if args else "nothing"
            raise self.fail(node, f"the receiver of a method must be a tensor, got {got}")
        if kind == "getitem":
            return self.getitem(node, args)
        if kind == "getattr":
            if not isinstance(args[0], torch.Tensor):
                raise self.fail(node, f"getattr needs a tensor, got {type(args[0]).__name__}")
            return op.fn(args[0], args[1])
        if any(isinstance(a, InputsView) for a in (*args, *kwargs.values())):
            raise self.fail(node, "loss_fn_inputs can only be indexed")
        if kind == "math":
            if kwargs or not all(isinstance(a, _NUMBER) for a in args):
                raise self.fail(node, "math functions take Python numbers only (hyperparameters, scalars)")
            return op.fn(*args)
        if kind == "operator":
            return self.arith(node, op, args)
        if kind == "to" and (any(not isinstance(a, torch.dtype) for a in args[1:]) or set(kwargs) - {"dtype"}):
            raise self.fail(node, "to() takes a dtype only (device moves are not allowed)")
        if kind in ("gather", "take_along_dim", "one_hot"):
            self.check_indices(node, kind, args, kwargs)
        self.dry_run(node, op, args, kwargs)
        return op.fn(*args, **kwargs)

    def dry_run(self, node: Node, op: allowlist.Op, args: tuple, kwargs: dict) -> None:
        """Shape-only run on ``meta`` tensors: refuse an oversized result before memory is allocated."""
        try:
            result = op.fn(*_meta(args), **_meta(kwargs))
        except Exception:  # noqa: BLE001 - data-dependent ops have no meta form; the real call decides
            return
        self.check_size(node, result)

    def arith(self, node: Node, op: allowlist.Op, args: tuple) -> Any:
        for a in args:
            if not isinstance(a, (torch.Tensor, *_NUMBER, torch.Size)):
                raise self.fail(node, f"operators take tensors and numbers, got {type(a).__name__}")
        if all(isinstance(a, (torch.Size, *_NUMBER)) for a in args) and any(
            isinstance(a, torch.Size) for a in args
        ) and op.fn not in (operator.eq, operator.ne):
            raise self.fail(node, "shapes can only be compared, not used in arithmetic")
        if op.fn is operator.pow and len(args) == 2 and all(isinstance(a, int) for a in args) \
                and abs(args[1]) > 64:
            raise self.fail(node, f"integer power with exponent {args[1]} (at most 64)")
        if not any(isinstance(a, torch.Tensor) for a in args):
            result = op.fn(*args)
            if isinstance(result, int) and not isinstance(result, bool) and abs(result) >= INT_BOUND:
                raise self.fail(node, "integer result outside the int64 range")
            return result
        self.dry_run(node, op, args, {})
        return op.fn(*args)

    def getitem(self, node: Node, args: tuple) -> Any:
        recv, key = args
        if isinstance(recv, InputsView):
            if key not in recv:
                raise CustomLossError(
                    "loss_input_missing", f"custom loss {self.name!r} reads loss_fn_inputs[{key!r}], which the "
                    "request does not provide", {"input": key},
                )
            return recv[key]
        if isinstance(recv, torch.Tensor):
            self.check_tensor_index(node, recv, key)
            self.dry_run(node, node.op, args, {})
            return recv[key]
        if isinstance(recv, (tuple, list, torch.Size)):
            if isinstance(key, bool) or not isinstance(key, (int, slice)):
                raise self.fail(node, f"a tuple result is indexed by an int or a slice, got {type(key).__name__}")
            if isinstance(key, int) and not -len(recv) <= key < len(recv):
                raise self.fail(node, f"index {key} is out of range for a result of length {len(recv)}")
            return recv[key]
        raise self.fail(node, f"cannot index a {type(recv).__name__}")

    def check_tensor_index(self, node: Node, t: torch.Tensor, key: Any) -> None:
        parts = key if isinstance(key, tuple) else (key,)
        ellipses = sum(p is Ellipsis for p in parts)
        consumed = sum(1 if not (p is None or p is Ellipsis) else 0 for p in parts)
        consumed += sum(p.dim() - 1 for p in parts if isinstance(p, torch.Tensor) and p.dtype == torch.bool)
        if ellipses > 1 or consumed > t.dim():
            raise self.fail(node, f"too many indices for a tensor of {t.dim()} dimensions")
        dim = 0
        for i, p in enumerate(parts):
            if p is Ellipsis:
                dim = t.dim() - sum(1 for q in parts[i + 1:] if q is not None and q is not Ellipsis)
                continue
            if p is None:
                continue
            if isinstance(p, bool):
                raise self.fail(node, "bool indices are not allowed (use a bool tensor)")
            if isinstance(p, int):
                size = t.shape[dim]
                if not -size <= p < size:
                    raise self.fail(node, f"index {p} is out of range for dimension {dim} of size {size}")
                dim += 1
            elif isinstance(p, slice):
                for b in (p.start, p.stop, p.step):
                    if b is not None and (isinstance(b, bool) or not isinstance(b, int)):
                        raise self.fail(node, "slice bounds must be ints")
                dim += 1
            elif isinstance(p, torch.Tensor):
                if p.dtype == torch.bool:
                    if tuple(p.shape) != tuple(t.shape[dim:dim + p.dim()]):
                        raise self.fail(node, f"bool mask of shape {tuple(p.shape)} does not match the tensor's "
                                              f"dimensions {tuple(t.shape[dim:dim + p.dim()])}")
                    dim += p.dim()
                elif p.dtype in (torch.int64, torch.int32):
                    size = t.shape[dim]
                    if p.numel() and (int(p.min()) < -size or int(p.max()) >= size):
                        raise self.fail(node, f"index tensor has values out of range [-{size}, {size}) for dimension "
                                              f"{dim}")
                    dim += 1
                else:
                    raise self.fail(node, f"index tensors must be long or bool, got {p.dtype}")
            else:
                raise self.fail(node, f"cannot index a tensor with a {type(p).__name__}")

    def check_indices(self, node: Node, kind: str, args: tuple, kwargs: dict) -> None:
        """Bounds-check the index of gather / take_along_dim / one_hot before the call (a CUDA assert would kill
        the process)."""
        if kind == "one_hot":
            x = args[0] if args else kwargs.get("tensor")
            num_classes = args[1] if len(args) > 1 else kwargs.get("num_classes", -1)
            if not isinstance(x, torch.Tensor) or x.dtype != torch.int64:
                raise self.fail(node, "one_hot needs an int64 tensor")
            if isinstance(num_classes, bool) or not isinstance(num_classes, int):
                raise self.fail(node, "one_hot's num_classes must be an int")
            hi = int(x.max()) + 1 if x.numel() else 0
            lo = int(x.min()) if x.numel() else 0
            classes = num_classes if num_classes >= 0 else hi
            if lo < 0 or hi > classes:
                raise self.fail(node, f"one_hot values must lie in [0, {classes}), got [{lo}, {hi - 1}]")
            if x.numel() * classes > self.cap:
                raise CustomLossError(
                    "loss_too_large", f"custom loss {self.name!r}: node {node.name!r} (one_hot) would produce "
                    f"{x.numel() * classes} elements, above the limit of {self.cap}", {"node": node.name},
                )
            return
        names = ("input", "dim", "index") if kind == "gather" else ("input", "indices", "dim")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        t, dim = bound.get("input"), bound.get("dim")
        index = bound.get("index" if kind == "gather" else "indices")
        if not isinstance(t, torch.Tensor) or not isinstance(index, torch.Tensor):
            raise self.fail(node, f"{kind} needs a tensor input and a tensor index")
        if index.dtype not in (torch.int64, torch.int32):
            raise self.fail(node, f"{kind}'s index must be an integer tensor, got {index.dtype}")
        if dim is None:
            size, where = t.numel(), "the flattened input"
        else:
            if isinstance(dim, bool) or not isinstance(dim, int) or not -max(t.dim(), 1) <= dim < max(t.dim(), 1):
                raise self.fail(node, f"dim {dim!r} is out of range for a tensor of {t.dim()} dimensions")
            size, where = (t.shape[dim] if t.dim() else 1), f"dimension {dim} of size {t.shape[dim] if t.dim() else 1}"
        if index.numel():
            lo, hi = int(index.min()), int(index.max())
            low_ok = lo >= 0 if kind == "gather" else lo >= -size
            if not low_ok or hi >= size:
                raise self.fail(node, f"index values [{lo}, {hi}] are out of range for {where}")
