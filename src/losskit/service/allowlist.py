"""The operations a custom loss may use: explicit tables built at import time from Python references.

A custom loss travels as data (a torch.fx graph, see ``custom_loss``). The server rebuilds it from these tables
only: a node's target string is a dict key here, and nothing else. Request strings never reach ``eval``,
``importlib`` or ``getattr(module, name)``; a name absent from the tables is rejected.

Keys are the public names (``torch.nn.functional.logsigmoid``, ``operator.mul``) plus the name
``torch.fx.node._get_qualified_name`` gives on this torch (``torch._C._nn.log_sigmoid``, ``_operator.mul``), so
graphs traced by plain ``torch.fx`` on a client resolve too. ``public_name(fn)`` is the reverse lookup the client
uses to encode a graph.

Absent by design: in-place methods (trailing ``_``) and ``operator.setitem``; ``item``, ``tolist``, ``numpy``,
``backward``, ``register_hook``, ``retain_grad``; device moves, storage or pointer access, ``as_strided``;
size-taking factories (``zeros``, ``empty``, ``arange``, ``full``) and random ops; ``torch.load``,
``torch.save``, ``torch.from_file``, the hub and ``ops`` namespaces. No entry touches files, the network,
processes or Python objects. Every addition needs a test (tests/service/test_allowlist.py runs every entry)
and a bump of ``ALLOWLIST_VERSION``.
"""

from __future__ import annotations

import builtins
import dataclasses
import math
import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.fx.node import _get_qualified_name

ALLOWLIST_VERSION = "1"

#: Op kinds that the interpreter treats specially (everything else is a plain tensor function).
KINDS = ("tensor", "operator", "math", "getitem", "getattr", "gather", "take_along_dim", "one_hot", "to")


@dataclasses.dataclass(frozen=True)
class Op:
    """One allowed operation.

    Attributes:
        name: the public name on the wire (``torch.exp``; for methods, the method name).
        fn: the callable the server runs (for methods, the unbound ``torch.Tensor`` method).
        kind: one of ``KINDS``; selects the interpreter's extra checks (bounds, operand types).
    """

    name: str
    fn: Callable
    kind: str = "tensor"


_TORCH_NAMES = (
    "exp", "log", "log1p", "expm1", "log2", "sigmoid", "tanh", "abs", "sign", "sqrt", "rsqrt", "square",
    "pow", "clamp", "clip", "minimum", "maximum", "min", "max", "amin", "amax", "where", "sum", "mean",
    "prod", "std", "var", "logsumexp", "softmax", "log_softmax", "cumsum", "stack", "cat", "split", "chunk",
    "reshape", "flatten", "squeeze", "unsqueeze", "transpose", "permute", "matmul", "bmm", "einsum",
    "zeros_like", "ones_like", "full_like", "isnan", "isfinite", "nan_to_num", "logical_and", "logical_or",
    "logical_not", "logical_xor", "argmax", "argmin", "topk", "sort", "norm", "eq", "ne", "lt", "le", "gt",
    "ge",
)
_TORCH_SPECIAL = {"gather": "gather", "take_along_dim": "take_along_dim"}
_FUNCTIONAL_NAMES = (
    "log_softmax", "softmax", "logsigmoid", "softplus", "relu", "silu", "gelu", "cross_entropy", "nll_loss",
    "kl_div", "mse_loss", "smooth_l1_loss", "binary_cross_entropy_with_logits", "pad", "normalize",
    "cosine_similarity",
)
_OPERATOR_NAMES = (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "matmul", "eq", "ne",
    "lt", "le", "gt", "ge", "and_", "or_", "xor", "invert",
)
_MATH_NAMES = ("exp", "log", "log1p", "expm1", "sqrt", "tanh", "sin", "cos", "pow", "isfinite")
#: Tensor methods beyond the tensor forms of the torch functions.
_METHOD_NAMES = (
    "float", "double", "half", "bfloat16", "long", "int", "bool", "type_as", "detach", "clone",
    "contiguous", "view", "view_as", "reshape", "expand", "expand_as", "repeat", "t", "size", "dim",
    "numel", "masked_fill", "new_zeros", "new_ones", "new_full", "all", "any", "add", "sub", "mul", "div",
    "neg", "reciprocal", "clamp_min", "clamp_max",
)

#: ``builtins.getattr`` may read only these attributes, each through its own accessor.
GETATTR_ATTRIBUTES: dict[str, Callable[[torch.Tensor], object]] = {
    "shape": lambda t: t.shape,
    "ndim": lambda t: t.ndim,
    "dtype": lambda t: t.dtype,
    "T": lambda t: t.T,
    "mT": lambda t: t.mT,
}

#: ``{"dtype": name}`` arguments.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
LAYOUTS: dict[str, torch.layout] = {"strided": torch.strided}
MEMORY_FORMATS: dict[str, torch.memory_format] = {
    "contiguous_format": torch.contiguous_format,
    "preserve_format": torch.preserve_format,
}

#: Keyword arguments no operation may receive (``out=`` writes into an existing tensor).
FORBIDDEN_KWARGS = frozenset({"out"})


def _safe_getattr(obj, name):
    """``builtins.getattr`` restricted to ``GETATTR_ATTRIBUTES`` on tensors (checked by the interpreter)."""
    return GETATTR_ATTRIBUTES[name](obj)


def _build() -> tuple[dict[str, Op], dict[str, Op], dict[int, str]]:
    functions: dict[str, Op] = {}
    public: dict[int, str] = {}

    def add(name: str, fn: Callable, kind: str) -> None:
        op = Op(name, fn, kind)
        functions[name] = op
        public[id(fn)] = name
        try:
            qualified = _get_qualified_name(fn)
        except (RuntimeError, AttributeError, TypeError):
            qualified = None
        if qualified and qualified != name:
            functions.setdefault(qualified, op)

    for n in _TORCH_NAMES:
        add(f"torch.{n}", getattr(torch, n), "tensor")
    for n, kind in _TORCH_SPECIAL.items():
        add(f"torch.{n}", getattr(torch, n), kind)
    add("torch.linalg.vector_norm", torch.linalg.vector_norm, "tensor")
    for n in _FUNCTIONAL_NAMES:
        add(f"torch.nn.functional.{n}", getattr(F, n), "tensor")
    add("torch.nn.functional.one_hot", F.one_hot, "one_hot")
    for n in _OPERATOR_NAMES:
        add(f"operator.{n}", getattr(operator, n), "operator")
    add("operator.getitem", operator.getitem, "getitem")
    for n in _MATH_NAMES:
        add(f"math.{n}", getattr(math, n), "math")
    op = Op("builtins.getattr", _safe_getattr, "getattr")
    functions["builtins.getattr"] = functions["getattr"] = op
    public[id(builtins.getattr)] = "builtins.getattr"

    methods: dict[str, Op] = {}
    for n in [*_TORCH_NAMES, *_TORCH_SPECIAL, *_METHOD_NAMES, "to"]:
        fn = getattr(torch.Tensor, n, None)
        if fn is None:  # torch.stack, torch.cat, ... have no tensor form
            continue
        kind = _TORCH_SPECIAL.get(n, "to" if n == "to" else "tensor")
        methods[n] = Op(n, fn, kind)
    return functions, methods, public


FUNCTIONS, METHODS, _PUBLIC = _build()


def public_name(fn: Callable) -> str | None:
    """The wire name of an allowed function (``torch._C._nn.log_sigmoid`` -> ``torch.nn.functional.logsigmoid``)."""
    return _PUBLIC.get(id(fn))
