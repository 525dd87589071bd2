"""The Tinker wire surface (``/api/v1``): the protocol of the official ``tinker`` SDK on the losskit engine.

The unmodified SDK (``tinker.ServiceClient(base_url="http://127.0.0.1:PORT", api_key="tml-...")``) and
tinker-cookbook loops run against these routes. Each route parses its body with the SDK's own pydantic model (or
its protobuf module, for ``forward_backward``), checks what can be checked at submit, calls one operation of
``Service`` and encodes the reply with the SDK's models; the engine is the same one the native surface uses.

* Submits answer at once with an ``UntypedAPIFuture`` (``request_id``, ``model_id``, ``sample_sequence_ids``);
  ``retrieve_future`` long-polls (``--long-poll-s``) and answers the result (protobuf for ``ForwardBackwardOutput``
  and ``SampleResponse``, JSON otherwise), ``{"type": "try_again", ...}`` while pending, or a failure as HTTP 200
  ``{"error", "category", "code"}`` (the SDK raises ``RequestFailedError``). Deterministic errors are 400s, never
  409 or 5xx, which the SDK would retry for minutes.
* Training requests run in ``seq_id`` order per model and are de-duplicated on ``(model_id, seq_id)``.
* Built-in losses are the Tinker ones (``cross_entropy``, ``importance_sampling``, ``ppo``, ``cispo``, ``dro``,
  sums over tokens); ``custom`` runs a loss uploaded with ``create_custom_loss`` (a checked torch.fx graph, once
  per datum); ``forward_backward_custom`` with a Python callable needs nothing more from the server.
* Not supported in this version (400 ``unsupported_feature``): ``save_weights_external``, ``copy_weights``,
  ``join_sampling_session``, ``retrieve_futures``, ``auth/token``, checkpoint deletion and publishing, image
  and audio chunks, ``prompt_alt_tokens_k``, ``target_prompt_logprobs``; losses ``gspo`` and ``stable_reinforce``
  (400 ``unsupported_loss``).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from packaging.specifiers import SpecifierSet
from tinker import types as T
from tinker.types.try_again_response import TryAgainResponse  # not re-exported by tinker.types

from losskit.service import tinker_json as J
from losskit.service.checkpoints import META, CheckpointPath, parse_path
from losskit.service.custom_loss import TINKER_KIND, CustomLossError, parse_graph
from losskit.service.errors import ServiceError
from losskit.service.futures import DONE, FAILED, Future
from losskit.service.lora import LoraSpec
from losskit.service.loss_registry import CustomLoss, ResolvedLoss
from losskit.service.operations import Service, SnapshotSource
from losskit.service.optim import AdamParams
from losskit.service.sampling import PromptOptions, SamplingParams, check_prompt
from losskit.service.sdk_check import SUPPORTED
from losskit.service.tinker_state import (
    Sampler,
    TinkerSession,
    TinkerState,
    loss_id_of,
    model_id_of,
    sampler_id_of,
    session_id_in,
)
from losskit.service.tinker_wire import (
    PROTOBUF,
    WireDatum,
    canonical_bytes,
    decode_forward_backward,
    encode_forward_backward_output,
    encode_sample_response,
)

log = logging.getLogger("losskit.serve")

JSON = "application/json"
PREFIX = "/api/v1"
UNSUPPORTED_LOSSES = ("gspo", "stable_reinforce")
MAX_TOPK = 64
_UNSUPPORTED = {
    "save_weights_external": "saving weights in an external format",
    "copy_weights": "copying weights between projects",
    "join_sampling_session": "joining a sampling session from an unpickled SamplingClient",
    "retrieve_futures": "batched future retrieval",
    "auth/token": "JWT exchange (this server takes API keys; its client config says so)",
}


def _unsupported(what: str) -> ServiceError:
    return ServiceError("unsupported_feature", f"{what} is not supported by this losskit server")


def _json_reply(value: dict[str, Any], status: int = 200) -> Response:
    return JSONResponse(value, status_code=status)


def make_router(service: Service) -> APIRouter:
    engine = service.engine
    settings = service.settings
    state = TinkerState()
    telemetry_lock = threading.Lock()
    token_losses = {n: b for n, b in engine.builtins.items() if b.kind == "token"}
    router = APIRouter(prefix=PREFIX, include_in_schema=False)

    # ---- helpers --------------------------------------------------------------------------------------------
    def owner(request: Request) -> str:
        return request.scope["state"].get("owner", "anonymous")

    def note(request: Request, model: str | None, seq: int | None = None) -> None:
        request.scope["state"]["log_model"] = model
        request.scope["state"]["log_seq"] = seq

    def content_type(request: Request) -> str:
        return request.headers.get("content-type", "").split(";")[0].strip().lower()

    async def body_of(request: Request, model: type[J.M]) -> J.M:
        """The JSON body validated as the SDK model (415 for another content type)."""
        raw = await request.body()
        if content_type(request) not in (JSON, "") or (raw and content_type(request) != JSON):
            raise ServiceError("unsupported_media_type", f"{request.url.path} takes {JSON}, got "
                               f"{content_type(request) or 'none'}")
        return J.parse(model, raw)

    async def json_object(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if raw and content_type(request) != JSON:
            raise ServiceError("unsupported_media_type", f"{request.url.path} takes {JSON}, got "
                               f"{content_type(request) or 'none'}")
        value = J.loads(raw) if raw else {}
        if not isinstance(value, dict):
            raise ServiceError("validation_error", "the request body must be a JSON object")
        return value

    def session(request: Request, session_id: Any, *, what: str = "session"):
        """The caller's engine session; an unknown one is 404 (fatal in the SDK, which does not retry it)."""
        try:
            return engine.session(session_id, owner(request))
        except ServiceError as err:
            if err.code == "unknown_session":
                raise ServiceError("unknown_session", f"no {what} {session_id!r} for this key (sessions end on finish "
                                   f"or after {settings.session_timeout_s:g} s without a heartbeat)",
                                   status=404) from None
            raise

    def model_session(request: Request, model_id: Any):
        sid = session_id_in(model_id)
        if sid is None:
            raise ServiceError("unknown_model", f"no model {model_id!r} (model ids are <session_id>:train:<n>)",
                               status=404)
        return session(request, sid, what=f"model {model_id!r} in session")

    def record(sess) -> TinkerSession:
        return state.record(sess.id, sess.owner)

    def hand_out(fut: Future, sess, *, model_id: str | None = None, sequence_ids: list[str] | None = None):
        state.handed_out(fut.request_id, sess.id, sess.owner)
        return _json_reply(J.dump(T.UntypedAPIFuture(request_id=fut.request_id, model_id=model_id,
                                                     sample_sequence_ids=sequence_ids)))

    def json_encoder(build: Callable[[Any], Any]):
        def encode(value):
            return json.dumps(J.dump(build(value)), separators=(",", ":")).encode(), JSON

        return encode

    def guarded(sess, model_id: str, seq: Any, digest: str, submit: Callable[[], Future]) -> Future:
        """Run ``submit()``; a request it rejects still consumes its seq_id (``Engine.burn``)."""
        try:
            return submit()
        except ServiceError as err:
            engine.burn(sess, model_id, seq if isinstance(seq, int) else None, digest, err)
            raise

    async def sequenced(request: Request, body: Any, work: Callable[[Any, str], Future]):
        """The route of a request sequenced on one model (``body.model_id``, ``body.seq_id``): note it, find the
        session, run ``work(session, digest)`` under ``guarded`` (off the event loop) and hand out its future."""

        def submit():
            note(request, body.model_id, body.seq_id)
            sess = model_session(request, body.model_id)
            digest = J.digest(body)
            return guarded(sess, body.model_id, body.seq_id, digest, lambda: work(sess, digest)), sess

        fut, sess = await run_in_threadpool(submit)
        return hand_out(fut, sess, model_id=body.model_id)

    def created_once(request: Request, body: Any, make: Callable[[Any, str], Future]):
        """Create model ``body.model_seq_id`` of session ``body.session_id`` with ``make(session, model_id)``, once:
        a resend of the same body gets the first request's future, a different body with that ``model_seq_id`` is
        ``seq_conflict``. ``body.optimizer_config`` must be AdamW (or unset). Returns ``(future, session, model_id)``."""
        sess = session(request, body.session_id)
        rec = record(sess)
        check_adam_config(body.optimizer_config)
        if body.model_seq_id < 0:
            raise ServiceError("validation_error", f"model_seq_id must be >= 0, got {body.model_seq_id}",
                               detail={"argument": "model_seq_id"})
        model_id = model_id_of(sess.id, body.model_seq_id)
        note(request, model_id, 0)
        digest = J.digest(body)
        with state.lock:
            if body.model_seq_id in rec.models:
                rid, known = rec.models[body.model_seq_id]
                if known != digest:
                    raise ServiceError("seq_conflict", f"model_seq_id {body.model_seq_id} already created model "
                                       f"{model_id} with a different request")
                return engine.futures.get(rid, sess.id), sess, model_id
            fut = make(sess, model_id)
            rec.models[body.model_seq_id] = (fut.request_id, digest)
            return fut, sess, model_id

    def completed(sess, kind: str, value: dict[str, Any]) -> Future:
        """A future that is already done (creating calls that need no device work)."""
        fut = engine.futures.create(sess.id, kind)
        engine.futures.complete(fut, json.dumps(value, separators=(",", ":")).encode(), JSON)
        return fut

    def check_adam_config(config: Any, argument: str = "optimizer_config") -> None:
        kind = getattr(config, "type", None)
        if config is not None and kind != "adamw":
            raise ServiceError("unsupported_optimizer", f"{argument}: only {{\"type\": \"adamw\"}} is supported, got "
                               f"{kind!r}", detail={"argument": argument})

    # ---- client configuration, sessions, telemetry -----------------------------------------------------------
    @router.post("/client/config")
    async def client_config(request: Request):
        await body_of(request, T.ClientConfigRequest)
        return J.dump(T.ClientConfigResponse(
            pjwt_auth_enabled=False, credential_default_source="api_key", use_pyqwest_transport=False,
            parallel_fwdbwd_chunks=False, fwdbwd_max_chunk_len=settings.max_datums_per_request,
            fwdbwd_max_chunk_bytes_count=max(int((settings.max_request_mb - 1) * 2**20), 2**16),
            proto_compress_fwdbwd=False, sample_use_retrieve_futures=False, sample_join_sampling_session=False,
            custom_loss_server_side=settings.tinker_custom_loss == "server", sample_no_retries=False,
            sample_enable_stuck_detection=True))

    @router.post("/client/dynamic_config")
    async def client_dynamic_config(request: Request):
        await body_of(request, T.ClientConfigRequest)
        return J.dump(T.ClientDynamicConfigResponse(refresh_interval_sec=300, sample_cancel_enabled=False))

    @router.post("/create_session")
    async def create_session(request: Request):
        body = await body_of(request, T.CreateSessionRequest)
        who = owner(request)
        key = request.headers.get("x-idempotency-key")
        state.prune(list(engine.sessions))
        known = state.session_for_key(who, key)
        if known is not None and known in engine.sessions:
            sid = known
        else:
            sess = engine.create_session(who, f"tinker {body.sdk_version}")
            state.add_session(TinkerSession(sess.id, who, body.sdk_version, {
                "tags": body.tags, "user_metadata": body.user_metadata, "project_id": body.project_id,
                "display_name": body.display_name}), key)
            sid = sess.id
        warning = None
        if body.sdk_version not in SpecifierSet(SUPPORTED, prereleases=True):
            warning = (f"this losskit server speaks the wire protocol of tinker{SUPPORTED}; this SDK is "
                       f"{body.sdk_version}, so some calls may fail")
        return J.dump(T.CreateSessionResponse(session_id=sid, warning_message=warning))

    @router.post("/session_heartbeat")
    async def session_heartbeat(request: Request):
        body = await body_of(request, T.SessionHeartbeatRequest)
        try:
            engine.session(body.session_id, owner(request))
        except ServiceError as err:
            if err.code in ("unknown_session", "session_closed"):
                raise ServiceError("session_closed", f"session {body.session_id} has finished or is unknown",
                                   status=410) from None
            raise
        return J.dump(T.SessionHeartbeatResponse())

    @router.post("/telemetry")
    async def telemetry(request: Request):
        batch = await json_object(request)
        if settings.telemetry_log:
            line = json.dumps({"owner": owner(request), **batch}, separators=(",", ":"), default=str) + "\n"

            def append():
                with telemetry_lock, open(settings.telemetry_log, "a", encoding="utf-8") as f:
                    f.write(line)

            await run_in_threadpool(append)
        return J.dump(T.TelemetryResponse(status="accepted"))

    @router.post("/sessions/{session_id}/finish")
    async def finish_session(request: Request, session_id: str):
        body = await json_object(request)
        reason = body.get("reason", {}).get("type") if isinstance(body.get("reason"), dict) else None
        who = owner(request)
        if state.was_finished(session_id, who):
            return {}  # first finish wins; a repeat is not an error
        sess = session(request, session_id)
        engine.close_session(sess, f"the client finished it ({reason or 'no reason given'})")
        state.finished(sess.id, who)
        return {}

    @router.get("/healthz")
    async def healthz():
        return J.dump(T.HealthResponse(status="ok"))

    @router.get("/get_server_capabilities")
    def server_capabilities():
        models = [T.SupportedModel(model_name=m["model_name"], max_context_length=m["max_context_length"],
                                   trainable=m["trainable"], sampleable=m["sampleable"])
                  for m in service.supported_models()]
        return J.dump(T.GetServerCapabilitiesResponse(supported_models=models))

    # ---- models ---------------------------------------------------------------------------------------------
    @router.post("/create_model")
    async def create_model(request: Request):
        body = await body_of(request, T.CreateModelRequest)

        def make(sess, model_id: str) -> Future:
            lora = body.lora_config or T.LoraConfig(rank=32)
            spec = LoraSpec.make(lora.rank, lora.seed, lora.train_attn, lora.train_mlp, lora.train_unembed)
            return service.create_model(sess, model_id, body.base_model, spec,
                                        json_encoder(lambda v: T.CreateModelResponse(model_id=v["model_id"])),
                                        user_metadata=body.user_metadata)

        fut, sess, model_id = await run_in_threadpool(created_once, request, body, make)
        return hand_out(fut, sess, model_id=model_id)

    @router.post("/get_info")
    async def get_info(request: Request):
        body = await body_of(request, T.GetInfoRequest)
        sess = model_session(request, body.model_id)
        model = engine.model(sess, body.model_id)
        note(request, body.model_id)
        return J.dump(T.GetInfoResponse(
            type="get_info", model_id=body.model_id, is_lora=True, lora_rank=model.lora.rank,
            model_name=model.base_name, optimizer_config=T.AdamOptimizerConfig(),
            # The tokenizer's local directory: AutoTokenizer loads it offline wherever client and server share
            # a filesystem (the SDK would otherwise look the base model's name up on the hub).
            model_data=T.ModelData(arch=model.info.architecture, model_name=model.base_name,
                                   tokenizer_id=str(model.info.path))))

    # ---- forward_backward (protobuf) --------------------------------------------------------------------------
    def read_protobuf(request: Request, raw: bytes) -> bytes:
        if content_type(request) != PROTOBUF:
            raise ServiceError("unsupported_media_type", f"{request.url.path} takes {PROTOBUF} (the SDK's "
                               f"ForwardBackwardRequest), got {content_type(request) or 'none'}")
        encoding = request.headers.get("content-encoding", "").strip().lower()
        if encoding in ("", "identity"):
            return raw
        if encoding != "zstd":
            raise ServiceError("unsupported_media_type", f"Content-Encoding must be zstd or none, got {encoding!r}")
        import zstandard

        limit = int(settings.max_request_mb * 2**20)
        try:
            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)) as reader:
                out = reader.read(limit + 1)
        except zstandard.ZstdError as exc:
            raise ServiceError("invalid_protobuf", f"the zstd body cannot be decompressed ({exc})") from None
        if len(out) > limit:
            raise ServiceError("payload_too_large", f"the decompressed body is above the limit of {limit} bytes "
                               "(--max-request-mb)")
        return out

    def resolve_tinker_loss(sess, name: str, config: dict[str, Any], keys: set[str], info) -> ResolvedLoss:
        supported = ", ".join([*token_losses, "custom"])
        if name == "custom":
            loss_id = config.get("loss_id")
            extra = sorted(set(config) - {"loss_id"})
            if not isinstance(loss_id, str):
                raise ServiceError("missing_config", "loss_fn 'custom' needs loss_fn_config['loss_id'] (a string from "
                                   "create_custom_loss)", detail={"argument": "loss_id"})
            if extra:
                raise ServiceError("validation_error", f"loss_fn 'custom' takes only loss_id in loss_fn_config, got "
                                   f"{extra[0]!r}", detail={"argument": extra[0]})
            custom = sess.losses.get(loss_id)
            if custom is None or custom.program is None or custom.program.kind != TINKER_KIND:
                raise ServiceError("unknown_loss_id", f"no custom loss {loss_id!r} in this session (create it with "
                                   "ServiceClient.create_custom_loss)", detail={"argument": "loss_id"})
            return ResolvedLoss(loss_id, custom=custom, config={})
        if name in UNSUPPORTED_LOSSES:
            raise ServiceError("unsupported_loss", f"loss_fn {name!r} is not supported by this server (supported: "
                               f"{supported})", detail={"argument": "loss_fn"})
        if name not in token_losses:
            raise ServiceError("unsupported_loss", f"loss_fn {name!r} is not a Tinker loss (supported: {supported})",
                               detail={"argument": "loss_fn"})
        return service.resolve_loss(sess, name, config, keys, info)

    def datum_inputs(rec: TinkerSession, loss: ResolvedLoss, data: tuple[WireDatum, ...]):
        """A custom loss's declared inputs of each datum, at their declared ranks (checked before any compute)."""
        declared = rec.loss_inputs[loss.name]
        (_, lp_rank), rest = declared[0], declared[1:]
        out = []
        for i, d in enumerate(data):
            tt = d.inputs["target_tokens"]
            if tt.dim() != lp_rank:
                raise ServiceError("shape_mismatch", f"data[{i}]: target_tokens has rank {tt.dim()}, but the loss "
                                   f"takes logprobs of rank {lp_rank}", detail={"argument": "target_tokens"})
            mine = {}
            for name, rank in rest:
                if name not in d.inputs:
                    raise ServiceError("loss_input_missing", f"data[{i}] has no loss_fn_inputs[{name!r}], which custom "
                                       f"loss {loss.name!r} reads", detail={"input": name})
                t = d.inputs[name]
                if rank == 0 and name in d.shapeless and t.numel() == 1:
                    t = t.reshape(())
                if t.dim() != rank:
                    raise ServiceError("shape_mismatch", f"data[{i}].loss_fn_inputs[{name!r}] has rank {t.dim()}; the "
                                       f"loss declared rank {rank}", detail={"argument": name})
                mine[name] = t
            out.append(mine)
        return tuple(out)

    @router.post("/forward_backward")
    async def forward_backward(request: Request):
        raw = read_protobuf(request, await request.body())

        def submit():
            from losskit.service.batch import build_batch

            wire = decode_forward_backward(raw)
            note(request, wire.model_id, wire.seq_id)
            sess = model_session(request, wire.model_id)
            model = engine.model(sess, wire.model_id)
            digest = hashlib.sha256(canonical_bytes(raw)).hexdigest()

            def validate_and_submit():
                missing = [i for i, d in enumerate(wire.data) if "target_tokens" not in d.inputs]
                if missing:
                    raise ServiceError("loss_input_missing", f"data[{missing[0]}] has no loss_fn_inputs"
                                       "['target_tokens'] (position i of model_input predicts target_tokens[i])",
                                       detail={"input": "target_tokens"})
                keys = set.intersection(*(set(d.inputs) for d in wire.data))
                loss = resolve_tinker_loss(sess, wire.loss_fn, dict(wire.config), keys, model.info)
                custom = loss.custom is not None
                if not custom and wire.loss_fn != "cross_entropy" and any(d.inputs["target_tokens"].dim() != 1
                                                                         for d in wire.data):
                    raise ServiceError("shape_mismatch", f"loss {wire.loss_fn!r} needs target_tokens of shape [T] "
                                       "(only cross_entropy and custom losses take [T, K])",
                                       detail={"argument": "target_tokens"})
                inputs = [{"target_tokens": d.inputs["target_tokens"]} if custom else dict(d.inputs)
                          for d in wire.data]
                rows = [{"model_input": {"chunks": [{"type": "encoded_text", "tokens": d.tokens.tolist()}]},
                         "loss_fn_inputs": own} for d, own in zip(wire.data, inputs)]
                batch = build_batch(rows, None, model.info, needs_target_tokens=False,
                                    max_rows=settings.max_datums_per_request, max_len=service.max_len(model.info))
                if custom:
                    batch = dataclasses.replace(batch, datum_inputs=datum_inputs(record(sess), loss, wire.data))
                return service.forward_backward(
                    sess, wire.model_id, wire.seq_id, digest, loss, batch, forward_only=wire.forward_only,
                    encode=lambda v: (encode_forward_backward_output(v), PROTOBUF), request_bytes=len(raw))

            return guarded(sess, wire.model_id, wire.seq_id, digest, validate_and_submit), sess, wire.model_id

        fut, sess, model_id = await run_in_threadpool(submit)
        return hand_out(fut, sess, model_id=model_id)

    # ---- optimizer, checkpoints ---------------------------------------------------------------------------------
    @router.post("/optim_step")
    async def optim_step(request: Request):
        body = await body_of(request, T.OptimStepRequest)

        def go(sess, digest):
            params = body.optim_params
            if not isinstance(params, T.AdamParams):
                raise ServiceError("unsupported_optimizer", f"only AdamParams are supported, got optimizer "
                                   f"{getattr(params, 'type', type(params).__name__)!r}",
                                   detail={"argument": "optimizer_params"})
            adam = AdamParams.from_mapping(params.model_dump())
            return service.optim_step(sess, body.model_id, body.seq_id, digest, adam,
                                      json_encoder(lambda v: T.OptimStepResponse(metrics=v["metrics"])))

        return await sequenced(request, body, go)

    @router.post("/save_weights")
    async def save_weights(request: Request):
        body = await body_of(request, T.SaveWeightsRequest)

        def go(sess, digest):
            if body.path is None:
                raise ServiceError("validation_error", "SaveWeightsRequest: missing field 'path' (the checkpoint "
                                   "name)", detail={"argument": "path"})
            return service.save(sess, body.model_id, body.seq_id, digest, body.path, kind="weights",
                                 overwrite=body.overwrite, ttl_seconds=body.ttl_seconds,
                                 user_metadata=body.user_metadata,
                                 encode=json_encoder(lambda v: T.SaveWeightsResponse(path=v["path"],
                                                                                     type="save_weights")))

        return await sequenced(request, body, go)

    @router.post("/save_weights_for_sampler")
    async def save_weights_for_sampler(request: Request):
        body = await body_of(request, T.SaveWeightsForSamplerRequest)

        def go(sess, digest):
            reply = lambda **kw: T.SaveWeightsForSamplerResponseInternal(type="save_weights_for_sampler", **kw)
            if (body.path is None) == (body.sampling_session_seq_id is None):
                raise ServiceError("validation_error", "save_weights_for_sampler takes exactly one of path (a named "
                                   "checkpoint) or sampling_session_seq_id (a sampler held in memory)",
                                   detail={"argument": "path"})
            if body.path is not None:
                return service.save(sess, body.model_id, body.seq_id, digest, body.path, kind="sampler_weights",
                                     overwrite=False, ttl_seconds=body.ttl_seconds,
                                     user_metadata=body.user_metadata,
                                     encode=json_encoder(lambda v: reply(path=v["path"])))
            if body.ttl_seconds is not None:
                raise ServiceError("validation_error", "ttl_seconds applies to named checkpoints; a sampler held "
                                   "in memory lives as long as its session", detail={"argument": "ttl_seconds"})
            if body.sampling_session_seq_id < 0:
                raise ServiceError("validation_error", "sampling_session_seq_id must be >= 0",
                                   detail={"argument": "sampling_session_seq_id"})
            rec = record(sess)
            sampler_id = sampler_id_of(sess.id, body.sampling_session_seq_id)
            if sampler_id in rec.samplers:
                raise ServiceError("seq_conflict", f"sampling_session_seq_id {body.sampling_session_seq_id} "
                                   f"already names sampler {sampler_id}",
                                   detail={"argument": "sampling_session_seq_id"})

            def keep(source: SnapshotSource):
                with state.lock:
                    rec.samplers[sampler_id] = Sampler(sampler_id, source.base_model, None, source)
                return reply(sampling_session_id=sampler_id)

            return service.snapshot(sess, body.model_id, body.seq_id, digest, json_encoder(keep))

        return await sequenced(request, body, go)

    @router.post("/load_weights")
    async def load_weights(request: Request):
        body = await body_of(request, T.LoadWeightsRequest)

        def reply(v):
            return T.LoadWeightsResponse(path=v.get("path", body.path), model_id=v["model_id"], type="load_weights")

        def submit():
            if body.weights_access_token is not None:
                raise _unsupported("weights_access_token (loading another account's checkpoints)")
            if body.model_id is not None:
                if body.session_id is not None or body.model_seq_id is not None:
                    raise ServiceError("validation_error", "load_weights takes model_id + seq_id (an existing model) "
                                       "or session_id + model_seq_id (a new model), not both")
                if body.optimizer_config is not None or body.base_model is not None:
                    raise ServiceError("validation_error", "optimizer_config and base_model apply only when a load "
                                       "creates a model (session_id + model_seq_id)")
                note(request, body.model_id, body.seq_id)
                sess = model_session(request, body.model_id)
                digest = J.digest(body)
                return guarded(sess, body.model_id, body.seq_id, digest, lambda: service.load_into(
                    sess, body.model_id, body.seq_id, digest, body.path, optimizer=body.optimizer,
                    encode=json_encoder(reply))), sess, body.model_id
            if body.session_id is None or body.model_seq_id is None:
                raise ServiceError("validation_error", "load_weights needs model_id + seq_id, or session_id + "
                                   "model_seq_id", detail={"argument": "model_id"})
            if body.optimizer and body.optimizer_config is not None:
                raise ServiceError("validation_error", "optimizer_config cannot override the optimizer state the "
                                   "load restores (optimizer=true)", detail={"argument": "optimizer_config"})

            def make(sess, model_id: str) -> Future:
                if body.base_model is not None:
                    trained_on = service.checkpoint_run(sess, body.path)["base_model"]
                    if body.base_model != trained_on:
                        raise ServiceError("validation_error", f"base_model {body.base_model!r} differs from the "
                                           f"checkpoint's base model {trained_on!r}; this server loads a checkpoint "
                                           "on its own base model only", detail={"argument": "base_model"})
                return service.load_new(sess, body.path, model_id, optimizer=body.optimizer,
                                        encode=json_encoder(reply), user_metadata=body.user_metadata)

            return created_once(request, body, make)

        fut, sess, model_id = await run_in_threadpool(submit)
        return hand_out(fut, sess, model_id=model_id)

    # ---- sampling -----------------------------------------------------------------------------------------------
    @router.post("/create_sampling_session")
    async def create_sampling_session(request: Request):
        body = await body_of(request, T.CreateSamplingSessionRequest)

        def create():
            sess = session(request, body.session_id)
            rec = record(sess)
            if body.sampling_session_seq_id < 0:
                raise ServiceError("validation_error", "sampling_session_seq_id must be >= 0",
                                   detail={"argument": "sampling_session_seq_id"})
            sampler_id = sampler_id_of(sess.id, body.sampling_session_seq_id)
            existing = rec.samplers.get(sampler_id)
            if existing is not None:
                if (existing.model_path, existing.base_model if body.base_model else None) != \
                        (body.model_path, body.base_model):
                    raise ServiceError("seq_conflict", f"sampling_session_seq_id {body.sampling_session_seq_id} "
                                       f"already names sampler {sampler_id} of another model")
                return sampler_id
            if body.model_path is not None:
                source = service.read_snapshot(sess, body.model_path)
                if body.base_model is not None and body.base_model != source.base_model:
                    raise ServiceError("validation_error", f"base_model {body.base_model!r} differs from the base "
                                       f"model of {source.label} ({source.base_model!r})",
                                       detail={"argument": "base_model"})
                sampler = Sampler(sampler_id, source.base_model, source.label, source)
            elif body.base_model is not None:
                engine.base_info(body.base_model)  # 400 unknown_base_model
                sampler = Sampler(sampler_id, body.base_model, None, None)
            else:
                raise ServiceError("validation_error", "create_sampling_session needs model_path or base_model",
                                   detail={"argument": "model_path"})
            with state.lock:
                rec.samplers.setdefault(sampler_id, sampler)
            return sampler_id

        sampler_id = await run_in_threadpool(create)
        return J.dump(T.CreateSamplingSessionResponse(sampling_session_id=sampler_id))

    def sampler_of(request: Request, sampler_id: Any) -> tuple[Any, Sampler]:
        sess = session(request, session_id_in(sampler_id), what=f"sampler {sampler_id!r} in session")
        sampler = record(sess).samplers.get(sampler_id)
        if sampler is None:
            raise ServiceError("not_found", f"no sampling session {sampler_id!r} in this session", status=404)
        return sess, sampler

    @router.get("/samplers/{sampler_id}")
    def get_sampler(request: Request, sampler_id: str):
        _, sampler = sampler_of(request, sampler_id)
        return J.dump(T.GetSamplerResponse(sampler_id=sampler.id, base_model=sampler.base_model,
                                           model_path=sampler.model_path))

    @router.post("/asample")
    async def asample(request: Request):
        body = await body_of(request, T.SampleRequest)

        def submit():
            if body.sampling_session_id is None:
                raise _unsupported("sampling without a sampling session (create one with create_sampling_session)")
            if body.seq_id is None or body.seq_id < 0:
                raise ServiceError("validation_error", f"seq_id must be an int >= 0, got {body.seq_id!r}",
                                   detail={"argument": "seq_id"})
            if body.target_prompt_logprobs is not None:
                raise _unsupported("target_prompt_logprobs")
            if body.prompt_alt_tokens_k:
                raise _unsupported("prompt_alt_tokens_k > 0")
            note(request, body.sampling_session_id, body.seq_id)
            sess, sampler = sampler_of(request, body.sampling_session_id)
            digest = J.digest(body)
            with state.lock:
                known = sampler.submitted(body.seq_id, digest)
            if known is not None:
                return engine.futures.get(known[0], sess.id), sess, known[1]
            with state.lock:
                sampler.pending = {rid for rid in sampler.pending if not _peek_done(rid, sess.id)}
                pending = len(sampler.pending)
            if pending >= settings.max_pending_per_model:
                raise ServiceError("queue_full", f"sampling session {sampler.id} has {pending} pending requests "
                                   "(--max-pending-per-model); retry later", headers={"Retry-After": "1"})
            info = engine.base_info(sampler.base_model)
            prompt = []
            for j, chunk in enumerate(body.prompt.chunks):
                if not isinstance(chunk, T.EncodedTextChunk):
                    raise ServiceError("unsupported_feature", f"prompt.chunks[{j}] is a {chunk.type} chunk; only "
                                       "encoded_text chunks are supported", detail={"argument": "prompt"})
                prompt += list(chunk.tokens)
            check_prompt(prompt, info.vocab_size)
            if not 1 <= body.num_samples <= settings.max_num_samples:
                raise ServiceError("validation_error", f"num_samples must be in [1, {settings.max_num_samples}] "
                                   f"(--max-num-samples), got {body.num_samples}", detail={"argument": "num_samples"})
            for name in ("topk_prompt_logprobs", "topk_sample_logprobs"):
                if not 0 <= getattr(body, name) <= MAX_TOPK:
                    raise ServiceError("validation_error", f"{name} must be in [0, {MAX_TOPK}], got "
                                       f"{getattr(body, name)}", detail={"argument": name})
            last_n = body.prompt_logprobs_last_n
            if last_n is not None and not (body.prompt_logprobs and 1 <= last_n <= len(prompt) - 1):
                raise ServiceError("validation_error", f"prompt_logprobs_last_n must be in [1, {len(prompt) - 1}] "
                                   "and needs prompt_logprobs", detail={"argument": "prompt_logprobs_last_n"})
            room = min(settings.max_sample_tokens, info.max_context - len(prompt))
            if room < 1:
                raise ServiceError("context_exceeded", f"the prompt ({len(prompt)} tokens) fills the context of "
                                   f"{info.max_context}")
            values = {k: v for k, v in body.sampling_params.model_dump().items() if v is not None}
            params = SamplingParams.from_mapping(values, eos_id=info.eos_id,
                                                 max_sample_tokens=settings.max_sample_tokens,
                                                 default_max_tokens=room)
            if len(prompt) + params.max_tokens > info.max_context:
                raise ServiceError("context_exceeded", f"prompt ({len(prompt)} tokens) + max_tokens "
                                   f"({params.max_tokens}) exceeds the context of {info.max_context}")
            options = PromptOptions(bool(body.prompt_logprobs), last_n, body.topk_prompt_logprobs,
                                    body.topk_sample_logprobs)
            topk = {"topk_prompt": body.topk_prompt_logprobs, "topk_sample": body.topk_sample_logprobs}
            fut = service.sample(
                sess, model_id=None, model_path=None,
                base_model=sampler.base_model if sampler.source is None else None, seq=None, body_hash=digest,
                prompt=prompt, num_samples=body.num_samples, params=params, options=options,
                snapshot=sampler.source, lane=sampler.id,
                encode=lambda v: (encode_sample_response(v, **topk), PROTOBUF))
            ids = [f"{sampler.id}:{body.seq_id}:{i}" for i in range(body.num_samples)]
            with state.lock:
                sampler.record(body.seq_id, fut.request_id, digest, ids)
                sampler.pending.add(fut.request_id)
            return fut, sess, ids

        fut, sess, ids = await run_in_threadpool(submit)
        return hand_out(fut, sess, sequence_ids=ids)

    def _peek_done(request_id: str, session_id: str) -> bool:
        try:
            return engine.futures.get(request_id, session_id).done
        except ServiceError:
            return True

    # ---- custom losses ----------------------------------------------------------------------------------------
    @router.post("/create_custom_loss")
    async def create_custom_loss(request: Request):
        body = await body_of(request, T.CreateCustomLossRequest)

        def create():
            if settings.tinker_custom_loss != "server":
                raise ServiceError("unsupported_feature", "this server runs with --tinker-custom-loss client: custom "
                                   "losses run in the SDK (its client config says so)")
            sess = session(request, body.session_id)
            rec = record(sess)
            digest = J.digest(body)
            with state.lock:
                if body.custom_loss_seq_id in rec.losses:
                    rid, loss_id, known = rec.losses[body.custom_loss_seq_id]
                    if known != digest:
                        raise ServiceError("seq_conflict", f"custom_loss_seq_id {body.custom_loss_seq_id} already "
                                           f"created {loss_id} from another graph")
                    return engine.futures.get(rid, sess.id), sess
            names = [i.name for i in body.inputs]
            if not names or names[0] != "logprobs" or body.inputs[0].rank not in (1, 2):
                raise ServiceError("invalid_loss_graph", "inputs must start with logprobs of rank 1 or 2",
                                   detail={"argument": "inputs"})
            if len(set(names)) != len(names):
                raise ServiceError("invalid_loss_graph", "inputs name a parameter twice", detail={"argument": "inputs"})
            try:
                program = parse_graph(J.dump(body.graph), name=body.name, kind=TINKER_KIND,
                                      max_nodes=settings.max_graph_nodes)
            except CustomLossError as exc:
                raise ServiceError(exc.code, exc.message, detail=exc.detail) from None
            if list(program.inputs_read) != names[1:]:
                raise ServiceError("invalid_loss_graph", f"custom loss {body.name!r}: inputs {names} do not match the "
                                   f"graph's parameters {['logprobs', *program.inputs_read]}",
                                   detail={"argument": "inputs"})
            loss_id = loss_id_of(sess.id, body.custom_loss_seq_id)
            service.register_loss(sess, CustomLoss(loss_id, 0, f"Tinker custom loss {body.name}", program=program))
            with state.lock:
                rec.loss_inputs[loss_id] = tuple((i.name, i.rank) for i in body.inputs)
                fut = completed(sess, "create_custom_loss", J.dump(T.CreateCustomLossResponse(loss_id=loss_id)))
                rec.losses[body.custom_loss_seq_id] = (fut.request_id, loss_id, digest)
            return fut, sess

        fut, sess = await run_in_threadpool(create)
        return hand_out(fut, sess)

    # ---- futures --------------------------------------------------------------------------------------------
    @router.post("/retrieve_future")
    async def retrieve_future(request: Request):
        body = await body_of(request, T.FutureRetrieveRequest)
        sid = state.session_of_request(body.request_id, owner(request))
        fut = engine.futures.get(body.request_id, sid)
        note(request, fut.model_id, fut.seq_id)
        await engine.futures.wait(fut, settings.long_poll_s)
        if fut.state == DONE:
            return Response(fut.body, media_type=fut.content_type)
        if fut.state == FAILED:
            return _json_reply(fut.error.body(fut.request_id))
        return J.dump(TryAgainResponse(request_id=fut.request_id, queue_state="active"))

    @router.post("/cancel_future")
    async def cancel_future(request: Request):
        body = await json_object(request)
        rid = body.get("request_id")
        sid = state.session_of_request(rid, owner(request))
        fut = engine.futures.get(rid, sid)
        if fut.kind != "sample":
            raise ServiceError("unsupported_feature", f"only sampling requests can be cancelled; {rid} is a {fut.kind}")
        if not fut.done:
            engine.futures.fail(fut, ServiceError("cancelled", f"request {rid} was cancelled by the client"))
        return {}

    # ---- training runs and checkpoints (REST) ---------------------------------------------------------------
    def run_of(request: Request, run_id: str) -> tuple[dict[str, Any], Any]:
        """The run record of a training run of this caller (its live model, or its run.json) and the live model."""
        model_id = run_id.replace(".", ":")
        live = None
        sid = session_id_in(model_id)
        if sid is not None and sid in engine.sessions:
            try:
                live = engine.model(session(request, sid), model_id)
            except ServiceError:
                live = None
        saved = service.state.run_info(run_id) if "/" not in run_id and ".." not in run_id else None
        if saved is not None and settings.api_keys and saved.get("owner") != owner(request):
            saved = None
        if live is None and saved is None:
            raise ServiceError("not_found", f"no training run {run_id!r} for this key", status=404)
        if live is not None:
            return {"base_model": live.base_name, "lora": {"rank": live.lora.rank, "train_attn": live.lora.train_attn,
                                                           "train_mlp": live.lora.train_mlp,
                                                           "train_unembed": live.lora.train_unembed},
                    "owner": live.session.owner, "user_metadata": live.user_metadata,
                    "created": live.created}, live
        return saved, None

    def checkpoints(run_id: str) -> list[T.Checkpoint]:
        out = []
        for cp in service.state.list_checkpoints(run_id):
            folder = service.state.checkpoint_dir(cp)
            try:
                meta = json.loads((folder / META).read_text())
            except (OSError, ValueError):
                continue
            size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
            expires = meta.get("expires_at")
            out.append(T.Checkpoint(
                checkpoint_id=f"{cp.kind}/{cp.name}",
                checkpoint_type="training" if cp.kind == "weights" else "sampler",
                time=datetime.datetime.fromtimestamp(meta.get("created", folder.stat().st_mtime), datetime.UTC),
                tinker_path=cp.uri, size_bytes=size,
                user_metadata={str(k): str(v) for k, v in (meta.get("user_metadata") or {}).items()},
                expires_at=None if expires is None else datetime.datetime.fromtimestamp(expires, datetime.UTC)))
        return sorted(out, key=lambda c: c.time)

    @router.get("/training_runs/{run_id}")
    def training_run(request: Request, run_id: str):
        info, _ = run_of(request, run_id)
        cps = checkpoints(run_id)
        last = lambda kind: next((c for c in reversed(cps) if c.checkpoint_type == kind), None)
        return J.dump(T.TrainingRun(
            training_run_id=run_id, base_model=info["base_model"], model_owner=str(info.get("owner", "")),
            is_lora=True, corrupted=False, lora_rank=info.get("lora", {}).get("rank"),
            last_request_time=datetime.datetime.fromtimestamp(info.get("created", 0), datetime.UTC),
            last_checkpoint=last("training"), last_sampler_checkpoint=last("sampler"),
            user_metadata={str(k): str(v) for k, v in (info.get("user_metadata") or {}).items()}))

    @router.get("/training_runs/{run_id}/checkpoints")
    def training_run_checkpoints(request: Request, run_id: str):
        run_of(request, run_id)
        return J.dump(T.CheckpointsListResponse(checkpoints=checkpoints(run_id)))

    @router.post("/weights_info")
    async def weights_info(request: Request):
        body = await json_object(request)
        cp: CheckpointPath = parse_path(body.get("tinker_path"))
        info, _ = run_of(request, cp.run_id)
        if not service.state.checkpoint_dir(cp).is_dir():
            raise ServiceError("checkpoint_not_found", f"no checkpoint at {cp.uri}", detail={"path": cp.uri})
        lora = info.get("lora", {})
        return J.dump(T.WeightsInfoResponse(base_model=info["base_model"], is_lora=True, lora_rank=lora.get("rank"),
                                            train_unembed=lora.get("train_unembed"), train_mlp=lora.get("train_mlp"),
                                            train_attn=lora.get("train_attn")))

    # ---- not supported in this version ------------------------------------------------------------------------
    def unsupported_route(what: str):
        async def route():
            raise _unsupported(what)

        return route

    for path, what in _UNSUPPORTED.items():
        router.post(f"/{path}")(unsupported_route(what))
    router.add_api_route("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}",
                         unsupported_route("changing or deleting checkpoints over the API"),
                         methods=["DELETE", "PUT", "POST"])

    return router

