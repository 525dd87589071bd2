"""HTTP transport of ``losskit.client``: JSON requests with retries and the server's error model as exceptions.

Connection errors, 429 and 5xx are retried with exponential backoff (honouring ``Retry-After``); other 4xx are
not. A retry resends the same body, so a request with a ``seq_id`` runs once however often it is sent.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

import httpx

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class RequestFailed(Exception):
    """A request failed: the server answered an error, or a queued request's future failed.

    Attributes:
        status: the HTTP status (200 for a failed future), or None for a connection failure.
        code: the server's snake_case error code (e.g. ``loss_op_not_allowed``).
        category: ``"user"`` (the request is wrong and will fail again) or ``"server"``.
        detail: the server's detail object (e.g. the offending node of a custom loss).
        request_id: the request's id, when it had one.
    """

    def __init__(self, message: str, *, status: int | None = None, code: str = "unknown", category: str = "server",
                 detail: dict | None = None, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.category = category
        self.detail = detail or {}
        self.request_id = request_id

    @staticmethod
    def from_body(body: dict, status: int | None) -> RequestFailed:
        return RequestFailed(str(body.get("error", "request failed")), status=status, code=body.get("code", "unknown"),
                             category=body.get("category", "server"), detail=body.get("detail"),
                             request_id=body.get("request_id"))


class Transport:
    def __init__(self, base_url: str, api_key: str | None, timeout: float, max_retries: int) -> None:
        headers = {"User-Agent": "losskit-client"}
        if api_key:
            headers["X-API-Key"] = api_key
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)
        self.timeout = timeout
        self.max_retries = max_retries

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, *, body: Any = None, headers: dict | None = None,
                timeout: float | None = None) -> tuple[int, Any]:
        """``(status, decoded JSON)`` of a successful (2xx) reply; ``RequestFailed`` otherwise."""
        content = None if body is None else json.dumps(body, allow_nan=False).encode()
        send_headers = dict(headers or {})
        if content is not None:
            send_headers["Content-Type"] = "application/json"
        attempt = 0
        while True:
            try:
                response = self.http.request(method, path, content=content, headers=send_headers,
                                             timeout=timeout or self.timeout)
            except httpx.TransportError as exc:
                if attempt >= self.max_retries:
                    raise RequestFailed(f"cannot reach the losskit server at {self.http.base_url}: {exc} (is "
                                        "`losskit serve` running?)", code="connection_error") from None
                self._sleep(attempt, None)
                attempt += 1
                continue
            if response.status_code in RETRY_STATUSES and attempt < self.max_retries:
                self._sleep(attempt, response.headers.get("retry-after"))
                attempt += 1
                continue
            try:
                data = response.json()
            except ValueError:
                data = {"error": response.text[:500] or f"HTTP {response.status_code}", "category": "server",
                        "code": "bad_reply"}
            if response.status_code >= 400:
                raise RequestFailed.from_body(data if isinstance(data, dict) else {"error": str(data)},
                                              response.status_code)
            return response.status_code, data

    @staticmethod
    def _sleep(attempt: int, retry_after: str | None) -> None:
        delay = min(0.25 * 2**attempt, 4.0) * (0.75 + 0.5 * random.random())
        if retry_after:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass
        time.sleep(delay)
