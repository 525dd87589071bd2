"""The loss registry: an explicit table name -> ``LossSpec``.

``combined.CombinedLoss`` resolves YAML criterion names here (entries whose ``module`` is set), ``losskit
losses`` prints it, and the training service (``losskit serve``) serves every entry whose ``service_fn`` is set
as a built-in loss. ``cross_entropy``'s ``service_fn`` is ``functional.policy.token_cross_entropy`` (Tinker
semantics: ``-Σ lp·w``); ``dpo`` deliberately has no entry, so seed 002's ``@custom_loss(name="dpo")`` example
can register that name.

A ``service_fn`` follows one of two calling conventions, told apart by its first parameter:

* ``logprobs`` (the Tinker losses, sums): ``service_fn(lp, *inputs, mask=..., **config)``, where ``lp`` are the
  learner's log-probabilities of the target tokens, the other positional parameters name request inputs
  (``sampling_logprobs`` is the request's ``logprobs``) and keyword-only parameters are config keys;
* ``logits`` (losskit's own losses, means over the supervised tokens): ``service_fn(logits, target,
  **config)`` with ``(B, T, V)`` logits and ``-100`` at unsupervised targets.

Either returns a ``LossFnOutput`` whose diagnostics are detached tensors.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable

from losskit import functional, kernels, losses
from losskit.contract import ConfigError, LossFnOutput
from losskit.functional import policy, temporal
from losskit.modifiers import create_loss_modifier_pipeline
from losskit.modifiers.config_keys import MASTER_SWITCH


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


def serve_label_smoothed_cross_entropy(
    logits, target, *, label_smoothing: float = 0.1, smoothing_convention: str = "torch",
    smoothing_exclude=(), z_loss: float = 0.0,
) -> LossFnOutput:
    """Label-smoothed cross-entropy (+ z-loss), the mean over the supervised tokens (``kernels.cross_entropy``).

    The service's ``label_smoothed_cross_entropy``: ``kernels.cross_entropy(logits, target,
    label_smoothing=..., smoothing_convention=..., smoothing_exclude=..., z_loss=..., reduction="mean")``.
    """
    loss = kernels.cross_entropy(
        logits, target, label_smoothing=label_smoothing, smoothing_convention=smoothing_convention,
        smoothing_exclude=smoothing_exclude, z_loss=z_loss, reduction="mean",
    )
    return LossFnOutput(loss=loss, diagnostics={"loss:mean": loss.detach()})


def serve_loss_modifiers(logits, target, **config) -> LossFnOutput:
    """Seed 000's loss-modifier pipeline on one statistics pass; the mean over the supervised tokens.

    ``config`` holds the flat modifier keys of ``losskit train`` (``target_smoothing_factor``,
    ``entropy_modifier_enabled``, ...), validated by the same key table; ``loss_modifiers_enabled`` is implied.
    Equivalent to ``create_loss_modifier_pipeline({"loss_modifiers_enabled": True, **config}).compute(logits,
    target)``; the diagnostics add the pipeline's ``loss_modifiers/...`` metrics.
    """
    if config.get(MASTER_SWITCH, True) is not True:
        raise ConfigError(f"{MASTER_SWITCH} is implied by the loss_modifiers loss; remove it, got {config[MASTER_SWITCH]!r}")
    pipe = create_loss_modifier_pipeline({**config, MASTER_SWITCH: True}, verbose=False)
    out = pipe.compute(logits, target)
    diagnostics = {"loss:mean": out.loss.detach(), "loss_raw:mean": out.loss_raw.detach(), **pipe.get_all_metrics()}
    return LossFnOutput(loss=out.loss, diagnostics=diagnostics)


register(
    LossSpec(
        name="cross_entropy",
        fn=kernels.cross_entropy,
        required_inputs=("logits", "target"),
        description="token cross-entropy with ignore_index/mask, token weights, label smoothing, z-loss",
        service_fn=policy.token_cross_entropy,
    )
)
register(
    LossSpec(
        name="label_smoothed_cross_entropy",
        fn=kernels.cross_entropy,
        required_inputs=("logits", "target"),
        description="label-smoothed cross-entropy (seed 004, corrected): torch or fairseq convention",
        module=losses.LabelSmoothedCrossEntropy,
        service_fn=serve_label_smoothed_cross_entropy,
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
# Seed 003 (DynVision) temporal losses, docs/temporal.md. ``energy_loss``/``activity_loss`` are hook-based:
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
# Tinker's RL losses (service built-ins, token sums; functional/policy.py). ``fn`` is the same function.
for _fn, _description in (
    (policy.importance_sampling, "REINFORCE with importance sampling: -sum r*A, r = exp(lp - q) (Tinker, no clamp)"),
    (policy.ppo, "PPO clipped surrogate: -sum min(r*A, clip(r, 0.8, 1.2)*A) (Tinker; absolute ratio bounds)"),
    (policy.cispo, "CISPO: -sum sg(clip(r, 0, 4))*lp*A (Tinker; absolute ratio bounds)"),
    (policy.dro, "DRO: -sum (lp*A - beta/2*(lp - q)^2) (Tinker; beta required)"),
):
    register(
        LossSpec(
            name=_fn.__name__,
            fn=_fn,
            required_inputs=("logprobs", "sampling_logprobs", "advantages"),
            description=_description,
            service_fn=_fn,
        )
    )
register(
    LossSpec(
        name="loss_modifiers",
        fn=serve_loss_modifiers,
        required_inputs=("logits", "target"),
        description="seed 000's loss-modifier pipeline (flat keys as in losskit train), mean over supervised tokens",
        service_fn=serve_loss_modifiers,
    )
)
