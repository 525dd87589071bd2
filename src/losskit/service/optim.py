"""One ``torch.optim.AdamW`` per training model, with the Tinker ``AdamParams`` semantics.

Defaults: ``learning_rate`` 1e-4, ``beta1`` 0.9, ``beta2`` 0.95, ``eps`` 1e-12, decoupled ``weight_decay`` 0.0 and
``grad_clip_norm`` 0.0 (0 = off, otherwise clip the adapter's global norm). The values are set on the param group
before every step, so torch's own defaults (its AdamW decays by 0.01) never apply. Gradients accumulate until
``optim_step``, which sets them to None; a step without gradients is a no-op and does not advance Adam's step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from losskit.service.errors import ServiceError


@dataclasses.dataclass(frozen=True)
class AdamParams:
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    @staticmethod
    def from_mapping(values: Mapping[str, Any] | None) -> AdamParams:
        """Validate ``adam_params`` (unknown keys and out-of-range values are 400s naming the key)."""
        values = dict(values or {})
        fields = {f.name for f in dataclasses.fields(AdamParams)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ServiceError("validation_error", f"adam_params: unknown key {unknown[0]!r} (accepted: "
                               f"{', '.join(sorted(fields))})", detail={"argument": unknown[0]})
        checks = {
            "learning_rate": (lambda v: v >= 0, ">= 0"),
            "beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
            "beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
            "eps": (lambda v: v > 0, "> 0"),
            "weight_decay": (lambda v: v >= 0, ">= 0"),
            "grad_clip_norm": (lambda v: v >= 0, ">= 0 (0 = off)"),
        }
        out = {}
        for key, value in values.items():
            ok, rule = checks[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not ok(float(value)):
                raise ServiceError("validation_error", f"adam_params.{key} must be a finite number {rule}, got "
                                   f"{value!r}", detail={"argument": key})
            out[key] = float(value)
        return AdamParams(**out)


def make_optimizer(params: Sequence[torch.nn.Parameter]) -> torch.optim.AdamW:
    """The AdamW of one adapter (its values are replaced before every step)."""
    d = AdamParams()
    return torch.optim.AdamW(list(params), lr=d.learning_rate, betas=(d.beta1, d.beta2), eps=d.eps,
                             weight_decay=d.weight_decay)


def optimizer_step(optimizer: torch.optim.AdamW, params: Sequence[torch.nn.Parameter],
                   adam: AdamParams) -> dict[str, float]:
    """One AdamW step on the accumulated gradients; returns ``grad_norm`` (before clipping) and ``learning_rate``.

    Without gradients nothing happens (Adam's step count does not advance) and ``grad_norm`` is 0.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return {"grad_norm": 0.0, "learning_rate": adam.learning_rate}
    for group in optimizer.param_groups:
        group.update(lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps,
                     weight_decay=adam.weight_decay)
    if adam.grad_clip_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, adam.grad_clip_norm)
    else:
        norm = torch.nn.utils.get_total_norm(grads)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"grad_norm": float(norm), "learning_rate": adam.learning_rate}
