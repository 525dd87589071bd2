"""The device backend: base models, one peft adapter and one AdamW per training model, losses, sampling.

Everything here runs on the device worker thread (``worker.py``): it owns every model, adapter, optimizer and
device call, so ``set_adapter``, optimizer steps and sampling never race. Work that takes more than one fairness
unit is a generator: each ``next()`` runs one unit and the ``StopIteration`` value is the result.

Failure semantics: before a forward_backward the adapter's ``.grad`` tensors are copied (cheap for LoRA) and
restored on any exception, also when the request is abandoned between units, so a failed request leaves the model
exactly as it was. On CUDA OOM the cache is emptied as well and the request fails with ``device_oom``.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import logging
import math
import warnings
from collections.abc import Generator, Mapping
from typing import Any

import torch

from losskit import kernels
from losskit.contract import LossFnOutput
from losskit.service import lora, optim, snapshots
from losskit.service.batch import Batch
from losskit.service.custom_loss import TINKER_KIND, NativeResult
from losskit.service.errors import ServiceError
from losskit.service.loss_graph import ELEMENT_FACTOR
from losskit.service.loss_registry import ResolvedLoss
from losskit.service.models import BaseInfo, ModelRegistry, load_base_info
from losskit.service.sampling import PromptOptions, SamplingParams, sample_units
from losskit.service.settings import ServeSettings

log = logging.getLogger("losskit.serve")

MAX_OUTPUT_BYTES = 16 << 20
SAMPLER_CACHE = 8
Units = Generator[None, None, Any]


@dataclasses.dataclass
class BaseModel:
    """One loaded base model (frozen) and the ``PeftModel`` holding every adapter on it."""

    info: BaseInfo
    hf: torch.nn.Module
    peft: Any = None
    active: str | None = None
    cache_kwarg: str = "past_key_values"
    samplers: collections.OrderedDict = dataclasses.field(default_factory=collections.OrderedDict)


@dataclasses.dataclass
class TrainingModel:
    """One training model: a named adapter on a base model, its parameters and its own AdamW."""

    key: str
    adapter: str
    base: BaseModel
    lora: lora.LoraSpec
    params: list[torch.nn.Parameter]
    param_keys: list[str]
    optimizer: torch.optim.AdamW
    last_adam: optim.AdamParams | None = None


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ServiceError("validation_error", f"--device {name}: CUDA is not available on this machine")
    return device


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def micro_batches(lengths: tuple[int, ...], budget: int) -> list[list[int]]:
    """Consecutive row groups whose padded size (rows x longest row) stays within ``budget`` tokens (a row longer
    than the budget is a group of its own)."""
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        if current and (len(current) + 1) * max(longest, n) > budget:
            groups.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        groups.append(current)
    return groups


def _floats(diagnostics: Mapping[str, Any]) -> dict[str, float | None]:
    """Diagnostics as Python floats in one host sync (non-finite values become None)."""
    names = [k for k, v in diagnostics.items() if isinstance(v, torch.Tensor)]
    values = torch.stack([diagnostics[k].detach().float().reshape(()).cpu() for k in names]).tolist() if names else []
    out: dict[str, float | None] = dict(zip(names, values))
    for k, v in diagnostics.items():
        if not isinstance(v, torch.Tensor):
            out[k] = v
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in out.items()}


class Backend:
    """The models of one device. Not thread-safe by design: only the device worker calls it."""

    def __init__(self, settings: ServeSettings, models: ModelRegistry) -> None:
        self.settings = settings
        self.models = models
        self.device = _resolve_device(settings.device)
        self.dtype = _resolve_dtype(settings.dtype, self.device)
        self.bases: dict[str, BaseModel] = {}
        self._adapter_counter = 0
        self.unit_log: collections.deque = collections.deque(maxlen=4096)

    # ---- models -------------------------------------------------------------------------------------------------
    def base(self, info: BaseInfo) -> BaseModel:
        if info.name not in self.bases:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(info.path, local_files_only=True, trust_remote_code=False,
                                                      dtype=self.dtype)
            hf.to(self.device).eval().requires_grad_(False)
            params = inspect.signature(hf.forward).parameters
            kwarg = "cache" if "cache" in params else "past_key_values"
            self.bases[info.name] = BaseModel(info=info, hf=hf, cache_kwarg=kwarg)
            log.info("loaded base model %s from %s on %s (%s)", info.name, info.path, self.device, self.dtype)
        return self.bases[info.name]

    def _new_adapter_name(self, prefix: str = "adapter") -> str:
        self._adapter_counter += 1
        return f"{prefix}{self._adapter_counter}"

    def _activate(self, base: BaseModel, adapter: str) -> None:
        if base.active != adapter:
            base.peft.set_adapter(adapter)
            base.active = adapter

    def _register(self, key: str, base: BaseModel, spec: lora.LoraSpec, adapter: str) -> TrainingModel:
        named = lora.adapter_parameters(base.peft, adapter)
        params = list(named.values())
        for p in params:
            p.requires_grad_(True)
        keys = [n.replace(f".{adapter}.", ".") for n in named]
        return TrainingModel(key, adapter, base, spec, params, keys, optim.make_optimizer(params))

    def create(self, key: str, info: BaseInfo, spec: lora.LoraSpec) -> TrainingModel:
        """A new adapter (initialised from ``spec.seed``) with its own AdamW."""
        base = self.base(info)
        adapter = self._new_adapter_name()
        config = lora.lora_config(base.hf, spec)
        base.peft = lora.add_adapter(base.peft, base.hf, adapter, config, spec.seed)
        base.active = None
        self._activate(base, adapter)
        return self._register(key, base, spec, adapter)

    @staticmethod
    def _delete_adapter(base: BaseModel, adapter: str) -> None:
        with warnings.catch_warnings():
            # peft warns when the active adapter goes; the next unit activates its own adapter anyway
            warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
            base.peft.delete_adapter(adapter)
        base.active = None

    def delete(self, model: TrainingModel) -> None:
        self._delete_adapter(model.base, model.adapter)
        model.params.clear()

    def debug_gradients(self, model: TrainingModel) -> dict[str, torch.Tensor | None]:
        """Copies of the accumulated adapter gradients (a test hook, never an HTTP route)."""
        return {k: (p.grad.detach().clone() if p.grad is not None else None)
                for k, p in zip(model.param_keys, model.params)}

    def adapter_state(self, model: TrainingModel) -> dict[str, torch.Tensor]:
        """Copies of the adapter parameters, keyed as peft saves them."""
        return {k: p.detach().clone() for k, p in zip(model.param_keys, model.params)}

    # ---- training -----------------------------------------------------------------------------------------------
    def _logits(self, model: TrainingModel, input_ids: torch.Tensor) -> torch.Tensor:
        self._activate(model.base, model.adapter)
        return model.base.peft(input_ids=input_ids.to(self.device)).logits.float()

    def forward_backward(self, model: TrainingModel, loss: ResolvedLoss, batch: Batch, *, forward_only: bool) -> Units:
        """Units of one forward_backward (or forward, under no_grad); the result is the native reply body."""
        saved = None if forward_only else [p.grad.detach().clone() if p.grad is not None else None
                                           for p in model.params]
        try:
            if loss.builtin is not None and loss.builtin.kind == "token":
                result = yield from self._token_loss(model, loss, batch, forward_only)
            elif loss.custom is not None and loss.custom.program is not None \
                    and loss.custom.program.kind == TINKER_KIND:
                result = yield from self._per_datum_loss(model, loss, batch, forward_only)
            else:
                result = yield from self._whole_batch(model, loss, batch, forward_only)
            return result
        except BaseException as exc:
            if saved is not None:
                for p, g in zip(model.params, saved):
                    p.grad = g
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
                raise ServiceError("device_oom", "the device ran out of memory; send a smaller batch (fewer rows or "
                                   "shorter rows) or lower --max-tokens-per-step", category="server") from None
            raise

    def _check_finite(self, loss: torch.Tensor, name: str) -> None:
        if not bool(torch.isfinite(loss.detach())):
            raise ServiceError("loss_not_finite", f"loss {name!r} is {float(loss.detach())} (not finite); nothing was "
                               "accumulated")

    def _token_loss(self, model: TrainingModel, loss: ResolvedLoss, batch: Batch, forward_only: bool) -> Units:
        b = loss.builtin
        tt_all = batch.inputs["target_tokens"].to(self.device)
        rows_lp: list[torch.Tensor | None] = [None] * len(batch.lengths)
        rank2 = tt_all.dim() == 3
        for group in micro_batches(batch.lengths, self.settings.max_tokens_per_step):
            T = max(batch.lengths[i] for i in group)
            idx = torch.tensor(group)
            with torch.set_grad_enabled(not forward_only):
                logits = self._logits(model, batch.input_ids[idx, :T])
                tt = tt_all[idx, :T]
                lp = self._target_logprobs(logits, tt)
                mask = batch.attention_mask[idx, :T].to(self.device).bool()
                if rank2:
                    mask = mask[..., None].expand(lp.shape)
                args, config = self._token_args(b, loss.config, batch, idx, T, lp)
                out: LossFnOutput = b.fn(lp, *args, mask=mask, **config)
                if not forward_only:
                    self._check_finite(out.loss, b.name)
                    out.loss.backward()
            for j, i in enumerate(group):
                rows_lp[i] = lp[j, : batch.lengths[i]].detach()
            self.unit_log.append(("forward_backward", model.key, len(group) * T))
            yield
        # Metrics of the whole request from the per-token values (sums and means over all rows, exact).
        flat_lp = torch.cat(rows_lp)
        flat_args, flat_config = self._token_args(b, loss.config, batch, None, None, flat_lp)
        with torch.no_grad():
            diagnostics = _floats(b.fn(flat_lp, *flat_args, **flat_config).diagnostics)
        outputs = [{"logprobs": lp.float().cpu()} for lp in rows_lp]  # tensors: the surface encodes them
        return {"loss": diagnostics["loss:sum"], "metrics": diagnostics, "loss_fn_outputs": outputs,
                "num_tokens": batch.num_tokens}

    def _target_logprobs(self, logits: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        """``lp`` of ``target_tokens``: ``[B, T]`` for ``[B, T]`` targets, ``[B, T, K]`` for ``[B, T, K]`` ones."""
        if tt.dim() == 3:
            return torch.log_softmax(logits, dim=-1).gather(-1, tt)
        return -kernels.token_stats(logits, tt, ignore_index=None).nll

    def _per_datum_loss(self, model: TrainingModel, loss: ResolvedLoss, batch: Batch, forward_only: bool) -> Units:
        """A Tinker custom loss (a ``tinker/1`` program): run once per datum on that datum's differentiable ``lp``
        (shaped like its ``target_tokens``) and its declared inputs; the losses are summed, with one backward per
        micro-batch. ``:sum`` metrics are summed and ``:mean`` metrics averaged over the datums; the reply adds
        ``loss:sum`` and each datum's logprobs."""
        program = loss.custom.program
        tt_all = batch.inputs["target_tokens"].to(self.device)
        rows_lp: list[torch.Tensor | None] = [None] * len(batch.lengths)
        totals: list[torch.Tensor] = []
        metric_sums: dict[str, torch.Tensor] = {}
        for group in micro_batches(batch.lengths, self.settings.max_tokens_per_step):
            T = max(batch.lengths[i] for i in group)
            idx = torch.tensor(group)
            with torch.set_grad_enabled(not forward_only):
                logits = self._logits(model, batch.input_ids[idx, :T])
                lp = self._target_logprobs(logits, tt_all[idx, :T])
                group_loss = None
                for j, i in enumerate(group):
                    n = batch.lengths[i]
                    inputs = {k: v.to(self.device) for k, v in batch.datum_inputs[i].items()}
                    value, metrics = program.run_datum(
                        lp[j, :n], inputs, max_elements=ELEMENT_FACTOR * n * logits.shape[-1],
                        time_limit_s=self.settings.loss_time_limit_s)
                    group_loss = value if group_loss is None else group_loss + value
                    for key, m in metrics.items():
                        metric_sums[key] = metric_sums[key] + m if key in metric_sums else m
                if not forward_only:
                    self._check_finite(group_loss, loss.name)
                    group_loss.backward()
            totals.append(group_loss.detach())
            for j, i in enumerate(group):
                rows_lp[i] = lp[j, : batch.lengths[i]].detach()
            self.unit_log.append(("forward_backward", model.key, len(group) * T))
            yield
        count = len(batch.lengths)
        diagnostics = {"loss:sum": torch.stack(totals).sum()}
        for key, total in metric_sums.items():
            diagnostics[key] = total / count if key.endswith(":mean") else total
        metrics = _floats(diagnostics)
        return {"loss": metrics["loss:sum"], "metrics": metrics,
                "loss_fn_outputs": [{"logprobs": lp.float().cpu()} for lp in rows_lp], "num_tokens": batch.num_tokens}

    def _token_args(self, b, config: Mapping[str, Any], batch: Batch, idx, T, lp):
        """Positional inputs and config for rows ``idx`` (padded to ``T``), or all rows flattened when idx is None."""

        def take(name: str) -> torch.Tensor:
            t = batch.inputs[name]
            if idx is None:
                return torch.cat([t[i, :n] for i, n in enumerate(batch.lengths)]).to(self.device)
            return t[idx, :T].to(self.device)

        args = []
        for _, wire, required in b.inputs:
            if wire in batch.inputs:
                args.append(take(wire).to(lp.dtype))
            elif required:  # checked at submit; kept for a clear message if reached
                raise ServiceError("loss_input_missing", f"loss {b.name!r} needs loss_fn_inputs[{wire!r}]")
            else:
                break
        config = dict(config)
        for key, _ in b.config:
            if key in batch.inputs:  # per-token override (e.g. clip thresholds)
                config[key] = take(key).to(lp.dtype)
        return args, config

    def _whole_batch(self, model: TrainingModel, loss: ResolvedLoss, batch: Batch, forward_only: bool) -> Units:
        B, T = batch.input_ids.shape
        with torch.set_grad_enabled(not forward_only):
            logits = self._logits(model, batch.input_ids)
            mask = batch.attention_mask.to(self.device)
            inputs = {k: v.to(self.device) for k, v in batch.inputs.items()}
            if loss.builtin is not None:
                tt = inputs["target_tokens"]
                if tt.dim() != 2:
                    raise ServiceError("shape_mismatch", f"loss {loss.name!r} needs target_tokens of shape [B, T]")
                weights = inputs.get("weights", torch.ones_like(mask))
                target = torch.where((mask > 0) & (weights > 0), tt, torch.full_like(tt, -100))
                out = loss.builtin.fn(logits, target, **loss.config)
                lp = -kernels.token_stats(logits.detach(), tt, ignore_index=None).nll
                result = NativeResult(out.loss, lp, dict(out.diagnostics))
            elif loss.custom.program is not None:
                result = loss.custom.program.run_native(logits, inputs, mask, loss.config,
                                                        time_limit_s=self.settings.loss_time_limit_s)
            else:
                result = self._run_pickled(loss, logits, inputs, mask)
            if not forward_only:
                self._check_finite(result.loss, loss.name)
                result.loss.backward()
        self.unit_log.append(("forward_backward", model.key, B * T))
        yield
        diagnostics = _floats(result.diagnostics)
        loss_value = float(result.loss.detach())
        metrics = dict(diagnostics)
        metrics["loss"] = loss_value
        return {"loss": loss_value, "metrics": metrics, "loss_fn_outputs": self._row_outputs(result.logprobs, batch),
                "num_tokens": batch.num_tokens}

    def _run_pickled(self, loss: ResolvedLoss, logits, inputs, mask) -> NativeResult:
        try:
            out = loss.custom.function(logits, inputs, mask, **loss.config)
        except Exception as exc:  # noqa: BLE001 - user code: any failure is the user's loss failing
            raise ServiceError("loss_runtime_error", f"custom loss {loss.name!r} raised {type(exc).__name__}: {exc}") \
                from None
        if isinstance(out, LossFnOutput):
            loss_t, lp, diag = out.loss, out.logprobs, dict(out.diagnostics)
        elif isinstance(out, tuple) and len(out) == 3:
            loss_t, lp, diag = out[0], out[1], dict(out[2] or {})
        else:
            raise ServiceError("invalid_loss_output", f"custom loss {loss.name!r} must return a LossFnOutput")
        if not isinstance(loss_t, torch.Tensor) or loss_t.numel() != 1:
            raise ServiceError("invalid_loss_output", f"custom loss {loss.name!r} must return a scalar tensor loss")
        clean = {}
        for k, v in diag.items():
            if isinstance(v, torch.Tensor):
                if v.numel() != 1:
                    raise ServiceError("diagnostic_not_scalar", f"custom loss {loss.name!r}: diagnostic {k!r} has "
                                       f"{v.numel()} elements")
                clean[k] = v.detach()
            elif isinstance(v, (int, float, bool)) or v is None:
                clean[k] = v
            else:
                raise ServiceError("diagnostic_not_scalar", f"custom loss {loss.name!r}: diagnostic {k!r} is a "
                                   f"{type(v).__name__}")
        return NativeResult(loss_t.reshape(()), lp if isinstance(lp, torch.Tensor) else None, clean)

    def _row_outputs(self, logprobs: torch.Tensor | None, batch: Batch) -> list[dict[str, Any]] | dict[str, Any]:
        """Per-row logprobs (CPU tensors) trimmed to each row's length when they are ``[B, T, ...]``."""
        B, T = batch.input_ids.shape
        if logprobs is None:
            return [{"logprobs": None} for _ in range(B)]
        if logprobs.numel() * 4 > MAX_OUTPUT_BYTES:
            raise ServiceError("output_too_large", f"the loss's logprobs have {logprobs.numel()} elements, above the "
                               f"{MAX_OUTPUT_BYTES >> 20} MiB reply limit")
        lp = logprobs.detach().float().cpu()
        if lp.dim() >= 1 and lp.shape[0] == B:
            if lp.dim() >= 2 and lp.shape[1] == T:
                return [{"logprobs": lp[i, :n]} for i, n in enumerate(batch.lengths)]
            return [{"logprobs": lp[i]} for i in range(B)]
        return {"logprobs": lp}

    def optim_step(self, model: TrainingModel, adam: optim.AdamParams) -> dict[str, float]:
        metrics = optim.optimizer_step(model.optimizer, model.params, adam)
        model.last_adam = adam
        self.unit_log.append(("optim_step", model.key, 0))
        return metrics

    # ---- snapshots and loading ----------------------------------------------------------------------------------
    def snapshot(self, model: TrainingModel, *, with_optimizer: bool) -> snapshots.AdapterSnapshot:
        """CPU copies of the adapter (and its AdamW state): the device part of a save."""
        weights = {k: p.detach().to("cpu", copy=True).contiguous() for k, p in zip(model.param_keys, model.params)}
        config = snapshots.config_dict(model.base.peft.peft_config[model.adapter])
        config["base_model_name_or_path"] = model.base.info.name
        if not with_optimizer:
            return snapshots.AdapterSnapshot(weights=weights, config=config)
        state = model.optimizer.state
        opt, steps = {}, set()
        for k, p in zip(model.param_keys, model.params):
            s = state.get(p)
            if not s:
                continue
            opt[k] = {"exp_avg": s["exp_avg"].detach().to("cpu", copy=True),
                      "exp_avg_sq": s["exp_avg_sq"].detach().to("cpu", copy=True)}
            steps.add(int(s["step"]))
        adam = dataclasses.asdict(model.last_adam) if model.last_adam else None
        return snapshots.AdapterSnapshot(weights=weights, config=config, optimizer=opt,
                                         optimizer_step=max(steps) if steps else 0, adam=adam)

    def _lora_config(self, snap: snapshots.AdapterSnapshot, path: str):
        from peft import LoraConfig

        cfg = dict(snap.config)
        if cfg.get("peft_type") not in ("LORA", None):
            raise ServiceError("checkpoint_corrupted", f"checkpoint {path} is not a LoRA adapter")
        fields = {f.name for f in dataclasses.fields(LoraConfig)}
        # base_model_name_or_path is the run's base model, already resolved; peft would warn about renaming it
        cfg = {k: v for k, v in cfg.items()
               if k in fields and k not in ("peft_type", "auto_mapping", "base_model_name_or_path")}
        cfg["lora_dropout"] = 0.0
        return LoraConfig(**cfg)

    def _load_weights(self, model: TrainingModel, snap: snapshots.AdapterSnapshot, path: str) -> None:
        by_key = dict(zip(model.param_keys, model.params))
        if set(by_key) != set(snap.weights):
            raise ServiceError("checkpoint_corrupted", f"checkpoint {path} does not match the adapter layout "
                               f"({len(snap.weights)} tensors, expected {len(by_key)})")
        with torch.no_grad():
            for k, p in by_key.items():
                t = snap.weights[k]
                if t.shape != p.shape:
                    raise ServiceError("checkpoint_corrupted", f"checkpoint {path}: tensor {k} has shape "
                                       f"{tuple(t.shape)}, expected {tuple(p.shape)}")
                p.copy_(t.to(p.device, p.dtype))

    def _load_optimizer(self, model: TrainingModel, snap: snapshots.AdapterSnapshot) -> None:
        groups = model.optimizer.state_dict()["param_groups"]
        state = {}
        for i, k in enumerate(model.param_keys):
            if k in snap.optimizer:
                s = snap.optimizer[k]
                state[i] = {"step": torch.tensor(float(snap.optimizer_step)), "exp_avg": s["exp_avg"].clone(),
                            "exp_avg_sq": s["exp_avg_sq"].clone()}
        model.optimizer.load_state_dict({"state": state, "param_groups": groups})
        if snap.adam:
            model.last_adam = optim.AdamParams(**snap.adam)

    def load_new(self, key: str, info: BaseInfo, spec: lora.LoraSpec, snap: snapshots.AdapterSnapshot,
                 *, with_optimizer: bool, path: str) -> TrainingModel:
        """A new training model from a checkpoint (create-via-load)."""
        base = self.base(info)
        adapter = self._new_adapter_name()
        base.peft = lora.add_adapter(base.peft, base.hf, adapter, self._lora_config(snap, path), spec.seed)
        base.active = None
        self._activate(base, adapter)
        model = self._register(key, base, spec, adapter)
        try:
            self._load_weights(model, snap, path)
            if with_optimizer:
                self._load_optimizer(model, snap)
        except BaseException:
            self.delete(model)
            raise
        return model

    def load_into(self, model: TrainingModel, snap: snapshots.AdapterSnapshot, *, with_optimizer: bool,
                  path: str) -> None:
        """Replace an existing model's weights (and optimizer state) by a checkpoint's; gradients are dropped."""
        before = self.adapter_state(model)
        try:
            self._load_weights(model, snap, path)
            if with_optimizer:
                self._load_optimizer(model, snap)
            else:
                model.optimizer = optim.make_optimizer(model.params)
        except BaseException:
            with torch.no_grad():
                for k, p in zip(model.param_keys, model.params):
                    p.copy_(before[k])
            raise
        for p in model.params:
            p.grad = None

    # ---- sampling -------------------------------------------------------------------------------------------------
    def _sampler_adapter(self, info: BaseInfo, key: str, snap: snapshots.AdapterSnapshot, path: str) -> str:
        """A frozen adapter for a sampler snapshot (LRU of ``SAMPLER_CACHE`` per base model)."""
        base = self.base(info)
        if key in base.samplers:
            base.samplers.move_to_end(key)
            return base.samplers[key]
        adapter = self._new_adapter_name("sampler")
        base.peft = lora.add_adapter(base.peft, base.hf, adapter, self._lora_config(snap, path), 0)
        base.active = None
        named = lora.adapter_parameters(base.peft, adapter)
        with torch.no_grad():
            for n, p in named.items():
                k = n.replace(f".{adapter}.", ".")
                if k not in snap.weights:
                    self._delete_adapter(base, adapter)
                    raise ServiceError("checkpoint_corrupted", f"checkpoint {path} lacks tensor {k}")
                p.copy_(snap.weights[k].to(p.device, p.dtype))
                p.requires_grad_(False)
        base.samplers[key] = adapter
        while len(base.samplers) > SAMPLER_CACHE:
            _, old = base.samplers.popitem(last=False)
            self._delete_adapter(base, old)
        return adapter

    def sample(self, target: TrainingModel | tuple[BaseInfo, str, snapshots.AdapterSnapshot, str] | BaseInfo,
               prompt: list[int], num_samples: int, params: SamplingParams, options: PromptOptions) -> Units:
        """Units of one sample request from a training model's live adapter, a snapshot, or the bare base model."""
        if isinstance(target, TrainingModel):
            base, adapter, key = target.base, target.adapter, target.key
        elif isinstance(target, tuple):
            info, key, snap, path = target
            base = self.base(info)
            adapter = self._sampler_adapter(info, key, snap, path)
        else:
            base, adapter, key = self.base(target), None, target.name

        def forward(ids: torch.Tensor, cache):
            kwargs = {"input_ids": ids.to(self.device), "use_cache": True}
            if cache is not None:
                kwargs[base.cache_kwarg] = cache
            if adapter is None:
                if base.peft is None:
                    out = base.hf(**kwargs)
                else:
                    with base.peft.disable_adapter():
                        out = base.peft(**kwargs)
            else:
                self._activate(base, adapter)
                out = base.peft(**kwargs)
            new_cache = out.get("cache") if "cache" in out else out.get("past_key_values")
            self.unit_log.append(("sample", key, int(ids.numel())))
            return out.logits.float(), new_cache

        tok = base.info.tokenizer
        return (yield from sample_units(forward, prompt, num_samples, params,
                                        decode=lambda ids: tok.decode(ids, skip_special_tokens=False),
                                        decode_slice=self.settings.decode_slice, device=self.device, options=options))

    def warm_up(self, info: BaseInfo) -> None:
        """One forward and backward through the base model and the loss kernels on a tiny batch, so that the first
        request does not pay one-time set-up costs (kernel initialisation, the kernels' native build)."""
        base = self.base(info)
        x = torch.zeros(2, 8, dtype=torch.long, device=self.device)
        emb = base.hf.get_input_embeddings()(x).detach().requires_grad_(True)
        with torch.no_grad():
            base.hf(input_ids=x)
        logits = base.hf(inputs_embeds=emb).logits.float()
        # The kernels build their native CPU code on first use: do it here, before the port opens.
        (-kernels.token_stats(logits, x, ignore_index=None).nll).sum().backward()

def load_info(models: ModelRegistry, name: str) -> BaseInfo:
    """Resolve and describe a base model (tokenizer and config only; the weights load on the device worker)."""
    return load_base_info(models.resolve(name))
