"""The modifier interface: ``BaseLossModifier``, the phase context and the ``Weights`` a modifier contributes.

Source: seed 000 ("Custom Modifier Development"); the user documentation is docs/modifiers.md. A modifier takes part in exactly one of the fixed phases of ``LossModifierPipeline``:

1. **per-token loss producer** — overrides :meth:`BaseLossModifier.per_token_loss` (e.g. label smoothing);
2. **weight producer** — overrides :meth:`BaseLossModifier.weights` and returns :class:`Weights`;
3. (the one reduction, done by the pipeline in ``functional/reduce.py``);
4. **scalar modifier** — implements only ``modify_loss`` (the seed's ``CustomModifier``): it receives the reduced
   phase 1–3 scalar as ``loss`` and must return a 0-d tensor.

The seed's example works unchanged; only its import becomes ``from losskit.modifiers.base import
BaseLossModifier``.
"""

from __future__ import annotations

import abc
import dataclasses
import types
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from losskit.contract import StepCounts, TokenStats

__all__ = [
    "BaseLossModifier",
    "MaskedSummary",
    "ModifiedLoss",
    "ModifierContext",
    "Weights",
    "is_rank0",
    "masked_summary",
    "phase_of",
]


def is_rank0() -> bool:
    """Whether this process prints and logs: rank 0 under ``torch.distributed``, or no process group at all."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


@dataclasses.dataclass(frozen=True)
class Weights:
    """Weights contributed by a phase-2 modifier; all weights of a step multiply and commute.

    Attributes:
        batch: 0-d tensor multiplying the reduced loss (the entropy modifier's β), or None.
        sample: ``(B,)`` per-sequence weights (mask-ratio ``w_i``, per-sample entropy ``e_i``), or None.
        token: ``(B, T)`` per-token weights ``u_it``, or None.
        sequence_mean: select the mean of per-sequence means for phase 3 instead of the token mean.
    """

    batch: torch.Tensor | None = None
    sample: torch.Tensor | None = None
    token: torch.Tensor | None = None
    sequence_mean: bool = False


@dataclasses.dataclass(frozen=True)
class ModifiedLoss:
    """Result of ``LossModifierPipeline.compute`` / ``compute_elementwise``.

    Attributes:
        loss: the modified 0-d loss that is back-propagated (``train/loss``).
        loss_raw: plain CE (token mean over ``ignore_index`` and the caller's ``mask``) from the same pass,
            detached unless no modifier is enabled, when it is the very ``loss`` tensor (``train/loss_raw``).
        bad: detached 0-d bool device flag: some valid row has bad input.
    """

    loss: torch.Tensor
    loss_raw: torch.Tensor
    bad: torch.Tensor


@dataclasses.dataclass(frozen=True)
class ModifierContext:
    """What phase hooks see. Tensors are ``(B, T)`` (``(N,)`` input becomes ``(N, 1)``).

    Attributes:
        stats: ``TokenStats`` of the one pass (differentiable fields), or None on the element-wise entry.
        valid: the one validity mask ``m`` (bool ``(B, T)``).
        num_valid: 0-d int64 tensor, ``N = Σ m``.
        T: padded sequence length (``targets.shape[-1]``).
        per_token_loss: ``(B, T)`` phase-1 output ``ℓ`` (0 where ``m`` is 0); None inside phase 1.
        ignore_index: the caller's ignore index.
        iter_num: the caller's iteration number, or None.
        targets: the ``(B, T)`` targets (None on the element-wise entry).
        seq_valid: ``(B,)`` int64 valid counts ``n_i``.
        nonempty: ``(B,)`` bool, ``n_i > 0`` (the set S).
        step_counts: the step's ``StepCounts`` under ``normalize="global_tokens"``, else None.
        num_classes: V (None on the element-wise entry).
        extras: read-only mapping of the caller's extra keyword tensors (e.g. ``log_snr``).
    """

    stats: TokenStats | None
    valid: torch.Tensor
    num_valid: torch.Tensor
    T: int
    per_token_loss: torch.Tensor | None
    ignore_index: int | None
    iter_num: int | None
    targets: torch.Tensor | None
    seq_valid: torch.Tensor
    nonempty: torch.Tensor
    step_counts: StepCounts | None = None
    num_classes: int | None = None
    extras: Mapping[str, Any] = dataclasses.field(default_factory=lambda: types.MappingProxyType({}))


class BaseLossModifier(abc.ABC):
    """Base class of every loss modifier (seed 000).

    The constructor sets ``self.config = dict(config)``, ``self.enabled = bool(config.get("enabled", False))``,
    ``self._metrics = {}`` and ``self.name`` (``config["name"]``, else the class name).

    Subclasses implement ``modify_loss(logits, targets, loss, **kwargs) -> 0-d Tensor`` and ``get_metrics()``.
    Advanced subclasses override :meth:`per_token_loss` (phase 1) or :meth:`weights` (phase 2); the pipeline then
    skips their ``modify_loss``. Weights are detached unless the instance sets ``differentiable_weights = True``.

    Class attributes:
        needs: the ``TokenStats`` fields the modifier reads (documentation and planning; one pass yields all).
        differentiable_weights: keep the graph of the weights this modifier returns.
        requires_logits: needs class logits (cannot run on the element-wise entry of regression losses).
        canonical_rank: position in the canonical order of built-ins (None for user modifiers).
        last_weights: the per-example weights of the last call, for weight producers that have them (the SNR
            modifier); None otherwise. Trainers log them (e.g. per-timestep weight histograms).
    """

    needs: tuple[str, ...] = ()
    differentiable_weights: bool = False
    requires_logits: bool = False
    canonical_rank: int | None = None
    last_weights: torch.Tensor | None = None

    def __init__(self, config: Mapping[str, Any] | None = None):
        config = {} if config is None else config
        self.config = dict(config)
        self.enabled = bool(self.config.get("enabled", False))
        self._metrics: dict[str, Any] = {}
        self.name = str(self.config.get("name") or type(self).__name__)

    def bind_settings(self, settings_type: type, config: Any) -> Any:
        """Initialise a built-in modifier from its frozen settings, or from seed 000's dict of short keys
        (``settings_type.from_short``, which validates them); every settings field becomes an attribute
        (``self.weight``, ``self.factor``, ...). Returns the settings (also ``self.settings``)."""
        settings = config if isinstance(config, settings_type) else settings_type.from_short(config)
        BaseLossModifier.__init__(self, config if isinstance(config, Mapping) else settings.short())
        self.settings = settings
        for field in dataclasses.fields(settings):
            setattr(self, field.name, getattr(settings, field.name))
        self.enabled = settings.enabled  # a field, or derived (SNR: a scheme other than "constant")
        return settings

    @abc.abstractmethod
    def modify_loss(self, logits: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor, **kwargs: Any
                    ) -> torch.Tensor:
        """Return the modified 0-d loss (phase 4 for classes that override no phase hook)."""

    @abc.abstractmethod
    def get_metrics(self) -> dict[str, Any]:
        """Metrics of the last call: detached 0-d tensors for built-ins; floats are allowed for user classes."""

    def is_enabled(self) -> bool:
        """Whether the modifier takes part in the pipeline."""
        return bool(self.enabled)

    def reset_metrics(self) -> None:
        """Forget the metrics of the last call."""
        self._metrics = {}

    # ---- optional phase hooks ---------------------------------------------------------------------------------
    def per_token_loss(self, ctx: ModifierContext) -> torch.Tensor:
        """Phase 1: the ``(B, T)`` per-token loss ``ℓ`` from ``ctx.stats`` (default: plain CE ``ctx.stats.nll``)."""
        assert ctx.stats is not None
        return ctx.stats.nll

    def weights(self, ctx: ModifierContext) -> Weights:
        """Phase 2: the weights this modifier contributes (default: none)."""
        return Weights()

    # ---- hooks the pipeline consults before the statistics pass ------------------------------------------------
    def stats_options(self) -> dict[str, Any]:
        """Extra keyword arguments for ``kernels.token_stats`` (e.g. ``smoothing_exclude``)."""
        return {}

    def restrict_valid(self, targets: torch.Tensor) -> torch.Tensor | None:
        """A bool ``(B, T)`` factor ANDed into the validity mask ``m``, or None."""
        return None

    def check_num_classes(self, num_classes: int) -> None:
        """Validate settings that depend on V, at the first call (raise ``ConfigError``)."""

    # ---- hooks the pipeline consults after the statistics pass -------------------------------------------------
    def bad_rows(self, ctx: ModifierContext) -> torch.Tensor | None:
        """A bool ``(B, T)`` device mask of valid rows this modifier cannot use (e.g. −inf inside its smoothing
        support), ORed into the pipeline's ``bad`` flag without a host read; None when there are none."""
        return None

    def explain_bad(self, logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> None:
        """Raise the precise ``LossInputError`` for the rows ``bad_rows`` flagged (may read values: it runs only
        once something is known to be wrong)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, enabled={self.enabled})"


def _overrides(mod: BaseLossModifier, hook: str) -> bool:
    return getattr(type(mod), hook) is not getattr(BaseLossModifier, hook)


def phase_of(mod: BaseLossModifier) -> int:
    """The phase a modifier belongs to: 1 (per-token loss), 2 (weights) or 4 (``modify_loss`` on the scalar)."""
    if _overrides(mod, "per_token_loss"):
        return 1
    if _overrides(mod, "weights"):
        return 2
    return 4


class MaskedSummary(NamedTuple):
    """Population statistics of the kept entries of a tensor (0-d tensors; each 0 when nothing is kept)."""

    mean: torch.Tensor
    min: torch.Tensor
    max: torch.Tensor
    std: torch.Tensor


def masked_summary(x: torch.Tensor, keep: torch.Tensor, count: torch.Tensor | None = None) -> MaskedSummary:
    """Mean, min, max and population std of ``x`` over the bool mask ``keep`` (same shape), without a host sync.

    The built-ins' metrics (entropy over valid positions, mask ratios and weights over non-empty sequences, SNR
    weights over non-empty examples) all take this shape. ``count`` is ``keep.sum()`` when the caller has it.
    Plain torch, for a non-empty selection::

        k = x[keep]; MaskedSummary(k.mean(), k.min(), k.max(), k.std(unbiased=False))
    """
    if count is None:
        count = keep.sum()
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    inf = torch.full((), float("inf"), dtype=x.dtype, device=x.device)
    n = count.clamp_min(1).to(x.dtype)
    mean = torch.where(keep, x, zero).sum() / n
    std = (torch.where(keep, (x - mean) ** 2, zero).sum() / n).sqrt()
    # torch.where over the count, not an `if`: an empty selection must not read the count to the host
    some = count > 0
    mn = torch.where(some, torch.where(keep, x, inf).amin(), zero)
    mx = torch.where(some, torch.where(keep, x, -inf).amax(), zero)
    return MaskedSummary(mean, mn, mx, std)
