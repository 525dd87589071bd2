"""The loss registry: an explicit table name -> ``LossSpec``.

``combined.CombinedLoss`` resolves YAML criterion names here (entries whose ``module`` is set), ``losskit
losses`` prints it, and the training service serves every entry whose ``service_fn`` is set as a built-in
loss (``cross_entropy``'s ``service_fn`` is set by the service layer to Tinker's token cross-entropy).
``dpo`` deliberately has no entry, so seed 002's ``@custom_loss(name="dpo")`` example can register that name.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable

from losskit import functional, kernels, losses
from losskit.contract import ConfigError
from losskit.functional import temporal


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """One registered loss.

    Attributes:
        name: registry key (snake_case).
        fn: the functional form, ``fn(<required inputs>, **options)``.
        required_inputs: names of the tensors ``fn`` takes positionally, e.g. ``("logits", "target")``.
        description: one line for ``losskit losses``.
        module: the ``nn.Module`` class holding the settings, if there is one.
        service_fn: the Tinker-semantics function the training service runs for this name, if it is a
            service built-in.
    """

    name: str
    fn: Callable
    required_inputs: tuple[str, ...]
    description: str
    module: type | None = None
    service_fn: Callable | None = None


REGISTRY: dict[str, LossSpec] = {}


def register(spec: LossSpec) -> LossSpec:
    """Add ``spec`` to the registry; a second entry under one name is an error."""
    if spec.name in REGISTRY:
        raise ConfigError(f"loss {spec.name!r} is already registered")
    REGISTRY[spec.name] = spec
    return spec


def canonical(name: str) -> str:
    """Lookup key: case-insensitive, ignoring ``_`` and ``-`` (``CrossEntropyLoss`` == ``cross_entropy_loss``)."""
    return name.lower().replace("_", "").replace("-", "")


def get(name: str) -> LossSpec:
    """The entry called ``name`` (matched as by ``canonical``); ``ConfigError`` naming the closest entry."""
    if name in REGISTRY:
        return REGISTRY[name]
    by_key = {canonical(n): s for n, s in REGISTRY.items()}
    if canonical(name) in by_key:
        return by_key[canonical(name)]
    close = difflib.get_close_matches(name, sorted(REGISTRY), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"{name!r} is not a registered loss{hint} (valid: {', '.join(sorted(REGISTRY))})")


register(
    LossSpec(
        name="cross_entropy",
        fn=kernels.cross_entropy,
        required_inputs=("logits", "target"),
        description="token cross-entropy with ignore_index/mask, token weights, label smoothing, z-loss",
    )
)
register(
    LossSpec(
        name="label_smoothed_cross_entropy",
        fn=kernels.cross_entropy,
        required_inputs=("logits", "target"),
        description="label-smoothed cross-entropy (seed 004, corrected): torch or fairseq convention",
        module=losses.LabelSmoothedCrossEntropy,
    )
)
register(
    LossSpec(
        name="entropy",
        fn=functional.entropy,
        required_inputs=("logits",),
        description="predictive entropy H(p) per position (nats)",
    )
)
register(
    LossSpec(
        name="wrong_answer_entropy",
        fn=functional.wrong_answer_entropy,
        required_inputs=("logits", "target"),
        description="entropy H(q) of the distribution renormalised over the wrong answers (seed 000)",
    )
)
# Seed 003 (DynVision) temporal losses, spec/temporal.md §2-§4. ``energy_loss``/``activity_loss`` are hook-based:
# their one input is the recorded activation, so ``CombinedLoss`` passes them no tensors.
register(
    LossSpec(
        name="cross_entropy_loss",
        fn=kernels.cross_entropy,
        required_inputs=("logits", "target"),
        description="temporal cross-entropy averaged over valid timesteps (seed 003; ignore_index=-1)",
        module=losses.CrossEntropyLoss,
    )
)
register(
    LossSpec(
        name="energy_loss",
        fn=temporal.energy_term,
        required_inputs=("activation",),
        description="activation energy ||a||_p / n_units over hooked Conv/Linear modules (seed 003)",
        module=losses.EnergyLoss,
    )
)
register(
    LossSpec(
        name="activity_loss",
        fn=temporal.energy_term,
        required_inputs=("activation",),
        description="energy over modules marked with losskit.hooks.monitor_energy (EnergyLoss, select='marked')",
        module=losses.ActivityLoss,
    )
)
