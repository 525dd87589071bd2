"""The service's error model: every non-2xx reply and every failed future is one JSON shape.

``{"error": "<what, which argument, expected vs actual>", "category": "user"|"server", "code": "<snake_case>",
"request_id"?, "detail"?}``. ``user`` means the request is wrong and will fail again; ``server`` means losskit is
at fault. ``error`` plus ``category`` is also the Tinker SDK's ``RequestFailedResponse``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from losskit.contract import ConfigError, LossInputError
from losskit.service.loss_graph import CustomLossError

USER = "user"
SERVER = "server"

#: HTTP status of the codes that are not 400 (a ``ServiceError`` may still override it).
STATUS_OF_CODE: dict[str, int] = {
    "unauthorized": 401,
    "forbidden_pickled_code": 403,
    "builtin_protected": 409,
    "not_found": 404,
    "unknown_model": 404,
    "unknown_loss": 404,
    "unknown_session": 404,
    "checkpoint_not_found": 404,
    "method_not_allowed": 405,
    "future_expired": 410,
    "session_closed": 410,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
    "queue_full": 429,
    "internal_error": 500,
    "device_oom": 500,
    "unavailable": 503,
}


class ServiceError(Exception):
    """An error with its HTTP status, code and category; ``body()`` is the JSON reply."""

    def __init__(self, code: str, message: str, *, status: int | None = None, category: str | None = None,
                 detail: Mapping[str, Any] | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status if status is not None else STATUS_OF_CODE.get(code, 400)
        self.category = category or (SERVER if self.status >= 500 else USER)
        self.detail = dict(detail or {})
        self.headers = dict(headers or {})

    def body(self, request_id: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.message, "category": self.category, "code": self.code}
        if request_id is not None:
            out["request_id"] = request_id
        if self.detail:
            out["detail"] = self.detail
        return out


def as_service_error(exc: BaseException) -> ServiceError:
    """The ``ServiceError`` for an exception raised while validating or running a request.

    Input and configuration errors of the library (``LossInputError``, ``ConfigError``, ``CustomLossError``) are
    user errors with their own message; anything else is a server error (the caller logs the traceback).
    """
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, CustomLossError):
        return ServiceError(exc.code, exc.message, detail=exc.detail)
    if isinstance(exc, ConfigError):
        return ServiceError("validation_error", str(exc))
    if isinstance(exc, LossInputError):
        return ServiceError("invalid_loss_input", str(exc))
    return ServiceError("internal_error", f"internal error ({type(exc).__name__})", category=SERVER, status=500)
