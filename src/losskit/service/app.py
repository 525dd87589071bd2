"""The FastAPI application: the gate (auth, body limits, content types, one log line and metrics per request),
the JSON error model for every failure, health, info and metrics, and the surfaces' routers.

FastAPI's default error handlers are replaced: a validation error is 400 (never 422), broken JSON 400
``invalid_json``, an unknown route 404, a wrong method 405, a wrong content type 415, an oversize body 413, and an
unexpected fault 500 ``internal_error`` with an error id (the traceback goes to the log under that id, never to the
client). Every one of them is a JSON body with ``error`` and ``category``.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
import traceback

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from losskit import __version__
from losskit.service import allowlist
from losskit.service.auth import PUBLIC_PATHS, Auth
from losskit.service.errors import SERVER, ServiceError
from losskit.service.metrics import Metrics
from losskit.service.operations import Service

log = logging.getLogger("losskit.serve")
access = logging.getLogger("losskit.serve.access")



def error_response(err: ServiceError, request_id: str | None = None) -> JSONResponse:
    return JSONResponse(err.body(request_id), status_code=err.status, headers=err.headers)


def _validation_error(exc: RequestValidationError) -> ServiceError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = ".".join(loc) or "body"
    kind = first.get("type", "")
    if kind == "json_invalid":
        ctx = first.get("ctx", {}) or {}
        return ServiceError("invalid_json", f"the request body is not valid JSON ({ctx.get('error', 'parse error')})")
    if kind == "missing":
        return ServiceError("validation_error", f"missing field {field!r}", detail={"argument": field})
    if kind == "extra_forbidden":
        return ServiceError("validation_error", f"unknown field {field!r}", detail={"argument": field})
    if kind in ("model_attributes_type", "dict_type") and not loc:
        return ServiceError("validation_error", "the request body must be a JSON object")
    return ServiceError("validation_error", f"field {field!r}: {first.get('msg', 'invalid value')}",
                        detail={"argument": field})


class Gate:
    """Pure-ASGI middleware around the app: auth, body-size and content-type checks, access log, metrics."""

    def __init__(self, app, *, auth: Auth, metrics: Metrics, body_limits: dict[str, int], json_mode: bool) -> None:
        """``body_limits``: accepted request content types and the largest body of each (a surface that takes
        another content type, such as protobuf, adds it here)."""
        self.app = app
        self.auth = auth
        self.metrics = metrics
        self.body_limits = dict(body_limits)
        self.max_body = max(self.body_limits.values())
        self.json_mode = json_mode

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        state = scope.setdefault("state", {})
        status = [0]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            if scope["path"] not in PUBLIC_PATHS:
                state["owner"] = self.auth.owner(headers)
            if scope["method"] in ("POST", "PUT", "PATCH"):
                receive = await self._buffer(scope, headers, receive)
            await self.app(scope, receive, send_wrapper)
        except ServiceError as err:
            if status[0]:
                raise
            await error_response(err)(scope, receive, send_wrapper)
        except Exception:  # noqa: BLE001 - the app answered 500 itself unless the fault came before it
            if not status[0]:
                error_id = secrets.token_hex(6)
                log.error("unhandled error %s:\n%s", error_id, traceback.format_exc())
                err = ServiceError("internal_error", f"internal error (error id {error_id})", category=SERVER)
                await error_response(err)(scope, receive, send_wrapper)
        finally:
            self._log(scope, state, status[0] or 500, time.perf_counter() - start)

    async def _buffer(self, scope, headers, receive):
        """Read the whole body within its content type's limit (413 beyond it) and check the type (415)."""
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        limit = self.body_limits.get(ctype, self.max_body)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ServiceError("payload_too_large", f"the request body has {length} bytes, above the limit of "
                               f"{limit} for {ctype or 'this content type'} (--max-json-mb / --max-request-mb)")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise ServiceError("payload_too_large", f"the request body is above the limit of {limit} bytes "
                                   "(--max-json-mb / --max-request-mb)")
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        if ctype not in self.body_limits and (body or ctype):
            raise ServiceError("unsupported_media_type", f"Content-Type must be one of "
                               f"{', '.join(sorted(self.body_limits))}, got {ctype or 'none'}")
        scope.setdefault("state", {})["body_bytes"] = len(body)
        sent = [False]

        async def replay():
            if not sent[0]:
                sent[0] = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    def _log(self, scope, state: dict, status: int, seconds: float) -> None:
        route = scope.get("route")
        label = getattr(route, "path", None) or "unmatched"
        self.metrics.observe(label, scope["method"], status, seconds)
        fields = {"method": scope["method"], "route": scope["path"], "model": state.get("log_model"),
                  "seq": state.get("log_seq"), "status": status, "ms": round(seconds * 1000, 1)}
        if self.json_mode:
            access.info(json.dumps(fields))
        else:
            access.info("%s %s model=%s seq=%s status=%d %.1fms", fields["method"], fields["route"], fields["model"],
                        fields["seq"], status, fields["ms"])


def create_app(service: Service) -> Gate:
    """The ASGI application of one server: the gate around FastAPI (``.fastapi`` is the FastAPI app)."""
    settings = service.settings
    app = FastAPI(title="losskit serve", version=__version__, docs_url=None, redoc_url=None,
                  description="The losskit training server: LoRA training of Hugging Face causal LMs with built-in "
                  "and custom losses, sampling and checkpoints.")
    app.state.service = service
    metrics = Metrics(service.engine)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            err = ServiceError("not_found", f"no route {request.method} {request.url.path}", status=404)
        elif exc.status_code == 405:
            err = ServiceError("method_not_allowed", f"{request.method} is not allowed on {request.url.path}",
                               status=405)
        else:
            err = ServiceError("http_error", str(exc.detail), status=exc.status_code)
        return error_response(err)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        error_id = secrets.token_hex(6)
        log.error("unhandled error %s on %s %s:\n%s", error_id, request.method, request.url.path,
                  "".join(traceback.format_exception(exc)))
        return error_response(ServiceError("internal_error", f"internal error (error id {error_id}); the server log "
                                           "has the details", category=SERVER, status=500))

    @app.get("/healthz", summary="liveness (no auth)")
    async def healthz():
        return {"status": "ok", "version": __version__}

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics_route():
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/v1/info", summary="server capabilities and limits")
    def info():
        return {
            "version": __version__,
            "surfaces": [name for name, on in (("native", settings.native_surface),
                                                ("tinker", settings.tinker_surface)) if on],
            "models": service.supported_models(),
            "default_base_model": settings.default_base_model,
            "device": str(service.backend.device),
            "dtype": str(service.backend.dtype).removeprefix("torch."),
            "allow_pickled_code": settings.allow_pickled_code and bool(settings.api_keys),
            "allowlist_version": allowlist.ALLOWLIST_VERSION,
            "limits": {k: getattr(settings, k) for k in (
                "max_request_mb", "max_json_mb", "max_datums_per_request", "max_seq_len", "max_tokens_per_step",
                "max_pending_per_model", "max_sessions", "max_models", "decode_slice", "max_sample_tokens",
                "max_num_samples", "max_graph_nodes", "loss_time_limit_s", "long_poll_s", "future_ttl_s",
                "future_store_mb", "seq_gap_timeout_s", "session_timeout_s")},
        }

    if settings.native_surface:
        from losskit.service.native import make_router

        app.include_router(make_router(service))

    limits = {"application/json": int(min(settings.max_json_mb, settings.max_request_mb) * 2**20)}
    if settings.tinker_surface:
        from losskit.service import tinker_routes, tinker_wire

        app.include_router(tinker_routes.make_router(service))
        limits[tinker_wire.PROTOBUF] = int(settings.max_request_mb * 2**20)
    gate = Gate(app, auth=Auth(settings.api_keys), metrics=metrics, body_limits=limits, json_mode=settings.log_json)
    gate.fastapi = app
    return gate
