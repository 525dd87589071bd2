"""Loss modules: ``nn.Module`` s that hold settings and call ``losskit.kernels`` (no math of their own)."""

from __future__ import annotations

import contextlib
import numbers
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from losskit import kernels
from losskit.contract import (
    REDUCTIONS,
    SMOOTHING_CONVENTIONS,
    LossInputError,
    check_choice,
    check_ignore_index,
    check_logits_target,
    validity_mask,
)
from losskit.functional import reduce
from losskit.functional.cross_entropy import exclude_ids
from losskit.hooks import EnergyRecorder, EnergyStats


class LabelSmoothedCrossEntropy(nn.Module):
    """Label-smoothed cross-entropy (seed 004, corrected), in closed form.

    Per valid token, with ε = ``epsilon``, support A = [0, V) minus ``smoothing_exclude`` (K = |A|) and the
    ``"torch"`` convention (the notebook's intended ``q = (1-ε)·onehot + ε/V`` when nothing is excluded)::

        ℓ = (1 - ε)·CE + ε·(lse - mean_{c∈A} z_c)

    averaged over the tokens whose target is not ``ignore_index`` (``ignore_index=None``: over all tokens).
    ``smoothing_convention="fairseq"`` spreads ε over A without the target (ε/(K-1) each). The dense target
    distribution is never built. Equivalent plain torch (``smoothing_exclude=()``, ``"torch"``)::

        F.cross_entropy(logits.flatten(0, -2), target.flatten(), ignore_index=ignore_index,
                        label_smoothing=epsilon, reduction=reduction)

    except that an all-ignored batch gives an exact, graph-connected 0 and an ``EmptyBatchWarning`` (torch: NaN).

    Fixed relative to the notebook: ``forward`` was nested in ``__init__`` (the cell never compiled), the typo
    ``oss = loss.sum(-1)`` left a (B, T, V) loss, ``scatter_`` crashed on -100 targets, an all-padding batch gave
    NaN, and the one-hot target was materialised densely.

    Args:
        epsilon: smoothing factor ε in [0, 1).
        ignore_index: target value without supervision (seed 004 used 0 for padding); None ignores nothing.
            The ignored id's column still receives smoothing mass, as in torch; add it to ``smoothing_exclude``
            to keep mass off it.
        reduction: "mean" (over valid tokens), "sum" or "none" (per token, zeros where ignored).
        smoothing_convention: "torch" or "fairseq".
        smoothing_exclude: class ids that receive no smoothing mass; tokens whose target is one of them keep a
            hard target.
    """

    def __init__(
        self,
        epsilon: float = 0.1,
        ignore_index: int | None = -100,
        reduction: str = "mean",
        smoothing_convention: str = "torch",
        smoothing_exclude: Iterable[int] = (),
    ) -> None:
        super().__init__()
        if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not 0.0 <= float(epsilon) < 1.0:
            raise LossInputError(f"epsilon must be in [0, 1), got {epsilon!r}")
        check_ignore_index(ignore_index)
        check_choice("reduction", reduction, REDUCTIONS)
        check_choice("smoothing_convention", smoothing_convention, SMOOTHING_CONVENTIONS)
        self.epsilon = float(epsilon)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.smoothing_convention = smoothing_convention
        # types and signs now; the upper bound V is checked against the logits at the first call
        self.smoothing_exclude = exclude_ids(smoothing_exclude, None, name="smoothing_exclude")

    def forward(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Loss of ``logits`` (N, V) or (B, T, V) against ``target`` (N,) or (B, T); ``mask`` (bool, the leading
        shape) removes positions too."""
        return kernels.cross_entropy(
            logits,
            target,
            mask=mask,
            ignore_index=self.ignore_index,
            label_smoothing=self.epsilon,
            smoothing_convention=self.smoothing_convention,
            smoothing_exclude=self.smoothing_exclude,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return (
            f"epsilon={self.epsilon}, ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"smoothing_convention={self.smoothing_convention!r}, smoothing_exclude={self.smoothing_exclude}"
        )


# ------------------------------------------------------------------------------------------------------------
# Temporal losses of seed 003 (DynVision): docs/temporal.md
# ------------------------------------------------------------------------------------------------------------

INPUT_CHECKS: tuple[str, ...] = ("immediate", "deferred")
_TEMPORAL_NORMALIZERS: tuple[str, ...] = ("tokens", "weights")


class BaseLoss(nn.Module):
    """Base of the temporal losses: holds ``reduction`` and picks the denominator of the mean.

    Seed 003's ``apply_reduction``, corrected so that a zero count gives a graph-connected zero (the reference
    returned a detached ``tensor(0.0)`` and ``backward()`` failed). The arithmetic is
    ``functional.reduce.masked_mean``.

    Args:
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        check_choice("reduction", reduction, REDUCTIONS)
        self.reduction = reduction

    def apply_reduction(
        self, loss: torch.Tensor, num_valid_timesteps: int | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Reduce ``loss`` (entries at invalid positions must be exactly 0).

        ``"none"``: unchanged. ``"sum"``: ``loss.sum()``. ``"mean"`` with a count n: ``loss.sum() / n`` (the
        seed's ``loss.sum() / float(num_valid_timesteps)``); a Python n <= 0 gives ``loss.sum() * 0`` and one
        ``EmptyBatchWarning``; a tensor n gives ``torch.where(n > 0, s / n, s * 0)`` without a sync (and
        without a warning, which would need one). ``"mean"`` without a count: ``loss.mean()``, and an empty
        ``loss`` gives the graph-connected zero plus the warning (torch: NaN).
        """
        if self.reduction == "none":
            return loss
        if self.reduction == "sum":
            return loss.sum()
        everywhere = torch.ones_like(loss, dtype=torch.bool)
        if num_valid_timesteps is None:
            if loss.numel() == 0:
                reduce.warn_empty(0, stacklevel=2)
                return loss.sum() * 0
            return reduce.masked_mean(loss, everywhere)
        if isinstance(num_valid_timesteps, torch.Tensor):
            return reduce.masked_mean(loss, everywhere, denominator=num_valid_timesteps)
        count = int(num_valid_timesteps)
        if count <= 0:
            reduce.warn_empty(0, stacklevel=2)
            return loss.sum() * 0
        return reduce.masked_mean(loss, everywhere, denominator=count)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class CrossEntropyLoss(BaseLoss):
    """Temporal cross-entropy normalised by the number of valid timesteps (seed 003).

    Per step ``ℓ_n = w[y_n] · (logsumexp(x_n) − x_n[y_n])`` where ``y_n != ignore_index`` and ``mask`` is True,
    exactly 0 elsewhere (``w ≡ 1`` without ``weight``). ``"mean"`` divides ``Σ ℓ`` by the number C of valid
    steps over the whole batch (``num_valid_timesteps`` overrides C, e.g. with a count over all micro-batches
    of a step), or by ``Σ_valid w[y_n]`` with ``normalize="weights"``. No valid step gives a graph-connected 0
    and an ``EmptyBatchWarning`` (torch: NaN). Equivalent plain torch (``weight=None``, ``mask=None``, C > 0)::

        F.cross_entropy(logits.reshape(-1, V), target.reshape(-1), ignore_index=ignore_index,
                        reduction=reduction)  # "none" reshaped to target.shape

    and with ``weight`` and ``normalize="weights"``, ``F.cross_entropy(..., weight=weight)``. The math is
    ``losskit.kernels.cross_entropy`` with ``token_weight = weight[target]``.

    Args:
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (zeros at invalid steps, the target's shape).
        ignore_index: label without supervision; −1 as in the seed (labels masked by a
            ``PresentationSchedule`` carry −1).
        weight: optional float ``(V,)`` class weights.
        normalize: ``"tokens"`` (the seed's count) or ``"weights"`` (torch's class-weighted mean).
        input_checks: ``"immediate"`` (one host read per call: out-of-range targets raise ``LossInputError``,
            an empty batch warns) or ``"deferred"`` (no sync; ``last_flags`` holds device flags that the
            trainer reads where it syncs anyway).
    """

    def __init__(
        self,
        reduction: str = "mean",
        ignore_index: int = -1,
        weight: torch.Tensor | None = None,
        normalize: str = "tokens",
        input_checks: str = "immediate",
    ) -> None:
        super().__init__(reduction)
        check_choice("normalize", normalize, _TEMPORAL_NORMALIZERS)
        check_choice("input_checks", input_checks, INPUT_CHECKS)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise LossInputError(f"ignore_index must be an int, got {ignore_index!r}")
        if weight is not None:
            if not isinstance(weight, torch.Tensor):
                weight = torch.as_tensor(weight, dtype=torch.float32)
            if weight.dim() != 1 or not weight.is_floating_point():
                raise LossInputError(
                    f"weight must be a 1-D float tensor of class weights (V,), got {weight.dtype} "
                    f"{tuple(weight.shape)}"
                )
        self.ignore_index = ignore_index
        self.normalize = normalize
        self.input_checks = input_checks
        self.register_buffer("weight", weight)
        self.last_flags: dict[str, torch.Tensor] | None = None

    def _token_weight(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
        if self.weight is None:
            return None
        num_classes = logits.shape[-1]
        if self.weight.shape[0] != num_classes:
            raise LossInputError(
                f"weight must have one entry per class (V={num_classes}), got {self.weight.shape[0]} entries"
            )
        # Clamped gather: ignored targets (−1, −100) must not index the weights (−1 would silently read the
        # last class); their loss is zeroed by the validity mask anyway.
        weight = self.weight.to(device=logits.device)
        return weight[target.long().clamp(0, num_classes - 1)]

    def forward(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        num_valid_timesteps: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of ``logits`` ``(N, V)`` or ``(B, T, V)`` against ``target`` ``(N,)`` or ``(B, T)``."""
        check_logits_target(logits, target, mask=mask)
        token_weight = self._token_weight(logits, target)
        override = self.reduction == "mean" and num_valid_timesteps is not None
        if self.input_checks == "deferred":
            return self._deferred(logits, target, mask, token_weight, num_valid_timesteps if override else None)
        loss = kernels.cross_entropy(logits, target, **self._kernel_inputs(mask, token_weight),
                                     reduction="sum" if override else self.reduction, normalize=self.normalize)
        return self.apply_reduction(loss, num_valid_timesteps) if override else loss

    def _kernel_inputs(self, mask, token_weight) -> dict:
        """What both paths hand the kernels besides logits and target."""
        return {"ignore_index": self.ignore_index, "mask": mask, "token_weight": token_weight}

    def _deferred(self, logits, target, mask, token_weight, count) -> torch.Tensor:
        """The no-sync path: ``kernels.fused_token_loss`` with the denominator passed as its normalizer."""
        valid = validity_mask(target, ignore_index=self.ignore_index, mask=mask)
        dtype = torch.promote_types(logits.dtype, torch.float32)  # the kernels' accumulation dtype
        if self.reduction == "mean":
            if count is None:
                denominator = reduce.normalizer(valid, weight=token_weight, normalize=self.normalize, dtype=dtype)
            else:
                denominator = torch.as_tensor(count, dtype=dtype, device=logits.device)
            positive = denominator > 0
            normalizer = torch.where(positive, denominator, torch.ones_like(denominator))
        else:
            positive, normalizer = None, None
        fused = kernels.fused_token_loss(logits, target, **self._kernel_inputs(mask, token_weight), normalizer=normalizer,
                                         reduction="none" if self.reduction == "none" else "sum")
        loss = fused.loss
        if positive is not None:
            # A zero override count: the seed's s / n would be NaN; give the graph-connected zero instead.
            loss = torch.where(positive, loss, loss * 0)
        self.last_flags = {"bad": fused.stats.bad.any(), "empty": ~fused.stats.valid.any()}
        return loss

    def extra_repr(self) -> str:
        weight = None if self.weight is None else tuple(self.weight.shape)
        return (
            f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, weight={weight}, "
            f"normalize={self.normalize!r}, input_checks={self.input_checks!r}"
        )


class EnergyLoss(BaseLoss):
    """Activation-energy regulariser recorded with forward hooks (seed 003).

    For module m and hook call c with output a of shape ``(B, *S)`` (``n = prod(S)``, recomputed every call)::

        e_{m,c}[b] = ||a[b]||_p / d(n)      d(n) = n ("n_units", the seed's formula) or n^(1/p) ("root")
        E[b] = (1/M) Σ_m (1/T_m) Σ_c e_{m,c}[b]

    then ``mean_b E`` / ``Σ_b E`` / ``E`` for ``"mean"`` / ``"sum"`` / ``"none"``. With every module called T
    times this is the seed's ``Σ_t Σ_m (||a||_p / n_units) / (M·T)``. Plain torch, for recorded outputs
    ``acts[m]`` (a list per module)::

        E = sum(sum(a.flatten(1).abs().pow(p).sum(1).pow(1/p) / d(a[0].numel()) for a in acts[m]) / len(acts[m])
                for m in acts) / len(acts)

    Use ``register_hooks(model)`` (seed mode: every forward accumulates until the next loss call) or
    ``with energy.recording(model): ...`` (hooks live only in the block). The loss call combines and clears.
    ``outputs``/``targets`` are accepted and ignored, as in the seed.

    Args:
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per sample, ``(B,)``).
        p: norm order, finite and >= 1.
        unit_norm: ``"n_units"`` or ``"root"`` (the reference code's divisor; same as n_units for p = 1).
        select: ``"auto"`` (Conv1d/2d/3d, ConvTranspose2d, Linear, plus ``monitor_energy``-marked modules) or
            ``"marked"`` (marked modules only).
        exclude: fnmatch patterns of qualified module names to leave out (e.g. ``["readout"]``).
        track_activity: also record ``max |a|`` per module into ``last_stats.act_max``.
    """

    def __init__(
        self,
        reduction: str = "mean",
        p: float = 1,
        *,
        unit_norm: str = "n_units",
        select: str = "auto",
        exclude: Iterable[str] = (),
        track_activity: bool = False,
    ) -> None:
        super().__init__(reduction)
        self._recorder = EnergyRecorder(
            p,
            unit_norm=unit_norm,
            select=select,
            exclude=exclude,
            track_activity=track_activity,
            owner=type(self).__name__,
        )

    @property
    def p(self) -> float:
        return self._recorder.p

    @property
    def hooked_modules(self) -> tuple[str, ...]:
        """Qualified names of the modules hooked by the last ``register_hooks``/``recording``."""
        return self._recorder.hooked_modules

    @property
    def last_stats(self) -> EnergyStats | None:
        """Detached per-module statistics of the last loss call."""
        return self._recorder.last_stats

    def register_hooks(self, model: nn.Module) -> None:
        """Seed mode: remove this loss's old hooks and hook ``model``; every forward accumulates."""
        self._recorder.register_hooks(model)

    def remove_hooks(self) -> None:
        """Remove every hook of this loss (idempotent)."""
        self._recorder.remove_hooks()

    def recording(self, model: nn.Module) -> contextlib.AbstractContextManager[EnergyLoss]:
        """Scoped mode: ``with energy.recording(model): out = model(x)``; hooks are removed on exit."""
        return self._recorder.recording(model, self)

    def forward(self, outputs=None, targets=None) -> torch.Tensor:
        """Combine and clear what was recorded since the window began; arguments are ignored."""
        energy = self._recorder.take()
        if energy is None:
            warnings.warn(
                f"{type(self).__name__}: nothing was recorded since the last loss call (no hooks installed, or "
                "no forward through a hooked module); the loss is 0",
                UserWarning,
                stacklevel=2,
            )
            return self._recorder.zero((0,) if self.reduction == "none" else ())
        return self.apply_reduction(energy)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # a destructor must never raise
            self._recorder.remove_hooks()

    def extra_repr(self) -> str:
        r = self._recorder
        return (
            f"reduction={self.reduction!r}, p={r.p}, unit_norm={r.unit_norm!r}, select={r.select!r}, "
            f"exclude={list(r.exclude)}, track_activity={r.track_activity}"
        )


class ActivityLoss(EnergyLoss):
    """``EnergyLoss`` over opt-in modules only (the reference's ActivityLoss): ``select="marked"`` by default.

    Mark modules with ``losskit.hooks.monitor_energy(module)`` (the reference's ``_activity_monitor =
    "absolute"`` attribute counts as a mark too). Takes the arguments of ``EnergyLoss``.
    """

    def __init__(self, *args, select: str = "marked", **kwargs) -> None:
        # Only the default of ``select`` differs; every other argument is EnergyLoss's, with its defaults.
        super().__init__(*args, select=select, **kwargs)
