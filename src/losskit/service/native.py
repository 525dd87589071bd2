"""The native ``/v1`` surface (``losskit.client``'s API) plus the seed's two aliases.

Every ``/v1`` call except ``POST /v1/sessions`` and ``GET /v1/info`` carries ``X-Losskit-Session``. A submit
returns **202** ``{"request_id", "model_id", "seq_id"}``; with ``wait_s`` (<= 25) and the work finished in time it
returns **200** ``{"status": "complete", "result": ...}`` (or ``{"status": "failed", "error", "category", "code"}``).
``POST /v1/retrieve_future`` long-polls a request. Model ids are the caller's aliases; inside the engine they
are ``{session_id}:native:{alias}``. Numbers that are not finite (a ratio mean over no tokens) are ``null``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
from typing import Any

import torch
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from losskit.service import native_schema as S
from losskit.service.custom_loss import NATIVE_KIND, CustomLossError, parse_graph
from losskit.service.errors import ServiceError
from losskit.service.futures import DONE, FAILED, Future
from losskit.service.lora import LoraSpec
from losskit.service.loss_registry import CustomLoss
from losskit.service.operations import Service
from losskit.service.optim import AdamParams
from losskit.service.sampling import PromptOptions, SamplingParams, check_prompt
from losskit.service.tensors import encode_tensor

log = logging.getLogger("losskit.serve")

SESSION_HEADER = "x-losskit-session"
NATIVE_TAG = ":native:"
PICKLE_FORBIDDEN = (
    "pickled code upload is disabled; start the server with --allow-pickled-code and an API key (--api-key or "
    "LOSSKIT_API_KEY) to accept it; this runs arbitrary code on the server"
)


def clean(value: Any, b64: bool = False) -> Any:
    """``value`` as strict JSON data: non-finite floats become None; tensors become lists (NaN -> None), or tensor
    JSON with ``b64`` (what ``losskit.client`` asks for: smaller and faster to encode and decode)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor):
        if b64:
            return encode_tensor(value, b64=True)
        return clean(value.tolist()) if not bool(torch.isfinite(value).all()) else value.tolist()
    if isinstance(value, dict):
        return {k: clean(v, b64) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v, b64) for v in value]
    return value


def dumps(value: Any, b64: bool = False) -> bytes:
    return json.dumps(clean(value, b64), separators=(",", ":"), allow_nan=False).encode()


def body_hash(body: Any) -> str:
    """SHA-256 of the canonical request body (``wait_s`` excluded: a retry may wait differently)."""
    data = body.model_dump(exclude={"wait_s"}) if hasattr(body, "model_dump") else body
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def envelope(fut: Future) -> bytes:
    """The poll reply of a future: identical bytes on every re-poll."""
    if fut.state == DONE:
        return b'{"status":"complete","request_id":"' + fut.request_id.encode() + b'","result":' + fut.body + b"}"
    if fut.state == FAILED:
        return dumps({"status": "failed", **fut.error.body(fut.request_id)})
    return dumps({"status": "pending", "request_id": fut.request_id})


def make_router(service: Service) -> APIRouter:
    engine = service.engine
    settings = service.settings
    router = APIRouter()

    # ---- helpers --------------------------------------------------------------------------------------------
    def owner(request: Request) -> str:
        return request.scope["state"].get("owner", "anonymous")

    def session_of(request: Request, required: bool = True):
        sid = request.headers.get(SESSION_HEADER)
        if sid is None:
            if not required:
                return None
            raise ServiceError("validation_error", "the X-Losskit-Session header is required (create a session with "
                               "POST /v1/sessions)", detail={"argument": "X-Losskit-Session"})
        return engine.session(sid, owner(request))

    def internal(session, alias: str) -> str:
        return f"{session.id}{NATIVE_TAG}{alias}"

    def alias_of(model_id: str) -> str:
        return model_id.split(NATIVE_TAG, 1)[1] if NATIVE_TAG in model_id else model_id

    def note(request: Request, model: str | None, seq: int | None) -> None:
        request.scope["state"]["log_model"] = model
        request.scope["state"]["log_seq"] = seq

    def encoder(alias: str | None = None, b64: bool = False):
        def encode(value):
            if isinstance(value, dict) and alias is not None:
                value = {**value, "model_id": alias}
            return dumps(value, b64), "application/json"

        return encode

    async def reply(request: Request, fut: Future, wait_s: float | None, alias: str | None) -> Response:
        note(request, alias, fut.seq_id)
        if wait_s:
            await engine.futures.wait(fut, min(wait_s, settings.long_poll_s))
            if fut.done:
                return Response(envelope(fut), media_type="application/json")
        return JSONResponse({"request_id": fut.request_id, "model_id": alias, "seq_id": fut.seq_id},
                            status_code=202)

    def guarded(session, model_id: str, body, submit):
        """Run ``submit()``; a request it rejects still consumes its seq_id (see ``Engine.burn``)."""
        try:
            return submit()
        except ServiceError as err:
            engine.burn(session, model_id, getattr(body, "seq_id", None), body_hash(body), err)
            raise

    def auto_model(session, alias: str):
        """The model of ``alias``, created on the default base model when the session does not know it (seed
        compatibility; ``--no-auto-create`` turns this off)."""
        model_id = internal(session, alias)
        if model_id in session.models:
            return model_id
        if not settings.auto_create:
            raise ServiceError("unknown_model", f"no model {alias!r} in this session (create it with POST /v1/models; "
                               "the server runs with --no-auto-create)")
        service.create_model(session, model_id, None, LoraSpec.make(16, None), encoder(alias))
        return model_id

    # ---- sessions -------------------------------------------------------------------------------------------
    @router.post("/v1/sessions", summary="open a session")
    def create_session(request: Request, body: S.SessionRequest | None = None):
        session = engine.create_session(owner(request), body.client if body else None)
        return {"session_id": session.id}

    @router.delete("/v1/sessions/{session_id}", summary="close a session: frees its models, losses and futures")
    def delete_session(request: Request, session_id: str):
        engine.close_session(engine.session(session_id, owner(request)))
        return {}

    # ---- models ---------------------------------------------------------------------------------------------
    @router.post("/v1/models", summary="create a training model (a LoRA adapter with its own AdamW)")
    async def create_model(request: Request, body: S.CreateModelRequest):
        def submit():
            session = session_of(request)
            alias = body.model_id or f"model-{len(session.models) + 1}"
            while internal(session, alias) in session.models:
                alias = f"{alias}-1"
            spec = LoraSpec.make(body.rank, body.seed, body.train_attn, body.train_mlp, body.train_unembed)
            return service.create_model(session, internal(session, alias), body.base_model, spec, encoder(alias)), alias

        fut, alias = await run_in_threadpool(submit)
        return await reply(request, fut, body.wait_s, alias)

    @router.get("/v1/models", summary="this session's models")
    def list_models(request: Request):
        session = session_of(request)
        return {"models": [{"model_id": alias_of(m.model_id), "base_model": m.base_name, "lora_rank": m.lora.rank,
                            "seed": m.lora.seed, "next_seq_id": m.seq.next_seq} for m in session.models.values()]}

    @router.delete("/v1/models/{model_id}", summary="delete one of this session's models")
    def delete_model(request: Request, model_id: str):
        session = session_of(request)
        engine.delete_model(session, internal(session, model_id))
        return {}

    # ---- losses ---------------------------------------------------------------------------------------------
    def listing(request: Request):
        return service.loss_listing(session_of(request, required=False))

    router.get("/v1/losses", summary="built-in and this session's custom losses")(listing)
    router.get("/list_loss_functions", summary="seed alias of GET /v1/losses")(listing)

    def pickled_allowed() -> None:
        if not (settings.allow_pickled_code and settings.api_keys):
            raise ServiceError("forbidden_pickled_code", PICKLE_FORBIDDEN, status=403)

    def unpickle(payload_b64: str, name: str):
        import cloudpickle

        log.warning("custom loss %r: unpickling uploaded code (arbitrary code execution, --allow-pickled-code)", name)
        try:
            fn = cloudpickle.loads(base64.b64decode(payload_b64, validate=True))
        except Exception as exc:  # noqa: BLE001 - any failure of the user's payload is the user's error
            raise ServiceError("pickle_load_failed", f"custom loss {name!r}: the pickled payload cannot be loaded: "
                               f"{type(exc).__name__}: {exc}") from None
        if not callable(fn):
            raise ServiceError("validation_error", f"custom loss {name!r}: the pickled payload is not callable")
        return fn

    @router.post("/v1/losses", summary="register a custom loss (a torch.fx graph; pickled only when enabled)")
    def register_loss(request: Request, body: S.RegisterLossRequest):
        if body.format is not None or body.payload_b64 is not None:
            pickled_allowed()  # before anything is decoded
            if body.format != "cloudpickle" or body.payload_b64 is None:
                raise ServiceError("validation_error", 'a pickled upload needs format "cloudpickle" and payload_b64')
            session = session_of(request)
            service.check_pickle_environment(body.python)
            loss = CustomLoss(body.name, 0, body.description or "pickled custom loss (unsafe)",
                              function=unpickle(body.payload_b64, body.name))
        else:
            if body.graph is None:
                raise ServiceError("validation_error", "a custom loss needs graph (or a pickled payload)",
                                   detail={"argument": "graph"})
            session = session_of(request)
            if body.graph.get("kind") != NATIVE_KIND:
                raise ServiceError("invalid_loss_graph", f"native custom losses are graphs of kind {NATIVE_KIND!r} "
                                   f"(losskit.client's @custom_loss makes them), got {body.graph.get('kind')!r}")
            try:
                program = parse_graph(body.graph, name=body.name, max_nodes=settings.max_graph_nodes)
            except CustomLossError as exc:
                raise ServiceError(exc.code, exc.message, detail=exc.detail) from None
            loss = CustomLoss(body.name, 0, body.description or "custom loss (graph)", program=program)
        loss, replaced = service.register_loss(session, loss)
        listing = loss.listing()
        return {"status": "registered", "name": loss.name, "inputs_read": listing["inputs_read"],
                "hyperparameters": listing["hyperparameters"], "replaced": replaced, "version": loss.version,
                "unsafe": loss.unsafe}

    @router.delete("/v1/losses/{name}", summary="delete one of this session's custom losses")
    def delete_loss(request: Request, name: str):
        engine.unregister_loss(session_of(request), name)
        return {}

    @router.post("/register_custom_loss", summary="seed alias: a pickled upload (disabled unless enabled)")
    def legacy_register(request: Request, body: S.LegacyRegisterRequest):
        pickled_allowed()
        session = session_of(request)
        log.warning("custom loss %r: legacy pickled upload without a Python version check", body.loss_name)
        loss = CustomLoss(body.loss_name, 0, "pickled custom loss (unsafe)",
                          function=unpickle(body.loss_fn_serialized, body.loss_name))
        loss, replaced = service.register_loss(session, loss)
        return {"status": "registered", "name": loss.name, "replaced": replaced, "unsafe": True}

    # ---- training -------------------------------------------------------------------------------------------
    async def forward_backward_impl(request: Request, body: S.ForwardBackwardRequest, forward_only: bool):
        def submit():
            from losskit.service.batch import build_batch

            session = session_of(request)
            model_id = auto_model(session, body.model_id)
            state = engine.model(session, model_id)

            def validate_and_submit():
                config = dict(body.loss_fn_config or {})
                needs_tt = service.reads_target_tokens(session, body.loss_fn)
                batch = build_batch(body.data, body.loss_fn_inputs, state.info, needs_target_tokens=needs_tt,
                                    max_rows=settings.max_datums_per_request, max_len=service.max_len(state.info))
                loss = service.resolve_loss(session, body.loss_fn, config, set(batch.inputs), state.info)
                return service.forward_backward(session, model_id, body.seq_id, body_hash(body), loss, batch,
                                                forward_only=forward_only,
                                                encode=encoder(body.model_id, body.tensor_encoding == "b64"),
                                                request_bytes=request.scope["state"].get("body_bytes", 0))

            return guarded(session, model_id, body, validate_and_submit)

        fut = await run_in_threadpool(submit)
        return await reply(request, fut, body.wait_s, body.model_id)

    @router.post("/v1/forward_backward", summary="forward and backward; gradients accumulate until optim_step")
    async def forward_backward(request: Request, body: S.ForwardBackwardRequest):
        return await forward_backward_impl(request, body, body.forward_only)

    @router.post("/v1/forward", summary="forward only (no_grad): the same logprobs, loss and metrics, nothing "
                 "accumulated")
    async def forward(request: Request, body: S.ForwardBackwardRequest):
        return await forward_backward_impl(request, body, True)

    @router.post("/v1/optim_step", summary="one AdamW step on the accumulated gradients")
    async def optim_step(request: Request, body: S.OptimStepRequest):
        def submit():
            session = session_of(request)
            model_id = internal(session, body.model_id)
            return guarded(session, model_id, body, lambda: service.optim_step(
                session, model_id, body.seq_id, body_hash(body), AdamParams.from_mapping(body.adam_params),
                encoder(body.model_id)))

        fut = await run_in_threadpool(submit)
        return await reply(request, fut, body.wait_s, body.model_id)

    async def save_impl(request: Request, body, kind: str):
        def submit():
            session = session_of(request)
            model_id = internal(session, body.model_id)
            return guarded(session, model_id, body, lambda: service.save(
                session, model_id, body.seq_id, body_hash(body), body.name, kind=kind, overwrite=body.overwrite,
                ttl_seconds=body.ttl_seconds, encode=encoder(body.model_id)))

        fut = await run_in_threadpool(submit)
        return await reply(request, fut, body.wait_s, body.model_id)

    @router.post("/v1/save_state", summary="save the adapter and optimizer state as a checkpoint")
    async def save_state(request: Request, body: S.SaveStateRequest):
        return await save_impl(request, body, "weights")

    @router.post("/v1/save_weights_for_sampler", summary="save the adapter for sampling")
    async def save_for_sampler(request: Request, body: S.SaveForSamplerRequest):
        return await save_impl(request, body, "sampler_weights")

    @router.post("/v1/load_state", summary="load a checkpoint into a new or an existing model")
    async def load_state(request: Request, body: S.LoadStateRequest):
        def submit():
            from losskit.service.checkpoints import parse_path

            session = session_of(request)
            if body.model_id is not None and internal(session, body.model_id) in session.models:
                alias = body.model_id
                model_id = internal(session, alias)
                return guarded(session, model_id, body, lambda: service.load_into(
                    session, model_id, body.seq_id, body_hash(body), body.path, optimizer=body.optimizer,
                    encode=encoder(alias))), alias
            alias = body.model_id or parse_path(body.path).name
            while internal(session, alias) in session.models:
                alias = f"{alias}-1"
            return service.load_new(session, body.path, internal(session, alias), optimizer=body.optimizer,
                                    encode=encoder(alias)), alias

        fut, alias = await run_in_threadpool(submit)
        return await reply(request, fut, body.wait_s, alias)

    # ---- sampling -------------------------------------------------------------------------------------------
    @router.post("/v1/sample", summary="sample from a model, a checkpoint or a base model")
    async def sample(request: Request, body: S.SampleRequest):
        def submit():
            session = session_of(request)
            if body.model_id is None:
                return validate_and_submit(session)
            return guarded(session, internal(session, body.model_id), body, lambda: validate_and_submit(session))

        def validate_and_submit(session):
            sources = [x is not None for x in (body.model_id, body.model_path, body.base_model)]
            if sum(sources) > 1:
                raise ServiceError("validation_error", "give one of model_id, model_path or base_model")
            model_id = internal(session, body.model_id) if body.model_id is not None else None
            info = service.sampler_info(session, model_id=model_id, model_path=body.model_path,
                                        base_model=body.base_model)
            prompt = body.prompt if isinstance(body.prompt, list) else list(info.tokenizer(body.prompt).input_ids)
            check_prompt(prompt, info.vocab_size)
            if body.num_samples > settings.max_num_samples:
                raise ServiceError("validation_error", f"num_samples must be <= {settings.max_num_samples} "
                                   f"(--max-num-samples), got {body.num_samples}", detail={"argument": "num_samples"})
            params = SamplingParams.from_mapping(body.sampling_params, eos_id=info.eos_id,
                                                 max_sample_tokens=settings.max_sample_tokens)
            if len(prompt) + params.max_tokens > info.max_context:
                raise ServiceError("context_exceeded", f"prompt ({len(prompt)} tokens) + max_tokens "
                                   f"({params.max_tokens}) exceeds the context of {info.max_context}")
            options = PromptOptions(body.prompt_logprobs, body.prompt_logprobs_last_n, body.topk_prompt_logprobs,
                                    body.topk_sample_logprobs)
            return service.sample(session, model_id=model_id, model_path=body.model_path, base_model=body.base_model,
                                  seq=body.seq_id, body_hash=body_hash(body), prompt=prompt,
                                  num_samples=body.num_samples, params=params, options=options,
                                  encode=encoder(body.model_id))

        fut = await run_in_threadpool(submit)
        return await reply(request, fut, body.wait_s, body.model_id)

    # ---- futures --------------------------------------------------------------------------------------------
    @router.post("/v1/retrieve_future", summary="long-poll a request: pending, complete or failed")
    async def retrieve(request: Request, body: S.RetrieveRequest):
        session = session_of(request)
        fut = engine.futures.get(body.request_id, session.id)
        note(request, alias_of(fut.model_id) if fut.model_id else None, fut.seq_id)
        await engine.futures.wait(fut, min(body.timeout_s, settings.long_poll_s))
        return Response(envelope(fut), media_type="application/json")

    return router
