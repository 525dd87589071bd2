"""API keys: read from ``X-API-Key`` (what the Tinker SDK sends) or ``Authorization: Bearer``, compared with
``hmac.compare_digest`` and only ever logged as a fingerprint.

With keys configured, every route except the health checks needs one (401 ``unauthorized`` otherwise). A
session belongs to the key that created it. Without keys (loopback only, or ``--allow-unauthenticated``) any
request is accepted and sessions belong to the presented key's fingerprint, or to ``anonymous``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from losskit.service.errors import ServiceError

ANONYMOUS = "anonymous"
PUBLIC_PATHS = frozenset({"/healthz", "/api/v1/healthz"})


def fingerprint(key: str) -> str:
    """A short, non-reversible name for a key (what logs and run records show)."""
    return "key_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def presented_key(headers: Mapping[str, str]) -> str | None:
    key = headers.get("x-api-key")
    if key:
        return key.strip()
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return None


class Auth:
    def __init__(self, keys: tuple[str, ...]) -> None:
        self.keys = tuple(k.encode() for k in keys)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def owner(self, headers: Mapping[str, str]) -> str:
        """The caller's owner id (a key fingerprint); 401 when keys are configured and the key is missing or wrong."""
        key = presented_key(headers)
        if not self.keys:
            return fingerprint(key) if key else ANONYMOUS
        if key is None:
            raise ServiceError("unauthorized", "an API key is required: send X-API-Key: <key> (or Authorization: "
                               "Bearer <key>)")
        candidate = key.encode()
        ok = False
        for k in self.keys:
            ok |= hmac.compare_digest(candidate, k)  # no early exit: every key is compared
        if not ok:
            raise ServiceError("unauthorized", f"the API key ({fingerprint(key)}) is not accepted by this server")
        return fingerprint(key)
