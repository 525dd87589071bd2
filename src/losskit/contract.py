"""The shared vocabulary of losskit: result types, error types and input checks.

Everything above this module (functional, kernels, modifiers, losses, the trainer and the service) speaks
in these types. This module imports only torch and the standard library.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from typing import Any, Literal

import torch

Reduction = Literal["none", "sum", "mean"]
REDUCTIONS: tuple[str, ...] = ("none", "sum", "mean")
Normalize = Literal["tokens", "weights", "global_tokens"]
NORMALIZERS: tuple[str, ...] = ("tokens", "weights", "global_tokens")
SMOOTHING_CONVENTIONS: tuple[str, ...] = ("torch", "fairseq")


class LossInputError(ValueError):
    """Bad input to a loss: wrong shape, dtype, out-of-range target, non-finite logits.

    The message names the argument, the expected and the actual value.
    """


class ConfigError(ValueError):
    """A configuration key or value is invalid (unknown key, wrong type, out of range)."""


class EmptyBatchWarning(UserWarning):
    """A batch had no valid target positions; its loss is an exact, graph-connected 0."""


EMPTY_BATCH_MESSAGE = "no valid target positions; loss is 0"


@dataclasses.dataclass(frozen=True)
class TokenStats:
    """Per-token statistics of one streaming pass over the logits.

    Every field has the leading shape of the logits. Float fields are fp32 (fp64 for fp64 logits) and exactly
    0 at invalid rows.

    Attributes:
        valid: bool validity mask, ``mask & (target != ignore_index)``.
        lse: ``log Σ_i exp(z_i)``.
        target_logit: ``z_y``.
        nll: ``-log p_y``, computed stably.
        log1m_target_prob: ``log(1 - p_y)``, stable as ``p_y -> 1``.
        support_mean_logit: ``(1/K) Σ_{i∈A} z_i`` over the smoothing support A.
        entropy: ``H(p)``.
        wrong_entropy: ``H(q)``, the entropy of p renormalised over the columns ``i != y``.
        support_gap: ``(1/K) Σ_{i∈A} (z_i − z_y)``, the support mean minus the target logit, accumulated
            against ``z_y`` so that a common offset of the logits cancels exactly (``support_mean_logit −
            target_logit`` would lose it to rounding). The label-smoothing term is ``ε·support_gap``.
        argmax: int64 argmax over all columns (lowest index on ties), -1 at invalid rows.
        correct: ``argmax == target`` at valid rows.
        bad: valid row with an out-of-range target or a non-finite lse/target logit (or, with smoothing,
            a non-finite support mean).
    """

    valid: torch.Tensor
    lse: torch.Tensor
    target_logit: torch.Tensor
    nll: torch.Tensor
    log1m_target_prob: torch.Tensor
    support_mean_logit: torch.Tensor
    entropy: torch.Tensor
    wrong_entropy: torch.Tensor
    support_gap: torch.Tensor
    argmax: torch.Tensor
    correct: torch.Tensor
    bad: torch.Tensor

    FLOAT_FIELDS = (
        "lse",
        "target_logit",
        "nll",
        "log1m_target_prob",
        "support_mean_logit",
        "entropy",
        "wrong_entropy",
        "support_gap",
    )

    def detach(self) -> TokenStats:
        """The same statistics with every float field detached from the graph."""
        return dataclasses.replace(self, **{f: getattr(self, f).detach() for f in self.FLOAT_FIELDS})


@dataclasses.dataclass(frozen=True)
class FusedLoss:
    """Result of ``kernels.fused_token_loss``.

    Attributes:
        loss: the reduced loss (``reduction="sum"``: Σ ℓ_t / normalizer) or per-token ℓ_t (``"none"``).
        token_loss: detached, unweighted per-token ``CE_ε + λ·lse²`` (0 at invalid rows).
        stats: detached ``TokenStats`` of the same pass.
    """

    loss: torch.Tensor
    token_loss: torch.Tensor
    stats: TokenStats


@dataclasses.dataclass(frozen=True)
class CrossEntropyParts:
    """``cross_entropy(..., return_parts=True)``: the loss and its reduced components.

    Attributes:
        loss: the loss, as without ``return_parts``.
        nll: the plain (unsmoothed) CE, reduced the same way, weighted by ``token_weight``.
        smooth: the smoothing term ``ℓ^ε - CE``, reduced the same way (0 when ε = 0).
        z_loss: the z-loss term ``λ·lse²``, reduced the same way.
        num_valid: 0-d int64 tensor, the number of valid positions.
    """

    loss: torch.Tensor
    nll: torch.Tensor
    smooth: torch.Tensor
    z_loss: torch.Tensor
    num_valid: torch.Tensor


@dataclasses.dataclass(frozen=True)
class StepCounts:
    """Valid tokens and non-empty sequences of one optimizer step (all micro-batches, all ranks).

    All are 0-d int64 tensors, kept on the device so that no host sync is needed.

    Attributes:
        tokens: positions the (modified) loss averages over.
        sequences: sequences with at least one such position.
        base_tokens: positions of the unmodified basis (``target != ignore_index`` and ``mask``), when a padding
            token is excluded from ``tokens``; None when the two agree. Plain-CE metrics (``loss_raw``) use it,
            so their numerator and denominator count the same positions.
    """

    tokens: torch.Tensor
    sequences: torch.Tensor
    base_tokens: torch.Tensor | None = None

    def base(self) -> StepCounts:
        """The counts of the unmodified basis: ``tokens`` replaced by ``base_tokens`` (itself if None)."""
        if self.base_tokens is None:
            return self
        return StepCounts(tokens=self.base_tokens, sequences=self.sequences)


@dataclasses.dataclass(frozen=True)
class LossFnOutput:
    """What a registry or service loss returns (seed 002).

    Attributes:
        loss: 0-d tensor that is back-propagated.
        logprobs: per-token log-probabilities of the targets (or any relevant logprobs).
        diagnostics: metrics for logging (floats or detached 0-d tensors).
    """

    loss: torch.Tensor
    logprobs: torch.Tensor | None = None
    diagnostics: Mapping[str, Any] = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------
# Input checks. Shape and dtype checks never read tensor values (no host sync); value checks do, and are
# called only where a sync is acceptable (eager functional calls, or once per optimizer step).
# --------------------------------------------------------------------------------------------------------


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise ``LossInputError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise LossInputError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")


def check_logits_target(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
) -> None:
    """Check shapes and dtypes of a cross-entropy-family call (no value reads, no sync).

    ``logits`` is ``(N, V)`` or ``(B, T, V)`` floating point with ``V >= 2``; ``target`` is an integer tensor
    with the leading shape; ``mask`` (bool) and ``token_weight`` (float) have the leading shape too.
    """
    if not isinstance(logits, torch.Tensor):
        raise LossInputError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(target, torch.Tensor):
        raise LossInputError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if logits.dim() not in (2, 3):
        raise LossInputError(
            f"logits must have shape (N, V) or (B, T, V), got {tuple(logits.shape)} ({logits.dim()} dims)"
        )
    if not logits.is_floating_point():
        raise LossInputError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.shape[-1] < 2:
        raise LossInputError(f"logits must have at least 2 classes (V >= 2), got V={logits.shape[-1]}")
    lead = tuple(logits.shape[:-1])
    if tuple(target.shape) != lead:
        raise LossInputError(
            f"target must have the leading shape of logits {lead}, got {tuple(target.shape)}"
        )
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise LossInputError(f"target must be an integer tensor (int64), got dtype {target.dtype}")
    if target.device != logits.device:
        raise LossInputError(f"target must be on the device of logits ({logits.device}), got {target.device}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise LossInputError(f"mask must be a bool tensor, got {got}")
        if tuple(mask.shape) != lead:
            raise LossInputError(f"mask must have the leading shape of logits {lead}, got {tuple(mask.shape)}")
    if token_weight is not None:
        if not isinstance(token_weight, torch.Tensor) or not token_weight.is_floating_point():
            got = token_weight.dtype if isinstance(token_weight, torch.Tensor) else type(token_weight).__name__
            raise LossInputError(f"token_weight must be a floating-point tensor, got {got}")
        if tuple(token_weight.shape) != lead:
            raise LossInputError(
                f"token_weight must have the leading shape of logits {lead}, got {tuple(token_weight.shape)}"
            )


def validity_mask(
    target: torch.Tensor, *, ignore_index: int | None = -100, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The one validity mask of a call: ``(target != ignore_index) & mask`` (bool, leading shape)."""
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    if mask is not None:
        valid = valid & mask
    return valid


def _position(index: int, lead_shape: tuple[int, ...]) -> str:
    """Format a flat row index as ``(b=.., t=..)``; 2-D input ``(N, V)`` reads as ``(b=n, t=0)``."""
    if len(lead_shape) == 2:
        b, t = divmod(index, lead_shape[1])
        return f"(b={b}, t={t})"
    return f"(b={index}, t=0)"


def check_target_range(target: torch.Tensor, valid: torch.Tensor, num_classes: int) -> None:
    """Raise ``LossInputError`` if a valid target lies outside ``[0, V)``. Reads values (one host sync)."""
    out = valid & ((target < 0) | (target >= num_classes))
    if bool(out.any()):
        flat = out.reshape(-1)
        first = int(flat.nonzero()[0, 0])
        value = int(target.reshape(-1)[first])
        raise LossInputError(
            f"target: {int(flat.sum())} value(s) outside [0, V={num_classes}) at valid positions, first "
            f"{value} at {_position(first, tuple(target.shape))}; expected class ids in [0, {num_classes})"
        )


def check_finite_logits(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    *,
    smoothing_support: torch.Tensor | None = None,
    smoothing_key: str = "smoothing_exclude",
) -> None:
    """Raise ``LossInputError`` for non-finite logits that would make a loss term non-finite.

    Checked on valid rows only: NaN or +inf anywhere raises; -inf is a legal masked
    class except at the target column, or inside the smoothing support when smoothing is on
    (``smoothing_support`` is then the bool (V,) indicator of the support). Reads values (one host sync).
    Targets must already be in range.
    """
    lead = tuple(logits.shape[:-1])
    rows = logits.reshape(-1, logits.shape[-1])
    vflat = valid.reshape(-1)
    nan_or_pinf = (torch.isnan(rows) | (rows == float("inf"))) & vflat[:, None]
    count = int(nan_or_pinf.sum())
    if count:
        first = int(nan_or_pinf.any(dim=1).nonzero()[0, 0])
        raise LossInputError(
            f"logits: {count} non-finite values (NaN/+inf) in valid rows, first at {_position(first, lead)}; "
            "expected finite values"
        )
    tflat = target.reshape(-1).clamp(0, logits.shape[-1] - 1).long()
    target_ninf = (rows.gather(1, tflat[:, None]).squeeze(1) == float("-inf")) & vflat
    if bool(target_ninf.any()):
        first = int(target_ninf.nonzero()[0, 0])
        raise LossInputError(
            f"logits: -inf at the target column in {int(target_ninf.sum())} valid row(s), first at "
            f"{_position(first, lead)} (column {int(tflat[first])}); the loss would be inf"
        )
    if smoothing_support is not None:
        ninf = (rows == float("-inf")) & smoothing_support[None, :] & vflat[:, None]
        if bool(ninf.any()):
            row = int(ninf.any(dim=1).nonzero()[0, 0])
            col = int(ninf[row].nonzero()[0, 0])
            raise LossInputError(
                f"logits: {int(ninf.sum())} -inf values (inf) inside the label-smoothing support in valid rows, "
                f"first at {_position(row, lead)} column {col}; the smoothed loss would be inf. Exclude such "
                f"columns from smoothing with {smoothing_key}"
            )


def explain_bad_rows(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, *, smoothing_support: torch.Tensor | None = None
) -> None:
    """Raise the first specific ``LossInputError`` of a batch found bad: a valid target outside ``[0, V)``
    (``check_target_range``), then a non-finite logit (``check_finite_logits``). Returns if neither applies.

    The one explanation every fused loss gives after its single host read said "bad"; it reads values.
    """
    check_target_range(target, valid, logits.shape[-1])
    check_finite_logits(logits, target, valid, smoothing_support=smoothing_support)


def check_ignore_index(ignore_index: Any) -> None:
    """Raise ``LossInputError`` unless ``ignore_index`` is an integer (not a bool) or None."""
    if ignore_index is not None and (
        isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral)
    ):
        raise LossInputError(f"ignore_index must be an int or None, got {ignore_index!r}")
