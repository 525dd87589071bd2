"""The losses a request can name: the built-ins (``losskit.registry`` entries with a ``service_fn``) and the custom
losses of the caller's session; their binding to a request's inputs and config, checked at submit.

A built-in's binding comes from its ``service_fn``'s signature (see ``losskit.registry``):

* first parameter ``logprobs``: a token loss (the Tinker built-ins, sums). Further positional parameters name
  request inputs (``sampling_logprobs`` is the request's ``logprobs``; a parameter with a default is optional);
  keyword-only parameters are config keys (required when without default). A config key that also arrives as a
  tensor in ``loss_fn_inputs`` (per-token clip thresholds) overrides the config.
* first parameter ``logits``: a logits loss (losskit's own, means over the supervised tokens); its keyword
  parameters, or ``**config``, are config keys.

Config values are checked at submit by a dry run of the function on a one-token batch, so a bad value is a 400
with the library's own message before any work is queued.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
from collections.abc import Callable, Mapping
from typing import Any

import torch

from losskit import registry
from losskit.contract import ConfigError, LossFnOutput, LossInputError
from losskit.service.custom_loss import LossProgram
from losskit.service.errors import ServiceError

#: Configs that passed their dry run (an insertion-ordered bounded set): a repeated config skips it.
_CHECKED: dict[str, None] = {}
#: service_fn parameter -> the request's loss_fn_inputs key (Tinker names the sampler's logprobs ``logprobs``).
WIRE_NAMES = {"sampling_logprobs": "logprobs"}
_REQUIRED = inspect.Parameter.empty


@dataclasses.dataclass(frozen=True)
class BuiltinLoss:
    """A built-in loss bound from its ``service_fn`` signature.

    Attributes:
        name: the registry name.
        description: one line for ``list_loss_functions`` (the ``service_fn``'s docstring summary).
        fn: the ``service_fn``.
        kind: ``"token"`` (first parameter ``logprobs``) or ``"logits"``.
        inputs: ``(parameter, wire key, required)`` for each request input after the first parameter(s).
        config: ``(key, default)`` of the keyword-only config keys (``inspect.Parameter.empty`` = required).
        open_config: the function takes ``**config`` (it validates its own keys).
    """

    name: str
    description: str
    fn: Callable[..., LossFnOutput]
    kind: str
    inputs: tuple[tuple[str, str, bool], ...]
    config: tuple[tuple[str, Any], ...]
    open_config: bool

    @staticmethod
    def from_spec(spec: registry.LossSpec) -> BuiltinLoss:
        fn = spec.service_fn
        params = list(inspect.signature(fn).parameters.values())
        first = params[0].name
        if first not in ("logprobs", "logits"):
            raise TypeError(f"service_fn of {spec.name!r} must take logprobs or logits first, got {first!r}")
        kind = "token" if first == "logprobs" else "logits"
        positional = [p for p in params[1:] if p.kind == p.POSITIONAL_OR_KEYWORD]
        if kind == "logits":
            positional = positional[1:]  # target
        inputs = tuple((p.name, WIRE_NAMES.get(p.name, p.name), p.default is _REQUIRED) for p in positional)
        config = tuple((p.name, p.default) for p in params if p.kind == p.KEYWORD_ONLY and p.name != "mask")
        open_config = any(p.kind == p.VAR_KEYWORD for p in params)
        doc = (inspect.getdoc(fn) or spec.description).splitlines()[0].replace("``", "")
        return BuiltinLoss(spec.name, doc, fn, kind, inputs, config, open_config)

    @property
    def input_keys(self) -> tuple[str, ...]:
        return tuple(wire for _, wire, _ in self.inputs)

    def check(self, config: Mapping[str, Any], input_keys: set[str], *, vocab_size: int) -> dict[str, Any]:
        """Validate ``config`` and the presence of the inputs at submit; returns the config to run with.

        Raises:
            ServiceError: ``loss_input_missing`` (naming the input), ``validation_error`` (an unknown config key,
                naming the accepted ones or the closest key), ``missing_config`` (a required key is absent), or
                ``validation_error`` with the library's message for a bad value.
        """
        for _, wire, required in self.inputs:
            if required and wire not in input_keys:
                raise ServiceError("loss_input_missing", f"loss {self.name!r} needs loss_fn_inputs[{wire!r}] "
                                   f"(inputs: target_tokens, {', '.join(self.input_keys)})", detail={"input": wire})
        config = dict(config)
        if not self.open_config:
            accepted = [k for k, _ in self.config]
            for key in config:
                if key not in accepted:
                    close = difflib.get_close_matches(key, accepted, n=1, cutoff=0.6)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    raise ServiceError("validation_error", f"loss {self.name!r} has no config key {key!r}{hint} "
                                       f"(accepted: {', '.join(accepted) or 'none'})", detail={"argument": key})
            for key, default in self.config:
                if default is _REQUIRED and key not in config and key not in input_keys:
                    raise ServiceError("missing_config", f"loss {self.name!r} needs loss_fn_config[{key!r}]",
                                       detail={"argument": key})
        key = self._cache_key(config, vocab_size)
        if key is None or key not in _CHECKED:
            self._dry_run(config, vocab_size)
            if key is not None:
                _CHECKED[key] = None
                while len(_CHECKED) > 4096:
                    _CHECKED.pop(next(iter(_CHECKED)))
        return config

    def _cache_key(self, config: Mapping[str, Any], vocab_size: int) -> str | None:
        """A key for configs already validated by a dry run (JSON-able configs only)."""
        try:
            return json.dumps([self.name, vocab_size, config], sort_keys=True)
        except (TypeError, ValueError):
            return None

    def _dry_run(self, config: dict[str, Any], vocab_size: int) -> None:
        try:
            with torch.no_grad():
                if self.kind == "token":
                    one = torch.zeros(1)
                    args = [one for _, _, required in self.inputs if required]
                    self.fn(one, *args, **{k: v for k, v in config.items()})
                else:
                    self.fn(torch.zeros(1, 1, vocab_size), torch.zeros(1, 1, dtype=torch.long), **config)
        except (ConfigError, LossInputError, TypeError, ValueError) as exc:
            raise ServiceError("validation_error", f"loss {self.name!r}: {exc}") from None


def builtin_losses() -> dict[str, BuiltinLoss]:
    """Every service built-in, by name (registry order)."""
    return {s.name: BuiltinLoss.from_spec(s) for s in registry.REGISTRY.values() if s.service_fn is not None}


@dataclasses.dataclass(frozen=True)
class CustomLoss:
    """A session's custom loss: a checked graph program, or (opt-in, unsafe) an unpickled function."""

    name: str
    version: int
    description: str
    program: LossProgram | None = None
    function: Callable | None = None

    @property
    def unsafe(self) -> bool:
        return self.function is not None

    @property
    def reads_target_tokens(self) -> bool:
        return self.program is not None and "target_tokens" in self.program.inputs_read

    def listing(self) -> dict[str, Any]:
        if self.program is not None:
            return {"name": self.name, "kind": "graph", "inputs_read": list(self.program.inputs_read),
                    "hyperparameters": self.program.hyperparameter_defaults,
                    "required_hyperparameters": list(self.program.required_hyperparameters), "unsafe": False,
                    "version": self.version, "description": self.description}
        return {"name": self.name, "kind": "pickle", "inputs_read": None, "hyperparameters": {},
                "required_hyperparameters": [], "unsafe": True, "version": self.version,
                "description": self.description}


@dataclasses.dataclass(frozen=True)
class ResolvedLoss:
    """What a request's ``loss_fn`` resolved to at submit: a built-in with its checked config, or a custom loss
    (the program as it was when the request arrived) with its bound hyperparameters."""

    name: str
    builtin: BuiltinLoss | None = None
    custom: CustomLoss | None = None
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def reads_target_tokens(self) -> bool:
        return self.builtin is not None or (self.custom is not None and self.custom.reads_target_tokens)
