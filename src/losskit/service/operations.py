"""The engine operations every surface maps requests onto: CreateModel, ForwardBackward, OptimStep, SaveState,
LoadState, SaveForSampler, Sample and RegisterLoss.

``Service`` bundles the engine, the device backend, the model registry and the state directory. Each method
takes already-parsed values (a surface only parses, validates its own wire format and encodes), checks what can be
checked at submit (loss name and inputs, config keys, token ranges, paths, ownership), queues the work and returns
the engine future. Results are plain Python values; the surface's ``encode`` turns them into bytes.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

import torch

from losskit import __version__
from losskit.service import snapshots
from losskit.service.backend import Backend
from losskit.service.batch import Batch
from losskit.service.checkpoints import CheckpointPath, StateDir, check_name, parse_path, run_id_of
from losskit.service.custom_loss import CustomLossError
from losskit.service.engine import Encoder, Engine, IOTask, Session, single_unit
from losskit.service.errors import ServiceError
from losskit.service.futures import Future
from losskit.service.lora import LoraSpec
from losskit.service.loss_registry import CustomLoss, ResolvedLoss
from losskit.service.models import ModelRegistry
from losskit.service.optim import AdamParams
from losskit.service.sampling import PromptOptions, SamplingParams
from losskit.service.settings import ServeSettings

log = logging.getLogger("losskit.serve")


@dataclasses.dataclass(frozen=True)
class SnapshotSource:
    """An adapter to sample from, held in memory: a checkpoint read once, or a snapshot of a training model.

    Attributes:
        label: what it is (the checkpoint's ``tinker://`` path, or the model id it was taken from).
        base_model: the base model the adapter belongs to.
        key: a unique name of this adapter's weights (the device keeps a few frozen copies by key).
        snapshot: the CPU tensors and config.
    """

    label: str
    base_model: str
    key: str
    snapshot: snapshots.AdapterSnapshot


class Service:
    """One server's operations, shared by the native surface and the Tinker wire surface."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.models = ModelRegistry(settings)
        self.state = StateDir(settings.resolved_state_dir)
        cleaned = self.state.clean_tmp()
        if cleaned:
            log.info("removed %d staged file(s) left in %s by an earlier run", cleaned, self.state.tmp)
        self.state.expire()
        self.backend = Backend(settings, self.models)
        self.engine = Engine(settings, self.backend, self.models, self.state)

    def start(self, *, warm_up: bool = True) -> None:
        self.engine.start()
        if warm_up:
            info = self.engine.base_info(self.settings.default_base_model)
            self.engine.call_on_worker(lambda: self.backend.warm_up(info), timeout=600)

    def stop(self) -> None:
        self.engine.stop()

    # ---- capabilities ----------------------------------------------------------------------------------------
    def supported_models(self) -> list[dict[str, Any]]:
        out = []
        for name in self.models.known():
            try:
                info = self.engine.base_info(name)
            except ServiceError:
                continue
            out.append({"model_name": name, "max_context_length": info.max_context, "trainable": True,
                        "sampleable": True, "architecture": info.architecture, "vocab_size": info.vocab_size})
        return out

    def max_len(self, info) -> int:
        return min(self.settings.max_seq_len or info.max_context, info.max_context)

    # ---- losses --------------------------------------------------------------------------------------------------
    def loss_listing(self, session: Session | None) -> dict[str, Any]:
        builtins = self.engine.builtins
        custom = sorted((session.losses if session else {}).values(), key=lambda c: c.name)
        names = [*builtins, *(c.name for c in custom)]
        descriptions = {n: b.description for n, b in builtins.items()}
        descriptions.update({c.name: c.description for c in custom})
        return {"available_loss_functions": names, "descriptions": descriptions, "builtin": list(builtins),
                "custom": [c.listing() for c in custom]}

    def resolve_loss(self, session: Session, name: Any, config: Mapping[str, Any], input_keys: set[str],
                     info) -> ResolvedLoss:
        """The loss a request names, with its config checked (404 ``unknown_loss`` lists what exists)."""
        if not isinstance(name, str):
            raise ServiceError("validation_error", f"loss_fn must be a string, got {name!r}",
                               detail={"argument": "loss_fn"})
        builtin = self.engine.builtins.get(name)
        if builtin is not None:
            return ResolvedLoss(name, builtin=builtin, config=builtin.check(config, input_keys,
                                                                            vocab_size=info.vocab_size))
        custom = session.losses.get(name)
        if custom is None:
            known = ", ".join([*self.engine.builtins, *sorted(session.losses)])
            raise ServiceError("unknown_loss", f"loss_fn {name!r} is neither a built-in nor a custom loss of this "
                               f"session (available: {known})", detail={"argument": "loss_fn"})
        if custom.program is not None:
            try:
                bound = custom.program.bind_hyperparameters(config)
            except CustomLossError as exc:
                raise ServiceError(exc.code, exc.message, detail=exc.detail) from None
            return ResolvedLoss(name, custom=custom, config=bound)
        return ResolvedLoss(name, custom=custom, config=dict(config))

    def reads_target_tokens(self, session: Session, name: Any) -> bool:
        """Whether the named loss reads ``target_tokens`` (the shift rule); an unknown name reads nothing (it is
        reported by ``resolve_loss``)."""
        if isinstance(name, str) and name in self.engine.builtins:
            return True
        custom = session.losses.get(name) if isinstance(name, str) else None
        return custom is not None and custom.reads_target_tokens

    def register_loss(self, session: Session, loss: CustomLoss) -> tuple[CustomLoss, bool]:
        return self.engine.register_loss(session, loss)

    @staticmethod
    def check_pickle_environment(python: Any) -> None:
        here = f"{sys.version_info.major}.{sys.version_info.minor}"
        if not isinstance(python, str) or ".".join(python.split(".")[:2]) != here:
            raise ServiceError("pickle_version_mismatch", f"the pickled loss was made with Python {python!r}, the "
                               f"server runs Python {here}; cloudpickle payloads do not cross Python versions")

    # ---- models --------------------------------------------------------------------------------------------------
    def create_model(self, session: Session, model_id: str, base_model: str | None, spec: LoraSpec,
                     encode: Encoder, *, user_metadata: Mapping[str, Any] | None = None) -> Future:
        return self.engine.create_model(session, model_id, base_model or self.settings.default_base_model, spec,
                                        encode, user_metadata=dict(user_metadata or {}))

    def forward_backward(self, session: Session, model_id: str, seq: int | None, body_hash: str,
                         loss: ResolvedLoss, batch: Batch, *, forward_only: bool, encode: Encoder,
                         request_bytes: int = 0) -> Future:
        def units(handle, _seq):
            return self.backend.forward_backward(handle, loss, batch, forward_only=forward_only)

        label = "forward" if forward_only else "forward_backward"
        return self.engine.submit(session, model_id, seq, body_hash, label, units, encode,
                                  request_bytes=request_bytes)

    def optim_step(self, session: Session, model_id: str, seq: int | None, body_hash: str, adam: AdamParams,
                   encode: Encoder) -> Future:
        def units(handle, _seq):
            return single_unit(lambda: {"metrics": self.backend.optim_step(handle, adam)})

        return self.engine.submit(session, model_id, seq, body_hash, "optim_step", units, encode)

    def _meta(self, state, seq: int | None, ttl_seconds: float | None,
              user_metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
        expires = None if ttl_seconds is None else time.time() + float(ttl_seconds)
        return {"seq_id": seq, "model_id": state.model_id, "base_model": state.base_name, "created": time.time(),
                "expires_at": expires, "user_metadata": dict(user_metadata or {}),
                "versions": {"losskit": __version__, "torch": torch.__version__, "python": sys.version.split()[0]}}

    def _run_info(self, state) -> dict[str, Any]:
        return {"model_id": state.model_id, "base_model": state.base_name, "lora": dataclasses.asdict(state.lora),
                "seed": state.lora.seed, "owner": state.session.owner, "created": state.created,
                "user_metadata": state.user_metadata}

    def save(self, session: Session, model_id: str, seq: int | None, body_hash: str, name: Any, *, kind: str,
             overwrite: bool, ttl_seconds: float | None, encode: Encoder,
             user_metadata: Mapping[str, Any] | None = None) -> Future:
        """SaveState (``kind="weights"``, with the optimizer) or SaveForSampler (``"sampler_weights"``)."""
        state = self.engine.model(session, model_id)
        cp = CheckpointPath(run_id_of(model_id), kind, check_name(name))
        if ttl_seconds is not None and (isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, (int, float))
                                        or ttl_seconds <= 0):
            raise ServiceError("validation_error", f"ttl_seconds must be a positive number, got {ttl_seconds!r}",
                               detail={"argument": "ttl_seconds"})
        if not isinstance(overwrite, bool):
            raise ServiceError("validation_error", f"overwrite must be a bool, got {overwrite!r}",
                               detail={"argument": "overwrite"})
        with_optimizer = kind == "weights"

        def units(handle, seq_id):
            def snap():
                snapshot = self.backend.snapshot(handle, with_optimizer=with_optimizer)

                def write():
                    self.state.ensure_run_info(cp.run_id, self._run_info(state))
                    self.state.write(cp, snapshots.to_files(snapshot),
                                     self._meta(state, seq_id, ttl_seconds, user_metadata), overwrite=overwrite)
                    return {"path": cp.uri}

                return IOTask(write)

            return single_unit(snap)

        label = "save_state" if with_optimizer else "save_weights_for_sampler"
        return self.engine.submit(session, model_id, seq, body_hash, label, units, encode)

    def snapshot(self, session: Session, model_id: str, seq: int | None, body_hash: str, encode: Encoder) -> Future:
        """SaveForSampler into memory: in the model's seq order, a CPU copy of its adapter; the result is a
        ``SnapshotSource`` for ``sample(snapshot=...)`` (the surface's encoder keeps it)."""
        state = self.engine.model(session, model_id)

        def units(handle, seq_id):
            def snap():
                taken = self.backend.snapshot(handle, with_optimizer=False)
                return SnapshotSource(f"{model_id}@seq{seq_id}", state.base_name, f"{model_id}@seq{seq_id}", taken)

            return single_unit(snap)

        return self.engine.submit(session, model_id, seq, body_hash, "save_weights_for_sampler", units, encode)
    def _read_checkpoint(self, session: Session, path: Any, *, with_optimizer: bool):
        cp = parse_path(path)
        info = self.state.run_info(cp.run_id)
        if info is None:
            raise ServiceError("checkpoint_not_found", f"no checkpoint at {cp.uri}", detail={"path": cp.uri})
        if self.settings.api_keys and info.get("owner") != session.owner:
            raise ServiceError("checkpoint_not_found", f"no checkpoint at {cp.uri}", detail={"path": cp.uri})
        files, meta = self.state.read(cp)
        snap = snapshots.from_files(files, with_optimizer=with_optimizer, path=cp.uri)
        return cp, info, snap, meta

    def read_snapshot(self, session: Session, path: Any) -> SnapshotSource:
        """A checkpoint (``weights`` or ``sampler_weights``) read and verified once, to sample from."""
        cp, info, snap, meta = self._read_checkpoint(session, path, with_optimizer=False)
        key = f"{cp.uri}@{meta['files'][snapshots.ADAPTER_WEIGHTS]}"  # a rewritten checkpoint gets a new key
        return SnapshotSource(cp.uri, info["base_model"], key, snap)

    def checkpoint_run(self, session: Session, path: Any) -> dict[str, Any]:
        """The run record (base model, LoRA settings) of an existing checkpoint of this caller."""
        return self._read_checkpoint(session, path, with_optimizer=False)[1]

    def load_new(self, session: Session, path: Any, model_id: str, *, optimizer: bool, encode: Encoder,
                 user_metadata: Mapping[str, Any] | None = None) -> Future:
        """Create a model from a checkpoint (create-via-load): the model's seq 0; its next seq is 1."""
        cp, info, snap, _ = self._read_checkpoint(session, path, with_optimizer=optimizer)
        lora = info.get("lora", {})
        spec = LoraSpec.make(int(snap.config.get("r", lora.get("rank", 16))), lora.get("seed", 0),
                             lora.get("train_attn", True), lora.get("train_mlp", True), lora.get("train_unembed", True))
        base = info["base_model"]
        base_info = self.engine.base_info(base)
        return self.engine.create_model(
            session, model_id, base, spec, encode, user_metadata=dict(user_metadata or {}),
            make=lambda: self.backend.load_new(model_id, base_info, spec, snap, with_optimizer=optimizer, path=cp.uri))

    def load_into(self, session: Session, model_id: str, seq: int | None, body_hash: str, path: Any, *,
                  optimizer: bool, encode: Encoder) -> Future:
        cp, _, snap, _ = self._read_checkpoint(session, path, with_optimizer=optimizer)

        def units(handle, _seq):
            def load():
                self.backend.load_into(handle, snap, with_optimizer=optimizer, path=cp.uri)
                return {"model_id": model_id, "path": cp.uri}

            return single_unit(load)

        return self.engine.submit(session, model_id, seq, body_hash, "load_state", units, encode)

    # ---- sampling -----------------------------------------------------------------------------------------------
    def sample(self, session: Session, *, model_id: str | None, model_path: Any, base_model: str | None,
               seq: int | None, body_hash: str, prompt: list[int], num_samples: int, params: SamplingParams,
               options: PromptOptions, encode: Encoder, snapshot: SnapshotSource | None = None,
               lane: str | None = None) -> Future:
        """Sample from a training model's current weights (in its seq order), a checkpoint, a snapshot held in
        memory (on the sampler lane ``lane``), or a base model."""
        if model_id is not None:
            def units(handle, _seq):
                return self.backend.sample(handle, prompt, num_samples, params, options)

            return self.engine.submit(session, model_id, seq, body_hash, "sample", units, encode)
        if snapshot is not None:
            info = self.engine.base_info(snapshot.base_model)
            target = (info, snapshot.key, snapshot.snapshot, snapshot.label)
            box: dict[str, Future] = {}

            def held_units():
                fut = box.get("future")
                if fut is not None and fut.done:  # cancelled before it started
                    return None
                return (yield from self.backend.sample(target, prompt, num_samples, params, options))

            box["future"] = self.engine.submit_sampler(session, lane or snapshot.key, "sample", held_units, encode)
            return box["future"]
        if model_path is not None:
            cp = parse_path(model_path)
            _, info, snap, meta = self._read_checkpoint(session, cp.uri, with_optimizer=False)
            base_info = self.engine.base_info(info["base_model"])
            key = f"{cp.uri}@{meta['files'][snapshots.ADAPTER_WEIGHTS]}"  # a rewritten checkpoint gets a new key

            def snapshot_units():
                return self.backend.sample((base_info, key, snap, cp.uri), prompt, num_samples, params, options)

            return self.engine.submit_sampler(session, cp.uri, "sample", snapshot_units, encode)
        info = self.engine.base_info(base_model or self.settings.default_base_model)

        def base_units():
            return self.backend.sample(info, prompt, num_samples, params, options)

        return self.engine.submit_sampler(session, f"base:{info.name}", "sample", base_units, encode)

    def sampler_info(self, session: Session, *, model_id: str | None, model_path: Any, base_model: str | None):
        """The BaseInfo a sample request will use (tokenizer, vocabulary and context, for validation)."""
        if model_id is not None:
            return self.engine.model(session, model_id).info
        if model_path is not None:
            cp = parse_path(model_path)
            info = self.state.run_info(cp.run_id)
            if info is None:
                raise ServiceError("checkpoint_not_found", f"no checkpoint at {cp.uri}", detail={"path": cp.uri})
            return self.engine.base_info(info["base_model"])
        return self.engine.base_info(base_model or self.settings.default_base_model)
