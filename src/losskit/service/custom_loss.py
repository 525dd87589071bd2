"""Custom losses: the binding of a graph's placeholders and output, and the immutable ``LossProgram``.

The wire format (``{"format": 1, "nodes": [...]}``, a torch.fx graph as data) and its structural checks live in
``loss_graph``; the interpreter that runs a program lives in ``loss_interpreter``. Two kinds bind the placeholders
differently:

* ``tinker/1`` (the default): ``logprobs`` (shaped like the datum's ``target_tokens``), then one placeholder per
  ``loss_fn_inputs`` key it reads; the output is ``(loss, {"custom/<name>:sum|mean": tensor})``, run per datum.
* ``losskit.native/1`` (``"kind"`` in the graph): ``model_outputs`` ``[B,T,V]`` logits, ``loss_fn_inputs`` (a dict
  read only through ``operator.getitem`` with a constant string), ``attention_mask`` ``[B,T]``, then one
  placeholder per hyperparameter (``args[0]`` is its JSON-scalar default; none: required per request); the
  output is ``(loss, logprobs, {diagnostic: tensor or JSON scalar})``, run once per request.

``parse_graph`` checks a graph and returns a ``LossProgram``. These modules import only torch and the standard
library, so ``losskit.client`` runs the server's checks before it uploads, without the server extras.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import types
from collections.abc import Mapping
from typing import Any

import torch

from losskit.service.loss_graph import (
    DIAGNOSTIC_KEY,
    ELEMENT_FACTOR,
    GRAPH_FORMAT,
    INPUT_KEY,
    INPUT_NAME,
    MAX_GRAPH_BYTES,
    MAX_NODES,
    MAX_TINKER_INPUTS,
    PARAM_NAME,
    TINKER_METRIC_KEY,
    CustomLossError,
    Node,
    Ref,
    canonical_graph_json,
    invalid,
    is_json_scalar,
    parse_nodes,
    refs,
)
from losskit.service.loss_interpreter import InputsView, Interpreter

NATIVE_KIND = "losskit.native/1"
TINKER_KIND = "tinker/1"
KINDS = (TINKER_KIND, NATIVE_KIND)
REQUIRED = object()  # marks a hyperparameter without a default

__all__ = ["KINDS", "NATIVE_KIND", "REQUIRED", "TINKER_KIND", "CustomLossError", "LossProgram", "NativeResult",
           "parse_graph"]


@dataclasses.dataclass(frozen=True)
class NativeResult:
    """What a native program returns: the 0-d loss, its logprobs (or None) and the raw diagnostics."""

    loss: torch.Tensor
    logprobs: torch.Tensor | None
    diagnostics: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LossProgram:
    """An immutable, checked custom loss: resolved nodes plus a content hash. Run it with ``run_native`` or
    ``run_datum``.

    Attributes:
        name: the registered name (used in messages).
        kind: ``tinker/1`` or ``losskit.native/1``.
        nodes: resolved nodes in execution order.
        params: placeholder targets in order.
        inputs_read: the ``loss_fn_inputs`` keys the loss reads (native: through ``getitem``; tinker: its
            placeholders after ``logprobs``).
        hyperparameters: native only: ``(name, default)`` pairs, ``REQUIRED`` for required ones.
        content_hash: SHA-256 of the canonical graph JSON.
        graph: the graph as canonical JSON-able data.
    """

    name: str
    kind: str
    nodes: tuple[Node, ...]
    params: tuple[str, ...]
    inputs_read: tuple[str, ...]
    hyperparameters: tuple[tuple[str, Any], ...]
    content_hash: str
    graph: Mapping[str, Any]

    @property
    def hyperparameter_defaults(self) -> dict[str, Any]:
        """``{name: default}`` of the optional hyperparameters (required ones are absent)."""
        return {k: v for k, v in self.hyperparameters if v is not REQUIRED}

    @property
    def required_hyperparameters(self) -> tuple[str, ...]:
        return tuple(k for k, v in self.hyperparameters if v is REQUIRED)

    def bind_hyperparameters(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Every hyperparameter's value for one request: ``values`` over the defaults.

        Raises:
            CustomLossError: ``validation_error`` for an unknown name or a non-scalar value, ``missing_config``
                for a required hyperparameter that is absent.
        """
        known = dict(self.hyperparameters)
        for key, value in values.items():
            if key not in known:
                accepted = ", ".join(sorted(known)) or "none"
                raise CustomLossError(
                    "validation_error",
                    f"custom loss {self.name!r} has no hyperparameter {key!r} (accepted: {accepted})",
                    {"argument": key},
                )
            if not is_json_scalar(value):
                raise CustomLossError(
                    "validation_error",
                    f"custom loss {self.name!r}: hyperparameter {key!r} must be a JSON scalar, got "
                    f"{type(value).__name__}",
                    {"argument": key},
                )
        out = {}
        for key, default in self.hyperparameters:
            if key in values:
                out[key] = values[key]
            elif default is REQUIRED:
                raise CustomLossError(
                    "missing_config",
                    f"custom loss {self.name!r} needs hyperparameter {key!r} in this request "
                    "(loss_fn_config or a keyword argument)",
                    {"argument": key},
                )
            else:
                out[key] = default
        return out

    # ---- execution ------------------------------------------------------------------------------------------
    def run_native(self, model_outputs: torch.Tensor, loss_fn_inputs: Mapping[str, torch.Tensor],
                   attention_mask: torch.Tensor, hyperparameters: Mapping[str, Any], *,
                   time_limit_s: float = 60.0) -> NativeResult:
        """Run a ``losskit.native/1`` program once on a padded batch; ``hyperparameters`` come from
        ``bind_hyperparameters``."""
        if self.kind != NATIVE_KIND:
            raise CustomLossError("validation_error", f"custom loss {self.name!r} is {self.kind}, not native")
        missing = [k for k in self.inputs_read if k not in loss_fn_inputs]
        if missing:
            raise CustomLossError(
                "loss_input_missing",
                f"custom loss {self.name!r} reads loss_fn_inputs[{missing[0]!r}], which the request does not "
                f"provide (provided: {', '.join(sorted(loss_fn_inputs)) or 'none'})",
                {"input": missing[0]},
            )
        values = [model_outputs, InputsView(loss_fn_inputs), attention_mask]
        values += [hyperparameters[k] for k, _ in self.hyperparameters]
        out = self._execute(values, model_outputs, time_limit_s)
        loss, logprobs, diagnostics = out
        loss = self._check_loss(loss)
        if logprobs is not None and not isinstance(logprobs, torch.Tensor):
            raise CustomLossError(
                "invalid_loss_output",
                f"custom loss {self.name!r} must return logprobs as a tensor or None, got {type(logprobs).__name__}",
            )
        diag = {}
        for key, value in diagnostics.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise CustomLossError(
                        "diagnostic_not_scalar",
                        f"custom loss {self.name!r}: diagnostic {key!r} has {value.numel()} elements (shape "
                        f"{tuple(value.shape)}); diagnostics must be scalars (use .mean() or .sum())",
                        {"diagnostic": key},
                    )
                diag[key] = value.detach().reshape(())
            elif is_json_scalar(value):
                diag[key] = value
            else:
                raise CustomLossError(
                    "diagnostic_not_scalar",
                    f"custom loss {self.name!r}: diagnostic {key!r} is a {type(value).__name__}, not a scalar",
                    {"diagnostic": key},
                )
        return NativeResult(loss=loss, logprobs=logprobs, diagnostics=diag)

    def run_datum(self, logprobs: torch.Tensor, inputs: Mapping[str, torch.Tensor], *,
                  max_elements: int | None = None, time_limit_s: float = 60.0
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run a ``tinker/1`` program on one datum's differentiable ``logprobs`` and its declared inputs."""
        if self.kind != TINKER_KIND:
            raise CustomLossError("validation_error", f"custom loss {self.name!r} is {self.kind}, not tinker/1")
        missing = [k for k in self.inputs_read if k not in inputs]
        if missing:
            raise CustomLossError(
                "loss_input_missing",
                f"custom loss {self.name!r} reads loss_fn_inputs[{missing[0]!r}], which the datum does not have",
                {"input": missing[0]},
            )
        values = [logprobs, *(inputs[k] for k in self.inputs_read)]
        loss, metrics = self._execute(values, logprobs, time_limit_s, max_elements=max_elements)
        loss = self._check_loss(loss)
        out = {}
        for key, value in metrics.items():
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise CustomLossError(
                    "diagnostic_not_scalar", f"custom loss {self.name!r}: metric {key!r} must be a scalar tensor",
                    {"diagnostic": key},
                )
            out[key] = value.detach().reshape(())
        return loss, out

    def _check_loss(self, loss: Any) -> torch.Tensor:
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
            got = f"a {loss.dtype} tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) \
                else type(loss).__name__
            raise CustomLossError(
                "invalid_loss_output", f"custom loss {self.name!r} must return a scalar float tensor loss, got {got}"
            )
        return loss.reshape(())

    def _execute(self, values: list, like: torch.Tensor, time_limit_s: float, *,
                 max_elements: int | None = None) -> Any:
        cap = max_elements if max_elements is not None else ELEMENT_FACTOR * max(like.numel(), 1)
        return Interpreter(self.name, self.nodes, like.device, cap, time.monotonic() + time_limit_s).run(values)


# ------------------------------------------------------------------------------------------------------------
# parsing and checks
# ------------------------------------------------------------------------------------------------------------


def parse_graph(graph: Any, *, name: str, kind: str | None = None, max_nodes: int = MAX_NODES) -> LossProgram:
    """Check a graph upload and build its ``LossProgram``.

    Args:
        graph: the decoded JSON object ``{"format": 1, "nodes": [...], "kind"?, "hyperparameters"?}``.
        name: the loss's registered name (for messages).
        kind: force a kind; default: ``graph["kind"]``, else ``tinker/1``.
        max_nodes: the node limit (``--max-graph-nodes``).

    Raises:
        CustomLossError: ``invalid_loss_graph`` (limits, structure, binding), ``loss_op_not_allowed`` (a target
            that is not on the allowlist, a ``get_attr`` or ``call_module`` node, a disallowed ``getattr``).
    """
    if not isinstance(graph, dict):
        raise invalid(f"custom loss {name!r}: graph must be a JSON object, got {type(graph).__name__}")
    try:
        text = canonical_graph_json(graph)
    except (TypeError, ValueError) as exc:
        raise invalid(f"custom loss {name!r}: graph is not plain JSON ({exc})") from None
    if len(text.encode()) > MAX_GRAPH_BYTES:
        raise invalid(f"custom loss {name!r}: graph is {len(text.encode())} bytes of JSON, above the limit of "
                       f"{MAX_GRAPH_BYTES}")
    unknown = set(graph) - {"format", "nodes", "kind", "hyperparameters"}
    if unknown:
        raise invalid(f"custom loss {name!r}: graph has unknown key(s) {sorted(unknown)} (accepted: format, nodes, "
                       "kind, hyperparameters)")
    if graph.get("format") != GRAPH_FORMAT:
        raise invalid(f"custom loss {name!r}: graph format must be {GRAPH_FORMAT}, got {graph.get('format')!r}")
    kind = kind or graph.get("kind", TINKER_KIND)
    if kind not in KINDS:
        raise invalid(f"custom loss {name!r}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return _bind(name, kind, parse_nodes(graph, name, max_nodes), graph, text)


def _bind(name: str, kind: str, nodes: tuple[Node, ...], graph: Mapping, text: str) -> LossProgram:
    placeholders = [n for n in nodes if n.kind == "placeholder"]
    params = tuple(n.target for n in placeholders)
    output = nodes[-1]
    if len(output.args) != 1:
        raise invalid(f"custom loss {name!r}: the output node must have exactly one argument")
    hyper: list[tuple[str, Any]] = []
    inputs_read: list[str] = []
    if kind == NATIVE_KIND:
        if len(placeholders) < 3:
            raise invalid(f"custom loss {name!r}: a native loss takes (model_outputs, loss_fn_inputs, "
                           f"attention_mask, ...), got {len(placeholders)} placeholder(s)")
        declared = graph.get("hyperparameters", {})
        if not isinstance(declared, dict):
            raise invalid(f"custom loss {name!r}: hyperparameters must be an object")
        for ph in placeholders[3:]:
            if not PARAM_NAME.fullmatch(ph.target):
                raise invalid(f"custom loss {name!r}: hyperparameter name {ph.target[:40]!r} is not an identifier")
            if len(ph.args) > 1 or ph.kwargs or (ph.args and not is_json_scalar(ph.args[0])):
                raise invalid(f"custom loss {name!r}: hyperparameter {ph.target!r} needs a JSON-scalar default "
                               "(or none, when it is required per request)", node=ph.name)
            hyper.append((ph.target, ph.args[0] if ph.args else REQUIRED))
        extra = set(declared) - {h for h, _ in hyper}
        if extra:
            raise invalid(f"custom loss {name!r}: hyperparameters {sorted(extra)} have no placeholder")
        if len({h for h, _ in hyper}) != len(hyper):
            raise invalid(f"custom loss {name!r}: a hyperparameter name is used twice")
        inputs_node = placeholders[1].name
        for node in nodes:
            for pos, ref in _positions(node):
                if ref != inputs_node:
                    continue
                key = node.args[1] if len(node.args) == 2 else None
                ok = (node.kind == "call_function" and node.op is not None and node.op.kind == "getitem"
                      and pos == ("args", 0) and isinstance(key, str) and INPUT_KEY.fullmatch(key))
                if not ok:
                    raise invalid(f"custom loss {name!r}: node {node.name!r} uses loss_fn_inputs other than as "
                                   "loss_fn_inputs[\"<constant name>\"]", node=node.name)
                if key not in inputs_read:
                    inputs_read.append(key)
        _check_output_native(name, output.args[0])
    else:
        if "hyperparameters" in graph:
            raise invalid(f"custom loss {name!r}: tinker/1 graphs have no hyperparameters")
        if not placeholders or placeholders[0].target != "logprobs":
            raise invalid(f"custom loss {name!r}: a tinker/1 loss takes logprobs first, then the loss_fn_inputs "
                           "it reads")
        if len(placeholders) > MAX_TINKER_INPUTS:
            raise invalid(f"custom loss {name!r}: at most {MAX_TINKER_INPUTS} parameters, logprobs included")
        for ph in placeholders[1:]:
            if not INPUT_NAME.fullmatch(ph.target):
                raise invalid(f"custom loss {name!r}: input name {ph.target[:40]!r} must match "
                               "[a-z_][a-z0-9_]{0,63}", node=ph.name)
            inputs_read.append(ph.target)
        if len(set(params)) != len(params):
            raise invalid(f"custom loss {name!r}: a parameter name is used twice")
        _check_output_tinker(name, output.args[0])
    digest = hashlib.sha256(text.encode()).hexdigest()
    return LossProgram(
        name=name, kind=kind, nodes=nodes, params=params, inputs_read=tuple(inputs_read),
        hyperparameters=tuple(hyper), content_hash=digest, graph=types.MappingProxyType(json.loads(text)),
    )


def _positions(node: Node):
    """``(position, ref name)`` of every direct or nested reference in a node's arguments."""
    for i, a in enumerate(node.args):
        for r in refs(a):
            yield ("args", i) if isinstance(a, Ref) else ("nested", i), r
    for k, v in node.kwargs:
        for r in refs(v):
            yield ("kwargs", k), r


def _check_output_native(name: str, out: Any) -> None:
    shape = "(loss, logprobs, {diagnostic: value})"
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        raise CustomLossError("invalid_loss_output", f"custom loss {name!r} must return {shape} or a LossFnOutput")
    loss, _, diagnostics = out
    if not isinstance(loss, Ref):
        raise CustomLossError("invalid_loss_output", f"custom loss {name!r} must return its loss as a tensor")
    if not isinstance(out[1], (Ref, type(None))):
        raise CustomLossError("invalid_loss_output", f"custom loss {name!r}: logprobs must be a tensor or None")
    if not isinstance(diagnostics, dict):
        raise CustomLossError("invalid_loss_output", f"custom loss {name!r}: diagnostics must be a dict")
    for key, value in diagnostics.items():
        if not DIAGNOSTIC_KEY.fullmatch(key):
            raise CustomLossError("invalid_loss_output",
                                  f"custom loss {name!r}: diagnostic name {key[:40]!r} must match {DIAGNOSTIC_KEY.pattern}")
        if not isinstance(value, Ref) and not is_json_scalar(value):
            raise CustomLossError("diagnostic_not_scalar",
                                  f"custom loss {name!r}: diagnostic {key!r} is not a tensor or a JSON scalar")


def _check_output_tinker(name: str, out: Any) -> None:
    if not isinstance(out, (tuple, list)) or len(out) != 2 or not isinstance(out[0], Ref) or not isinstance(out[1], dict):
        raise CustomLossError("invalid_loss_output", f"custom loss {name!r} must return (loss, metrics)")
    for key, value in out[1].items():
        if not TINKER_METRIC_KEY.fullmatch(key):
            raise CustomLossError("invalid_loss_output",
                                  f"custom loss {name!r}: metric {key[:70]!r} must be named custom/<name>:sum or "
                                  "custom/<name>:mean in lowercase")
        if not isinstance(value, Ref):
            raise CustomLossError("invalid_loss_output", f"custom loss {name!r}: metric {key!r} must be a tensor")
