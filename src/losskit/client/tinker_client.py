"""``TinkerClient``: the seed's client for ``losskit serve`` (the native ``/v1`` API).

``TinkerClient(base_url="http://localhost:8000", api_key=None, timeout=60.0, max_retries=5)`` takes its key from
``api_key`` or ``$LOSSKIT_API_KEY`` and opens a session on first use. It numbers each model's calls itself (so a
retried call runs once), retries connection errors, 429 and 5xx with backoff, and no other 4xx. Every blocking
method has an ``_async`` twin returning a future (``.result(timeout)``, ``.done()``, ``.request_id``); queued
calls are submitted in call order and long-polled.

Seed compatibility: the seed's ``hf_backend`` is the client itself (``hf_backend = client``), and a
``forward_backward`` on a model name the session does not know creates that model on the server's default base
model. A ``loss_fn_inputs`` value of ``...`` (as written in the seed's examples) means "derive it": the key is
not sent, so the server derives ``target_tokens`` (and ``weights``) from the rows.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any, Self

from losskit.client.futures import ClientFuture, LocalFuture
from losskit.client.transport import RequestFailed, Transport

SESSION_HEADER = "X-Losskit-Session"
WAIT_S = 25.0
_SAMPLING_KEYS = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop")
_PROMPT_KEYS = ("prompt_logprobs", "prompt_logprobs_last_n", "topk_prompt_logprobs", "topk_sample_logprobs")


def _tensor_json(value: Any) -> Any:
    """A loss input as JSON: tensors and arrays as tensor JSON, everything else as it is."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        return value
    from losskit.service.tensors import encode_tensor

    if isinstance(value, torch.Tensor):
        return encode_tensor(value)
    if type(value).__module__ == "numpy" and hasattr(value, "shape"):
        return encode_tensor(torch.as_tensor(value))
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return [encode_tensor(v) for v in value]
    return value


def _decode_outputs(result: dict) -> dict:
    """Result tensors (sent as b64 tensor JSON) back to plain lists."""
    from losskit.service.tensors import decode_tensor, is_tensor_json

    def plain(value):
        return decode_tensor(value, "logprobs").tolist() if is_tensor_json(value) else value

    outputs = result.get("loss_fn_outputs")
    if isinstance(outputs, list):
        result["loss_fn_outputs"] = [{k: plain(v) for k, v in o.items()} for o in outputs]
    elif isinstance(outputs, dict):
        result["loss_fn_outputs"] = {k: plain(v) for k, v in outputs.items()}
    return result


def _row(row: Any) -> Any:
    if isinstance(row, str):
        return {"text": row}
    if hasattr(row, "tolist") and not isinstance(row, (list, dict)):
        return row.tolist()
    return row


def _rows(data: Any) -> list:
    if hasattr(data, "tolist") and not isinstance(data, list):  # a [B, T] tensor or array
        data = data.tolist()
    if isinstance(data, (str, dict)):
        data = [data]
    return [_row(r) for r in data]


class TinkerClient:
    """A client of one ``losskit serve`` server (one session)."""

    def __init__(self, base_url: str = "http://localhost:8000", api_key: str | None = None, timeout: float = 60.0,
                 max_retries: int = 5) -> None:
        self.base_url = base_url
        self.api_key = api_key if api_key is not None else os.environ.get("LOSSKIT_API_KEY")
        self._transport = Transport(base_url, self.api_key, timeout, max_retries)
        self._lock = threading.Lock()
        self._session_id: str | None = None
        self._next_seq: dict[str, int] = {}
        self._traced: dict[str, Any] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    # ---- plumbing ---------------------------------------------------------------------------------------------
    @property
    def session_id(self) -> str:
        with self._lock:
            if self._session_id is None:
                _, data = self._transport.request("POST", "/v1/sessions", body={"client": "losskit.client"})
                self._session_id = data["session_id"]
            return self._session_id

    def _call(self, method: str, path: str, body: Any = None, *, timeout: float | None = None) -> Any:
        _, data = self._transport.request(method, path, body=body, headers={SESSION_HEADER: self.session_id},
                                          timeout=timeout)
        return data

    def _seq(self, model_id: str) -> int:
        with self._lock:
            seq = self._next_seq.get(model_id, 1)
            self._next_seq[model_id] = seq + 1
            return seq

    def _poll(self, request_id: str, wait_s: float) -> dict:
        return self._call("POST", "/v1/retrieve_future", {"request_id": request_id, "timeout_s": wait_s},
                          timeout=wait_s + self._transport.timeout)

    def _submit(self, path: str, body: dict, *, wait: bool, transform: Callable[[Any], Any] = lambda r: r
                ) -> ClientFuture:
        if wait:
            body = {**body, "wait_s": WAIT_S}
        status, data = self._transport.request("POST", path, body=body, headers={SESSION_HEADER: self.session_id},
                                               timeout=(WAIT_S if wait else 0) + self._transport.timeout)
        if status == 200 and "status" in data:
            return ClientFuture(self._poll, data.get("request_id"), finished=data, transform=transform)
        return ClientFuture(self._poll, data["request_id"], transform=transform)

    def _local(self, fn: Callable[[], Any]) -> LocalFuture:
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="losskit-client")
        return LocalFuture(self._pool.submit(fn))

    def close(self) -> None:
        """Close the session on the server (its models, losses and futures are freed) and the connection."""
        with self._lock:
            sid, self._session_id = self._session_id, None
        if sid is not None:
            try:
                self._transport.request("DELETE", f"/v1/sessions/{sid}", headers={SESSION_HEADER: sid})
            except RequestFailed:
                pass
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        self._transport.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- server and losses ------------------------------------------------------------------------------------
    def info(self) -> dict:
        """The server's version, models, device, limits and policies (``GET /v1/info``)."""
        return self._call("GET", "/v1/info")

    def list_loss_functions(self) -> dict:
        """``{"available_loss_functions": [...], "descriptions": {...}, "builtin": [...], "custom": [...]}``."""
        return self._call("GET", "/v1/losses")

    def register_custom_loss(self, name: str, fn: Callable, *, mode: str = "graph",
                             description: str | None = None) -> dict:
        """Upload ``fn`` as the custom loss ``name`` of this session.

        ``mode="graph"`` (the default) traces it into an allowlisted torch.fx graph and checks it locally with the
        server's own rules before sending (errors appear here); ``mode="pickle"`` sends cloudpickle bytes, which the
        server accepts only with ``--allow-pickled-code`` and an API key.
        """
        if mode == "graph":
            from losskit.service.fx_trace import trace_native_loss

            traced = trace_native_loss(fn, name=name)
            body = {"name": name, "graph": traced.graph}
            self._traced[name] = traced
        elif mode == "pickle":
            import base64
            import sys

            try:
                import cloudpickle
            except ImportError:
                raise ImportError("mode='pickle' needs cloudpickle (pip install cloudpickle)") from None
            import torch

            body = {"name": name, "format": "cloudpickle",
                    "payload_b64": base64.b64encode(cloudpickle.dumps(fn)).decode("ascii"),
                    "python": f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}",
                    "torch": torch.__version__, "cloudpickle": cloudpickle.__version__}
        else:
            raise ValueError(f"mode must be 'graph' or 'pickle', got {mode!r}")
        if description is not None:
            body["description"] = description
        elif fn.__doc__:
            body["description"] = fn.__doc__.strip().splitlines()[0][:1024]
        return self._call("POST", "/v1/losses", body)

    def unregister_custom_loss(self, name: str) -> dict:
        return self._call("DELETE", f"/v1/losses/{name}")

    # ---- models -------------------------------------------------------------------------------------------------
    def create_model_async(self, model_id: str | None = None, base_model: str | None = None, rank: int = 16,
                           seed: int | None = None, train_mlp: bool = True, train_attn: bool = True,
                           train_unembed: bool = True, *, _wait: bool = False) -> ClientFuture:
        body = {"rank": rank, "train_mlp": train_mlp, "train_attn": train_attn, "train_unembed": train_unembed}
        for key, value in (("model_id", model_id), ("base_model", base_model), ("seed", seed)):
            if value is not None:
                body[key] = value

        def created(result):
            with self._lock:
                self._next_seq.setdefault(result["model_id"], 1)
            return result["model_id"]

        return self._submit("/v1/models", body, wait=_wait, transform=created)

    def create_model(self, model_id: str | None = None, base_model: str | None = None, rank: int = 16,
                     seed: int | None = None, train_mlp: bool = True, train_attn: bool = True,
                     train_unembed: bool = True) -> str:
        """Create a training model (a LoRA adapter with its own AdamW); returns its id."""
        return self.create_model_async(model_id, base_model, rank, seed, train_mlp, train_attn, train_unembed,
                                       _wait=True).result()

    def list_models(self) -> list[dict]:
        return self._call("GET", "/v1/models")["models"]

    def delete_model(self, model_id: str) -> dict:
        with self._lock:
            self._next_seq.pop(model_id, None)
        return self._call("DELETE", f"/v1/models/{model_id}")

    # ---- training -----------------------------------------------------------------------------------------------
    def _fb_body(self, model_id: str, data: Any, loss_fn: str, loss_fn_inputs: Mapping[str, Any] | None,
                 loss_fn_config: Mapping[str, Any] | None, hyperparameters: Mapping[str, Any]) -> dict:
        inputs = {k: _tensor_json(v) for k, v in (loss_fn_inputs or {}).items() if v is not Ellipsis}
        config = {**(loss_fn_config or {}), **hyperparameters}
        body: dict[str, Any] = {"model_id": model_id, "seq_id": self._seq(model_id), "data": _rows(data),
                                "loss_fn": loss_fn, "tensor_encoding": "b64"}
        if inputs:
            body["loss_fn_inputs"] = inputs
        if config:
            body["loss_fn_config"] = config
        return body

    def forward_backward_async(self, model_id: str, data: Any, loss_fn: str = "cross_entropy",
                               loss_fn_inputs: Mapping[str, Any] | None = None, *,
                               loss_fn_config: Mapping[str, Any] | None = None, _wait: bool = False,
                               **hyperparameters: Any) -> ClientFuture:
        body = self._fb_body(model_id, data, loss_fn, loss_fn_inputs, loss_fn_config, hyperparameters)
        return self._submit("/v1/forward_backward", body, wait=_wait, transform=_decode_outputs)

    def forward_backward(self, model_id: str, data: Any, loss_fn: str = "cross_entropy",
                         loss_fn_inputs: Mapping[str, Any] | None = None, *,
                         loss_fn_config: Mapping[str, Any] | None = None, **hyperparameters: Any) -> dict:
        """Forward and backward on ``data``; gradients accumulate until ``optim_step``.

        Returns ``{"loss", "metrics", "loss_fn_outputs": [{"logprobs"}, ...], "num_tokens", "model_id"}``. Extra
        keyword arguments are hyperparameters of the loss (merged into ``loss_fn_config``).
        """
        return self.forward_backward_async(model_id, data, loss_fn, loss_fn_inputs, loss_fn_config=loss_fn_config,
                                           _wait=True, **hyperparameters).result()

    def forward_async(self, model_id: str, data: Any, loss_fn: str = "cross_entropy",
                      loss_fn_inputs: Mapping[str, Any] | None = None, *, loss_fn_config: Mapping[str, Any] | None = None,
                      _wait: bool = False, **hyperparameters: Any) -> ClientFuture:
        body = self._fb_body(model_id, data, loss_fn, loss_fn_inputs, loss_fn_config, hyperparameters)
        return self._submit("/v1/forward", body, wait=_wait, transform=_decode_outputs)

    def forward(self, model_id: str, data: Any, loss_fn: str = "cross_entropy",
                loss_fn_inputs: Mapping[str, Any] | None = None, *, loss_fn_config: Mapping[str, Any] | None = None,
                **hyperparameters: Any) -> dict:
        """Forward only (no gradients): the same logprobs, loss and metrics as ``forward_backward``."""
        return self.forward_async(model_id, data, loss_fn, loss_fn_inputs, loss_fn_config=loss_fn_config,
                                  _wait=True, **hyperparameters).result()

    def optim_step_async(self, model_id: str, *, learning_rate: float = 1e-4, beta1: float = 0.9,
                         beta2: float = 0.95, eps: float = 1e-12, weight_decay: float = 0.0,
                         grad_clip_norm: float = 0.0, _wait: bool = False) -> ClientFuture:
        adam = {"learning_rate": learning_rate, "beta1": beta1, "beta2": beta2, "eps": eps,
                "weight_decay": weight_decay, "grad_clip_norm": grad_clip_norm}
        body = {"model_id": model_id, "seq_id": self._seq(model_id), "adam_params": adam}
        return self._submit("/v1/optim_step", body, wait=_wait)

    def optim_step(self, model_id: str, *, learning_rate: float = 1e-4, beta1: float = 0.9, beta2: float = 0.95,
                   eps: float = 1e-12, weight_decay: float = 0.0, grad_clip_norm: float = 0.0) -> dict:
        """One AdamW step (Tinker AdamParams defaults); returns ``{"metrics": {"grad_norm", "learning_rate"}}``."""
        return self.optim_step_async(model_id, learning_rate=learning_rate, beta1=beta1, beta2=beta2, eps=eps,
                                     weight_decay=weight_decay, grad_clip_norm=grad_clip_norm, _wait=True).result()

    # ---- sampling -----------------------------------------------------------------------------------------------
    def sample_async(self, model_id: str | None, prompt: Any, num_samples: int = 1, *, model_path: str | None = None,
                     base_model: str | None = None, _wait: bool = False, **sampling_params: Any) -> ClientFuture:
        prompt = prompt.tolist() if hasattr(prompt, "tolist") else prompt
        body: dict[str, Any] = {"prompt": prompt, "num_samples": num_samples}
        body["sampling_params"] = {k: v for k, v in sampling_params.items() if k not in _PROMPT_KEYS}
        body.update({k: v for k, v in sampling_params.items() if k in _PROMPT_KEYS})
        if model_id is not None:
            body["model_id"] = model_id
            body["seq_id"] = self._seq(model_id)
        if model_path is not None:
            body["model_path"] = model_path
        if base_model is not None:
            body["base_model"] = base_model
        return self._submit("/v1/sample", body, wait=_wait)

    def sample(self, model_id: str | None, prompt: Any, num_samples: int = 1, *, model_path: str | None = None,
               base_model: str | None = None, **sampling_params: Any) -> dict:
        """Sample completions of ``prompt`` (token ids or text) from a model's current weights, a sampler checkpoint
        (``model_path``) or a base model. Keyword arguments: ``max_tokens`` (required), ``temperature``,
        ``top_k``, ``top_p``, ``seed``, ``stop``, and ``prompt_logprobs``, ``prompt_logprobs_last_n``,
        ``topk_prompt_logprobs``, ``topk_sample_logprobs``."""
        return self.sample_async(model_id, prompt, num_samples, model_path=model_path, base_model=base_model,
                                 _wait=True, **sampling_params).result()

    # ---- checkpoints --------------------------------------------------------------------------------------------
    def save_state_async(self, model_id: str, name: str, *, overwrite: bool = False,
                         ttl_seconds: float | None = None, _wait: bool = False) -> ClientFuture:
        body = {"model_id": model_id, "seq_id": self._seq(model_id), "name": name, "overwrite": overwrite}
        if ttl_seconds is not None:
            body["ttl_seconds"] = ttl_seconds
        return self._submit("/v1/save_state", body, wait=_wait, transform=lambda r: r["path"])

    def save_state(self, model_id: str, name: str, *, overwrite: bool = False, ttl_seconds: float | None = None) -> str:
        """Save the adapter and optimizer state; returns the ``tinker://`` path."""
        return self.save_state_async(model_id, name, overwrite=overwrite, ttl_seconds=ttl_seconds, _wait=True).result()

    def save_weights_for_sampler_async(self, model_id: str, name: str, *, overwrite: bool = False,
                                       _wait: bool = False) -> ClientFuture:
        body = {"model_id": model_id, "seq_id": self._seq(model_id), "name": name, "overwrite": overwrite}
        return self._submit("/v1/save_weights_for_sampler", body, wait=_wait, transform=lambda r: r["path"])

    def save_weights_for_sampler(self, model_id: str, name: str, *, overwrite: bool = False) -> str:
        """Save the adapter for sampling (``sample(None, ..., model_path=path)``); returns the path."""
        return self.save_weights_for_sampler_async(model_id, name, overwrite=overwrite, _wait=True).result()

    def load_state_async(self, path: str, model_id: str | None = None, optimizer: bool = True, *,
                         _wait: bool = False) -> ClientFuture:
        body: dict[str, Any] = {"path": path, "optimizer": optimizer}
        existing = model_id is not None and model_id in self._next_seq
        if model_id is not None:
            body["model_id"] = model_id
        if existing:
            body["seq_id"] = self._seq(model_id)

        def loaded(result):
            with self._lock:
                self._next_seq.setdefault(result["model_id"], 1)
            return result["model_id"]

        return self._submit("/v1/load_state", body, wait=_wait, transform=loaded)

    def load_state(self, path: str, model_id: str | None = None, optimizer: bool = True) -> str:
        """Load a checkpoint into ``model_id`` (created when new) with or without its optimizer state."""
        return self.load_state_async(path, model_id, optimizer, _wait=True).result()

    # ---- async twins of the direct calls --------------------------------------------------------------------------
    def list_loss_functions_async(self) -> LocalFuture:
        return self._local(self.list_loss_functions)

    def register_custom_loss_async(self, name: str, fn: Callable, *, mode: str = "graph",
                                   description: str | None = None) -> LocalFuture:
        return self._local(lambda: self.register_custom_loss(name, fn, mode=mode, description=description))

    def unregister_custom_loss_async(self, name: str) -> LocalFuture:
        return self._local(lambda: self.unregister_custom_loss(name))
