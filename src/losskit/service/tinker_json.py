"""The JSON half of the Tinker SDK's wire protocol: request bodies parsed with the SDK's own pydantic models,
replies built with them.

The SDK's request models forbid extra fields; a newer SDK may send fields this version does not know, so unknown
fields are dropped instead, with one warning per (model, field) for the life of the process. Every other
validation failure is a 400 that names the field (broken JSON is ``invalid_json``, never a 422). Replies are the
SDK's response models dumped without None fields, so a reply the SDK would reject for a missing field fails here,
in the server's own tests, first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from typing import Any, TypeVar

import pydantic

from losskit.service.errors import ServiceError

log = logging.getLogger("losskit.serve")

M = TypeVar("M", bound=pydantic.BaseModel)
_WARNED: set[tuple[str, str]] = set()
_WARN_LOCK = threading.Lock()
#: How many rounds of dropping unknown fields one body may take (each round drops every field pydantic reports).
_MAX_ROUNDS = 8


def loads(body: bytes) -> Any:
    """The JSON value of a request body; 400 ``invalid_json`` when it is not JSON."""
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ServiceError("invalid_json", f"the request body is not valid JSON ({exc})") from None


def _drop(data: Any, loc: tuple) -> bool:
    """Delete the field at ``loc`` from nested dicts and lists; whether it was there."""
    *head, last = loc
    node = data
    for part in head:
        in_dict = isinstance(node, dict) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if not (in_dict or in_list):
            return False
        node = node[part]
    if isinstance(node, dict) and last in node:
        del node[last]
        return True
    return False


def _path(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "body"


def _message(model: type, err: dict) -> ServiceError:
    field = _path(tuple(p for p in err.get("loc", ()) if not (isinstance(p, str) and p.startswith("function-"))))
    if err.get("type") == "missing":
        return ServiceError("validation_error", f"{model.__name__}: missing field {field!r}",
                            detail={"argument": field})
    return ServiceError("validation_error", f"{model.__name__}: field {field!r}: {err.get('msg', 'invalid value')}",
                        detail={"argument": field})


def parse(model: type[M], body: bytes | Any) -> M:
    """Validate a request body (bytes, or an already decoded JSON value) as the SDK model ``model``.

    Raises:
        ServiceError: 400 ``invalid_json`` (not JSON) or ``validation_error`` naming the first bad field.
    """
    data = loads(body) if isinstance(body, (bytes, bytearray)) else body
    if not isinstance(data, dict):
        raise ServiceError("validation_error", f"{model.__name__}: the request body must be a JSON object")
    data = json.loads(json.dumps(data))  # a private copy to drop fields from
    for _ in range(_MAX_ROUNDS):
        try:
            return model.model_validate(data)
        except pydantic.ValidationError as exc:
            errors = exc.errors()
            extra = [e for e in errors if e.get("type") == "extra_forbidden"]
            if not extra or len(extra) != len(errors):
                raise _message(model, next(e for e in errors if e.get("type") != "extra_forbidden")) from None
            dropped = [e["loc"] for e in extra if _drop(data, tuple(e["loc"]))]
            if not dropped:
                raise _message(model, extra[0]) from None
            for loc in dropped:
                key = (model.__name__, _path(tuple(loc)))
                with _WARN_LOCK:
                    if key in _WARNED:
                        continue
                    _WARNED.add(key)
                log.warning("Tinker request %s: ignoring unknown field %r (a newer SDK?)", key[0], key[1])
    raise ServiceError("validation_error", f"{model.__name__}: too many unknown fields")


def dump(model: pydantic.BaseModel) -> dict[str, Any]:
    """A reply model as JSON data (None fields left out)."""
    return model.model_dump(mode="json", exclude_none=True)


def digest(model: pydantic.BaseModel) -> str:
    """SHA-256 of a parsed request's canonical JSON: equal for equal requests, whatever the key order."""
    text = json.dumps(model.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()
