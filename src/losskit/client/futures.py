"""Futures of ``losskit.client``: the ``_async`` twins return them; ``.result()`` long-polls the server."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from typing import Any

from losskit.client.transport import RequestFailed

POLL_S = 25.0


class ClientFuture:
    """A queued request: ``.request_id``, ``.done()`` and ``.result(timeout=None)`` (raises ``RequestFailed``)."""

    def __init__(self, poll: Callable[[str, float], dict], request_id: str | None, *,
                 finished: dict | None = None, transform: Callable[[Any], Any] = lambda r: r) -> None:
        self._poll = poll
        self.request_id = request_id
        self._envelope = finished
        self._transform = transform

    def done(self) -> bool:
        if self._envelope is None:
            self._envelope = self._check(0.0)
        return self._envelope is not None

    def _check(self, wait_s: float) -> dict | None:
        envelope = self._poll(self.request_id, wait_s)
        return None if envelope.get("status") == "pending" else envelope

    def result(self, timeout: float | None = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._envelope is None:
            left = POLL_S if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s (it keeps running; "
                                   "call result() again)")
            self._envelope = self._check(min(POLL_S, left))
        if self._envelope["status"] == "failed":
            raise RequestFailed.from_body({**self._envelope, "request_id": self.request_id}, 200)
        return self._transform(self._envelope["result"])


class LocalFuture:
    """The ``_async`` twin of a call that the server answers directly (no queued request)."""

    def __init__(self, future: concurrent.futures.Future) -> None:
        self._future = future
        self.request_id = None

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> Any:
        return self._future.result(timeout)
