"""``CombinedLoss``: a weighted sum of registry losses, built from seed 003's YAML ``criterion:`` list.

```yaml
criterion:
  - name: cross_entropy_loss
    weight: 1.0
    kwargs: {reduction: mean, ignore_index: -1}
  - name: energy_loss
    weight: 0.05
    kwargs: {reduction: mean, p: 1}
```

``total = Σ_i w_i · L_i`` in config order, with Python-float weights. Criteria whose
registry entry needs ``logits``/``target`` get them (plus ``mask`` and ``num_valid_timesteps``); hook-based
criteria (``EnergyLoss``) get nothing and record through ``recording(model)``. Names resolve through
``losskit.registry`` case-insensitively, ignoring ``_`` and ``-``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from losskit import registry
from losskit.contract import ConfigError
from losskit.losses import INPUT_CHECKS

__all__ = ["CombinedLoss", "CombinedLossOutput", "CriterionSpec"]

log = logging.getLogger(__name__)

_ENTRY_KEYS = ("name", "weight", "kwargs", "label")
_TENSOR_INPUTS = frozenset({"logits", "target"})


def _accepted(label: str, module: nn.Module, extras: Mapping[str, Any]) -> dict[str, Any]:
    """``extras`` (``mask``, ``num_valid_timesteps``) for a criterion whose ``forward`` takes them; a
    ``ConfigError`` naming the criterion and the argument where it cannot use one (never silently dropped)."""
    if not extras:
        return {}
    params = inspect.signature(module.forward).parameters
    missing = [k for k in extras if k not in params]
    if missing:
        raise ConfigError(
            f"criterion {label!r} ({type(module).__name__}) does not take {', '.join(missing)}; pass it only to "
            "criteria that use it, or drop that criterion"
        )
    return dict(extras)


@dataclasses.dataclass(frozen=True)
class CombinedLossOutput:
    """``CombinedLoss(..., return_components=True)``.

    Attributes:
        loss: the total ``Σ w_i · L_i`` (back-propagate this).
        components: per label, the unweighted ``L_i`` (graph-connected).
        weights: per label, ``w_i``.
    """

    loss: torch.Tensor
    components: dict[str, torch.Tensor]
    weights: dict[str, float]

    def metrics(self) -> dict[str, torch.Tensor]:
        """Detached device tensors: ``loss/<label>`` (unweighted), ``loss_weighted/<label>``, ``loss/total``.

        Unweighted under ``loss/`` because the seed logs "individual loss values" and its table's Energy column
        is raw.
        """
        out: dict[str, torch.Tensor] = {}
        for label, value in self.components.items():
            out[f"loss/{label}"] = value.detach()
        for label, value in self.components.items():
            out[f"loss_weighted/{label}"] = (self.weights[label] * value).detach()
        out["loss/total"] = self.loss.detach()
        return out


@dataclasses.dataclass(frozen=True)
class CriterionSpec:
    """One enabled criterion: its label, registry entry, weight and whether it takes ``(logits, target)``."""

    label: str
    entry: registry.LossSpec
    weight: float
    needs_inputs: bool


def _module_entries() -> dict[str, registry.LossSpec]:
    return {name: spec for name, spec in registry.REGISTRY.items() if spec.module is not None}


def _resolve(index: int, name: Any) -> registry.LossSpec:
    entries = _module_entries()
    if not isinstance(name, str) or not name:
        raise ConfigError(f"criterion[{index}].name must be a non-empty string, got {name!r}")
    by_key = {registry.canonical(n): spec for n, spec in entries.items()}
    spec = by_key.get(registry.canonical(name))
    if spec is None:
        raise ConfigError(
            f"criterion[{index}].name={name!r} is not a registered loss; valid: {', '.join(sorted(entries))}"
        )
    return spec


def _weight(index: int, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ConfigError(f"criterion[{index}].weight must be a finite real number >= 0, got {value!r}")
    if value < 0:
        raise ConfigError(f"criterion[{index}].weight must be >= 0 (0 disables the entry), got {value!r}")
    return float(value)


class CombinedLoss(nn.Module):
    """Weighted sum of losses (seed 003's criterion list). Build it with ``from_config``.

    Args:
        criteria: ``(CriterionSpec, module)`` pairs of the enabled criteria, in config order.
    """

    def __init__(self, criteria: Sequence[tuple[CriterionSpec, nn.Module]]) -> None:
        super().__init__()
        if not criteria:
            raise ConfigError("criterion must enable at least one loss with a weight > 0")
        self.specs: tuple[CriterionSpec, ...] = tuple(spec for spec, _ in criteria)
        self.criteria = nn.ModuleList([module for _, module in criteria])

    @classmethod
    def from_config(cls, cfg: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> CombinedLoss:
        """Build from a list of entries or a mapping holding one under ``criterion``.

        Entry keys: ``name`` (required; a registry entry with a module), ``weight`` (default 1.0; finite, >= 0;
        0 disables the entry: not constructed, not hooked, not logged), ``kwargs`` (default ``{}``, passed to the
        constructor; ``reduction: none`` is rejected, every criterion must give a scalar) and ``label`` (default
        ``name``; distinct labels let one loss appear twice). Anything else is a ``ConfigError``.
        """
        if isinstance(cfg, Mapping):
            if "criterion" not in cfg:
                raise ConfigError(f"criterion config must be a list or a mapping with key 'criterion', got keys "
                                  f"{sorted(cfg)}")
            cfg = cfg["criterion"]
        if isinstance(cfg, (str, bytes)) or not isinstance(cfg, Sequence):
            raise ConfigError(f"criterion must be a list of entries, got {type(cfg).__name__}")
        built: list[tuple[CriterionSpec, nn.Module]] = []
        labels: set[str] = set()
        for index, entry in enumerate(cfg):
            if not isinstance(entry, Mapping):
                raise ConfigError(f"criterion[{index}] must be a mapping with keys {_ENTRY_KEYS}, got {entry!r}")
            unknown = sorted(set(entry) - set(_ENTRY_KEYS))
            if unknown:
                raise ConfigError(f"criterion[{index}] has unknown key(s) {unknown}; valid keys: {list(_ENTRY_KEYS)}")
            if "name" not in entry:
                raise ConfigError(f"criterion[{index}] needs a 'name'")
            spec = _resolve(index, entry["name"])
            weight = _weight(index, entry.get("weight", 1.0))
            label = entry.get("label", entry["name"])
            if not isinstance(label, str) or not label:
                raise ConfigError(f"criterion[{index}].label must be a non-empty string, got {label!r}")
            if label in labels:
                raise ConfigError(
                    f"criterion[{index}] label {label!r} is used twice; give one entry a distinct 'label'"
                )
            labels.add(label)
            kwargs = entry.get("kwargs") or {}
            if not isinstance(kwargs, Mapping):
                raise ConfigError(f"criterion[{index}].kwargs must be a mapping, got {kwargs!r}")
            if weight == 0:
                log.info("criterion[%d] %s has weight 0 and is disabled", index, entry["name"])
                continue
            if kwargs.get("reduction") == "none":
                raise ConfigError(
                    f"criterion[{index}] ({entry['name']}): reduction='none' gives no scalar to combine; use "
                    "'mean' or 'sum'"
                )
            try:
                module = spec.module(**dict(kwargs))
            except (TypeError, ValueError) as err:
                raise ConfigError(f"criterion[{index}] ({entry['name']}): bad kwargs {dict(kwargs)}: {err}") from err
            if getattr(module, "reduction", "mean") == "none":
                raise ConfigError(f"criterion[{index}] ({entry['name']}): reduction='none' gives no scalar")
            needs = bool(_TENSOR_INPUTS & set(spec.required_inputs))
            built.append((CriterionSpec(label, spec, weight, needs), module))
        return cls(built)

    @property
    def labels(self) -> tuple[str, ...]:
        """Labels of the enabled criteria, in config order."""
        return tuple(spec.label for spec in self.specs)

    @property
    def weights(self) -> dict[str, float]:
        """``{label: w_i}`` of the enabled criteria, in config order."""
        return {spec.label: spec.weight for spec in self.specs}

    def _hooked(self) -> list[nn.Module]:
        return [m for m in self.criteria if hasattr(m, "recording")]

    def criterion(self, label: str) -> nn.Module:
        """The module of the enabled criterion ``label``."""
        for spec, module in zip(self.specs, self.criteria):
            if spec.label == label:
                return module
        raise KeyError(f"no enabled criterion labelled {label!r}; enabled: {list(self.labels)}")

    @contextlib.contextmanager
    def recording(self, model: nn.Module) -> Iterator[CombinedLoss]:
        """Enter ``recording(model)`` of every hook-based criterion (none: no hooks at all)."""
        with contextlib.ExitStack() as stack:
            for module in self._hooked():
                stack.enter_context(module.recording(model))
            yield self

    def register_hooks(self, model: nn.Module) -> None:
        """Seed mode for every hook-based criterion."""
        for module in self._hooked():
            module.register_hooks(model)

    def remove_hooks(self) -> None:
        """Remove the hooks of every hook-based criterion (idempotent)."""
        for module in self._hooked():
            module.remove_hooks()

    def set_input_checks(self, mode: str) -> None:
        """Set ``input_checks`` (``"immediate"``/``"deferred"``) on every criterion that has the option."""
        if mode not in INPUT_CHECKS:
            raise ConfigError(f"input_checks must be 'immediate' or 'deferred', got {mode!r}")
        for module in self.criteria:
            if hasattr(module, "input_checks"):
                module.input_checks = mode

    def forward(
        self,
        logits: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
        num_valid_timesteps: int | torch.Tensor | None = None,
        return_components: bool = False,
    ) -> torch.Tensor | CombinedLossOutput:
        """``Σ_i w_i · L_i`` in config order; ``return_components=True`` gives a ``CombinedLossOutput``."""
        extras: dict[str, Any] = {}
        if mask is not None:
            extras["mask"] = mask
        if num_valid_timesteps is not None:
            extras["num_valid_timesteps"] = num_valid_timesteps
        total = None
        components: dict[str, torch.Tensor] = {}
        for spec, module in zip(self.specs, self.criteria):
            if spec.needs_inputs:
                if logits is None or target is None:
                    raise ConfigError(f"criterion {spec.label!r} needs logits and target, got None")
                value = module(logits, target, **_accepted(spec.label, module, extras))
            else:
                value = module()
            components[spec.label] = value
            term = spec.weight * value
            total = term if total is None else total + term
        if not return_components:
            return total
        return CombinedLossOutput(total, components, self.weights)

    def extra_repr(self) -> str:
        return ", ".join(f"{s.label}: {s.weight:g}" for s in self.specs)
