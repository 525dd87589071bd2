"""Tensor JSON of the native surface: ``{"dtype", "shape", "data" | "b64"}`` or nested lists.

* ``{"dtype": "float32|int64|int32|bool|bfloat16", "shape": [...], "data": [flat]}``;
* the same with ``"b64"`` (raw little-endian bytes) instead of ``data`` (the client uses it above 1024 elements);
* nested lists, where ints become int64, floats float32 and bools bool.

Integer inputs stay integer (int32 is widened to int64), and bfloat16 is widened to float32: the seed's server
cast every input except ``target_tokens`` to float, which broke ``gather`` in its own DPO example. Ragged nested
lists are not tensors; ``decode_rows`` returns them row by row for the batcher to pad.
"""

from __future__ import annotations

import base64
import math
from typing import Any

import torch

from losskit.service.errors import ServiceError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
    "bfloat16": torch.bfloat16,
}
_WIDEN = {torch.int32: torch.int64, torch.bfloat16: torch.float32}
_NAMES = {torch.float32: "float32", torch.int64: "int64", torch.bool: "bool"}
B64_THRESHOLD = 1024
MAX_ELEMENTS = 1 << 26
MAX_DIMS = 8


def _bad(name: str, message: str) -> ServiceError:
    return ServiceError("validation_error", f"{name}: {message}", detail={"argument": name})


def is_tensor_json(value: Any) -> bool:
    """Whether ``value`` is the dict form (``dtype`` + ``shape`` + ``data``/``b64``)."""
    return isinstance(value, dict) and "dtype" in value and "shape" in value


def _dict_tensor(value: dict, name: str) -> torch.Tensor:
    unknown = set(value) - {"dtype", "shape", "data", "b64"}
    if unknown:
        raise _bad(name, f"unknown tensor key(s) {sorted(unknown)} (accepted: dtype, shape, data, b64)")
    dtype = DTYPES.get(value["dtype"])
    if dtype is None:
        raise _bad(name, f"dtype must be one of {', '.join(DTYPES)}, got {value['dtype']!r}")
    shape = value["shape"]
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                              for s in shape) or len(shape) > MAX_DIMS:
        raise _bad(name, f"shape must be a list of at most 8 non-negative ints, got {shape!r}")
    numel = math.prod(shape)
    if numel > MAX_ELEMENTS:
        raise _bad(name, f"{numel} elements, above the limit of {MAX_ELEMENTS}")
    if ("data" in value) == ("b64" in value):
        raise _bad(name, "a tensor needs exactly one of data or b64")
    if "b64" in value:
        try:
            raw = base64.b64decode(value["b64"], validate=True)
        except (ValueError, TypeError):
            raise _bad(name, "b64 is not valid base64") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        if len(raw) != numel * itemsize:
            raise _bad(name, f"b64 holds {len(raw)} bytes, expected {numel * itemsize} for shape {shape} {value['dtype']}")
        # torch reads the host byte order, which is little-endian on every platform torch supports.
        t = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        t = t.reshape(shape)
    else:
        data = value["data"]
        if not isinstance(data, list) or len(data) != numel:
            got = len(data) if isinstance(data, list) else type(data).__name__
            raise _bad(name, f"data must be a flat list of {numel} values for shape {shape}, got {got}")
        _check_scalars(data, dtype, name)
        t = torch.tensor(data, dtype=dtype).reshape(shape)
    return t.to(_WIDEN.get(dtype, dtype))


def _check_scalars(data: list, dtype: torch.dtype, name: str) -> None:
    for x in data:
        ok = isinstance(x, bool) if dtype == torch.bool else (
            isinstance(x, int) and not isinstance(x, bool) if dtype in (torch.int64, torch.int32)
            else isinstance(x, (int, float)) and not isinstance(x, bool))
        if not ok:
            raise _bad(name, f"value {x!r} does not fit dtype {dtype}")


def _leaf_dtype(values: list, name: str) -> torch.dtype:
    if all(isinstance(v, bool) for v in values):
        return torch.bool
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return torch.int64
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return torch.float32
    raise _bad(name, "nested lists must hold only numbers or only bools")


def _flatten(value: Any, name: str, depth: int = 0) -> tuple[list, list[int]] | None:
    """Flat values and shape of a rectangular nested list; None when ragged."""
    if not isinstance(value, list):
        return [value], []
    if depth >= MAX_DIMS:
        raise _bad(name, f"nested lists deeper than {MAX_DIMS} dimensions")
    if not value:
        return [], [0]
    parts = [_flatten(v, name, depth + 1) for v in value]
    if any(p is None for p in parts) or len({tuple(p[1]) for p in parts}) != 1:
        return None
    flat = [x for p in parts for x in p[0]]
    return flat, [len(value), *parts[0][1]]


def decode_tensor(value: Any, name: str) -> torch.Tensor:
    """A rectangular tensor from tensor JSON or nested lists (or a scalar); 400 ``validation_error`` otherwise.
    A torch tensor (already decoded by a binary surface) passes unchanged."""
    if isinstance(value, torch.Tensor):
        return value
    if is_tensor_json(value):
        return _dict_tensor(value, name)
    if isinstance(value, (bool, int, float)):
        return torch.tensor(value, dtype=_leaf_dtype([value], name))
    if not isinstance(value, list):
        raise _bad(name, f"expected a tensor (nested lists or {{dtype, shape, data}}), got {type(value).__name__}")
    flat = _flatten(value, name)
    if flat is None:
        raise _bad(name, "ragged nested lists are not a tensor")
    values, shape = flat
    if len(values) > MAX_ELEMENTS:
        raise _bad(name, f"{len(values)} elements, above the limit of {MAX_ELEMENTS}")
    dtype = _leaf_dtype(values, name) if values else torch.float32
    return torch.tensor(values, dtype=dtype).reshape(shape)


def decode_rows(value: Any, name: str) -> list[torch.Tensor] | torch.Tensor:
    """A ``[B, ...]`` input: a tensor when rectangular, else one tensor per row (ragged rows, padded later)."""
    if is_tensor_json(value) or not isinstance(value, list):
        return decode_tensor(value, name)
    if _flatten(value, name) is not None:
        return decode_tensor(value, name)
    return [decode_tensor(row, f"{name}[{i}]") for i, row in enumerate(value)]


def encode_tensor(t: torch.Tensor, *, b64: bool | None = None) -> dict[str, Any]:
    """Tensor JSON for ``t``: ``b64`` when asked, by default above ``B64_THRESHOLD`` elements; bfloat16 and float64
    go as float32."""
    if t.dtype in (torch.float64, torch.float16, torch.bfloat16):
        t = t.float()
    if t.dtype == torch.int32:
        t = t.long()
    if t.dtype not in _NAMES:
        raise TypeError(f"cannot encode a {t.dtype} tensor (float32, int64, bool)")
    t = t.detach().cpu().contiguous()
    out: dict[str, Any] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape)}
    if (t.numel() > B64_THRESHOLD) if b64 is None else b64:
        out["b64"] = base64.b64encode(t.numpy().tobytes()).decode("ascii")
    else:
        out["data"] = t.reshape(-1).tolist()
    return out
