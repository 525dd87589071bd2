"""Adapter snapshots: the CPU copy of one adapter (and optionally its AdamW state) and its checkpoint files.

A snapshot is taken on the device worker (a copy of the LoRA tensors to CPU, cheap for LoRA) and written by an
I/O thread. The files are peft's format, so ``peft.PeftModel.from_pretrained(base, checkpoint_dir)`` loads them:
``adapter_model.safetensors`` (keys without the adapter name) and ``adapter_config.json``; with the optimizer,
``optimizer.safetensors`` (``<key>.exp_avg`` / ``<key>.exp_avg_sq``) and ``optimizer.json`` (step count and the
last hyperparameters).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import torch

from losskit.service.errors import ServiceError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
OPTIMIZER_WEIGHTS = "optimizer.safetensors"
OPTIMIZER_CONFIG = "optimizer.json"


@dataclasses.dataclass(frozen=True)
class AdapterSnapshot:
    """CPU tensors of one adapter, keyed as peft saves them, plus its config and (optionally) AdamW state.

    Attributes:
        weights: ``{peft key: tensor}`` (float32, CPU, contiguous).
        config: the peft ``LoraConfig`` as a JSON-able dict.
        optimizer: ``{peft key: {"exp_avg", "exp_avg_sq"}}`` or None.
        optimizer_step: Adam's step count (the same for every parameter), or None.
        adam: the hyperparameters of the last step, or None.
    """

    weights: Mapping[str, torch.Tensor]
    config: Mapping[str, Any]
    optimizer: Mapping[str, Mapping[str, torch.Tensor]] | None = None
    optimizer_step: int | None = None
    adam: Mapping[str, float] | None = None


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "value") and type(value).__module__.startswith("peft"):  # peft enums
        return value.value
    return value


def config_dict(peft_config) -> dict[str, Any]:
    """A peft config as plain JSON data."""
    return json.loads(json.dumps(_jsonable(peft_config.to_dict()), default=str))


def to_files(snap: AdapterSnapshot) -> dict[str, bytes]:
    from safetensors.torch import save

    files = {
        ADAPTER_WEIGHTS: save(dict(snap.weights)),
        ADAPTER_CONFIG: json.dumps(dict(snap.config), indent=2, sort_keys=True).encode(),
    }
    if snap.optimizer is not None:
        flat = {}
        for key, state in snap.optimizer.items():
            flat[f"{key}.exp_avg"] = state["exp_avg"]
            flat[f"{key}.exp_avg_sq"] = state["exp_avg_sq"]
        files[OPTIMIZER_WEIGHTS] = save(flat)
        files[OPTIMIZER_CONFIG] = json.dumps(
            {"step": snap.optimizer_step, "adam": dict(snap.adam or {}), "keys": sorted(snap.optimizer)},
            indent=2, sort_keys=True).encode()
    return files


def from_files(files: Mapping[str, bytes], *, with_optimizer: bool, path: str) -> AdapterSnapshot:
    """Parse checkpoint files (already hash-verified); ``checkpoint_corrupted`` when a part is missing or bad."""
    from safetensors.torch import load

    def bad(what: str) -> ServiceError:
        return ServiceError("checkpoint_corrupted", f"checkpoint {path}: {what}", detail={"path": path})

    if ADAPTER_WEIGHTS not in files or ADAPTER_CONFIG not in files:
        raise bad("adapter files are missing")
    try:
        weights = load(files[ADAPTER_WEIGHTS])
        config = json.loads(files[ADAPTER_CONFIG])
    except Exception:  # noqa: BLE001 - any parse failure of verified bytes means a bad checkpoint
        raise bad("adapter files cannot be parsed") from None
    if not with_optimizer:
        return AdapterSnapshot(weights=weights, config=config)
    if OPTIMIZER_WEIGHTS not in files or OPTIMIZER_CONFIG not in files:
        raise ServiceError("checkpoint_corrupted", f"checkpoint {path} has no optimizer state (it was saved "
                           "without it); load it with optimizer=false", detail={"path": path})
    try:
        flat = load(files[OPTIMIZER_WEIGHTS])
        info = json.loads(files[OPTIMIZER_CONFIG])
        optimizer = {k: {"exp_avg": flat[f"{k}.exp_avg"], "exp_avg_sq": flat[f"{k}.exp_avg_sq"]}
                     for k in info["keys"]}
    except Exception:  # noqa: BLE001 - as above
        raise bad("optimizer files cannot be parsed") from None
    return AdapterSnapshot(weights=weights, config=config, optimizer=optimizer, optimizer_step=info["step"],
                           adam=info.get("adam"))
