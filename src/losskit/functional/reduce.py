"""Masked reductions, normalisers and step counts: the only place in losskit where a mean is taken.

Every loss produces per-token values that are exactly 0 at invalid positions; it then calls one function of
this module to reduce them. Keeping the denominators here means there is one
definition of "the number of tokens" for every loss, modifier and metric, and one place that makes empty
batches safe.

Empty batches: denominators are ``max(count, 1)`` (or ``D if D > 0 else 1`` for weight sums), computed with
``clamp_min`` / ``torch.where`` on the device, so an empty batch gives an exact, graph-connected 0 without a
host sync and without NaN.

``normalize="global_tokens"`` divides by step-level counts (``StepCounts``, built by ``step_counts`` from all
micro-batches of an optimizer step and all ranks). Each call then returns its share ``Σ_local / D_step`` and
the shares of a step sum to the loss of the whole step, however the step is split into micro-batches or
ranks (huggingface/transformers#34191, pytorch/torchtune PR #1875).
"""

from __future__ import annotations

import numbers
import operator
import warnings
from collections.abc import Callable, Sequence

import torch

from losskit.contract import (
    EMPTY_BATCH_MESSAGE,
    NORMALIZERS,
    EmptyBatchWarning,
    LossInputError,
    StepCounts,
    check_choice,
    validity_mask,
)

__all__ = [
    "check_once",
    "masked_mean",
    "masked_sum",
    "normalizer",
    "sequence_mean",
    "step_counts",
    "warn_empty",
]

SEQUENCE_NORMALIZERS: tuple[str, ...] = ("tokens", "global_tokens")


def _check_valid(valid: torch.Tensor, name: str = "valid") -> None:
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
        got = valid.dtype if isinstance(valid, torch.Tensor) else type(valid).__name__
        raise LossInputError(f"{name} must be a bool tensor, got {got}")


def _check_same_shape(name: str, value: torch.Tensor, valid: torch.Tensor) -> None:
    if not isinstance(value, torch.Tensor):
        raise LossInputError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if tuple(value.shape) != tuple(valid.shape):
        raise LossInputError(
            f"{name} must have the shape of valid {tuple(valid.shape)}, got {tuple(value.shape)}"
        )


def _check_step_counts(step_counts: StepCounts | None, normalize: str) -> StepCounts:
    if step_counts is None:
        raise LossInputError(
            f'step_counts is required with normalize="{normalize}" (build it with '
            "losskit.functional.step_counts(micro_targets, ...)), got None"
        )
    if not isinstance(step_counts, StepCounts):
        raise LossInputError(
            f"step_counts must be a losskit.contract.StepCounts, got {type(step_counts).__name__}"
        )
    return step_counts


def _float_dtype(dtype: torch.dtype | None, *candidates: torch.Tensor | None) -> torch.dtype:
    """The requested dtype, else the first floating candidate's dtype, else the default float dtype."""
    if dtype is not None:
        return dtype
    for c in candidates:
        if c is not None and c.is_floating_point():
            return c.dtype
    return torch.get_default_dtype()


def normalizer(
    valid: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    normalize: str = "tokens",
    step_counts: StepCounts | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The denominator D of a token mean, as a 0-d tensor on the device (no host sync).

    ``"tokens"``: ``D = max(Σ valid, 1)``. ``"weights"``: ``D = Σ valid·weight`` where ``D > 0``, else 1
    (``weight=None`` counts tokens). ``"global_tokens"``: ``D = max(step_counts.tokens, 1)``.

    Source: docs/modifiers.md. The clamps make an empty batch's mean an exact 0.

    Args:
        valid: bool validity mask, any shape.
        weight: float per-position weights of the shape of ``valid`` (``"weights"`` only; zeros or NaN at
            invalid positions are ignored).
        normalize: ``"tokens"``, ``"weights"`` or ``"global_tokens"``.
        step_counts: the step's ``StepCounts`` (required for ``"global_tokens"``).
        dtype: dtype of the result; default ``weight``'s dtype, else the default float dtype.

    Returns:
        0-d tensor D of ``dtype``. It is graph-connected to ``weight`` under ``"weights"``.
    """
    check_choice("normalize", normalize, NORMALIZERS)
    _check_valid(valid)
    out_dtype = _float_dtype(dtype, weight)
    if normalize == "global_tokens":
        sc = _check_step_counts(step_counts, normalize)
        return sc.tokens.to(device=valid.device).clamp_min(1).to(out_dtype)
    if normalize == "weights" and weight is not None:
        _check_same_shape("weight", weight, valid)
        # torch.where, not valid * weight: weights at invalid positions may be NaN/inf (e.g. cw[-100]).
        total = torch.where(valid, weight, torch.zeros((), dtype=weight.dtype, device=weight.device)).sum()
        total = total.to(out_dtype)
        return torch.where(total > 0, total, torch.ones_like(total))
    return valid.sum().clamp_min(1).to(out_dtype)


def masked_sum(x: torch.Tensor, valid: torch.Tensor, *, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ valid·weight·x`` as a 0-d tensor; NaN/inf at invalid positions never leak.

    Plain torch: ``(torch.where(valid, x, 0) * torch.where(valid, weight, 0)).sum()``.

    Args:
        x: float values, any shape.
        valid: bool mask of the shape of ``x``.
        weight: optional float weights of the shape of ``x``.
    """
    _check_valid(valid)
    _check_same_shape("x", x, valid)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    # Mask both factors before multiplying: a NaN at an invalid position of either would otherwise reach the
    # other factor's gradient (0 * NaN), even though the forward value is masked.
    out = torch.where(valid, x, zero)
    if weight is not None:
        _check_same_shape("weight", weight, valid)
        out = out * torch.where(valid, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
    return out.sum()


def masked_mean(
    x: torch.Tensor,
    valid: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    normalize: str = "tokens",
    step_counts: StepCounts | None = None,
    denominator: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked, optionally weighted mean ``Σ valid·weight·x / D``.

    D comes from ``normalizer(valid, weight=weight, normalize=normalize, step_counts=step_counts)`` unless
    ``denominator`` is given: a number ``n`` gives ``s / n`` (``s·0`` when ``n == 0``); a 0-d tensor ``n``
    gives ``torch.where(n > 0, s / n, s * 0)`` (the division uses a safe ``n`` so no NaN gradient appears).

    Example (seed 004): per-token losses ``[[.5,.2,.3,.1,.6,.4,.8,.9],[.7,.1,.2,.3,.5,.6,.7,.8]]`` with the
    first 6 and 3 positions valid give ``3.1 / 9``.

    Args:
        x: float per-position values, any shape (values at invalid positions are ignored, even NaN).
        valid: bool mask of the shape of ``x``.
        weight: optional float weights of the shape of ``x``; also the denominator under ``"weights"``.
        normalize: ``"tokens"``, ``"weights"`` or ``"global_tokens"``.
        step_counts: ``StepCounts`` of the step (for ``"global_tokens"``).
        denominator: replaces D (e.g. temporal's ``num_valid_timesteps``).

    Returns:
        0-d tensor of ``x``'s dtype.
    """
    check_choice("normalize", normalize, NORMALIZERS)
    total = masked_sum(x, valid, weight=weight)
    if denominator is None:
        d = normalizer(valid, weight=weight, normalize=normalize, step_counts=step_counts, dtype=total.dtype)
        return total / d
    if isinstance(denominator, torch.Tensor):
        if denominator.dim() != 0:
            raise LossInputError(
                f"denominator must be a number or a 0-d tensor, got shape {tuple(denominator.shape)}"
            )
        n = denominator.to(device=total.device, dtype=total.dtype)
        positive = n > 0
        safe = torch.where(positive, n, torch.ones_like(n))
        return torch.where(positive, total / safe, total * 0)
    if isinstance(denominator, bool) or not isinstance(denominator, numbers.Real):
        raise LossInputError(
            f"denominator must be a number or a 0-d tensor, got {type(denominator).__name__}"
        )
    if not denominator >= 0:
        raise LossInputError(f"denominator must be >= 0, got {denominator}")
    return total / denominator if denominator > 0 else total * 0


def sequence_mean(
    x: torch.Tensor,
    valid: torch.Tensor,
    *,
    seq_weight: torch.Tensor | None = None,
    normalize: str = "tokens",
    step_counts: StepCounts | None = None,
) -> torch.Tensor:
    """Mean over non-empty sequences of per-sequence token means (docs/modifiers.md, seed 000).

    ``(1/D_S) Σ_{i∈S} seq_weight_i · (Σ_t m_it x_it / n_i)`` with ``n_i = Σ_t m_it``, ``S = {i : n_i > 0}``
    and ``D_S = max(|S|, 1)`` (``max(step_counts.sequences, 1)`` under ``"global_tokens"``). Empty
    sequences never enter the mean. Plain torch::

        n = valid.sum(-1)
        row = torch.where(valid, x, 0).sum(-1) / n.clamp_min(1)
        torch.where(n > 0, seq_weight * row, 0).sum() / (n > 0).sum().clamp_min(1)

    Args:
        x: float values ``(B, T)``, or ``(N,)`` treated as ``(N, 1)``.
        valid: bool mask of the shape of ``x``.
        seq_weight: optional float ``(B,)`` per-sequence weights (e.g. mask-ratio weights).
        normalize: ``"tokens"`` (``D_S = |S|``) or ``"global_tokens"`` (``D_S = step_counts.sequences``).
        step_counts: ``StepCounts`` of the step (for ``"global_tokens"``).

    Returns:
        0-d tensor of ``x``'s dtype.
    """
    check_choice("normalize", normalize, SEQUENCE_NORMALIZERS)
    _check_valid(valid)
    _check_same_shape("x", x, valid)
    if x.dim() == 1:
        x, valid = x[:, None], valid[:, None]
    elif x.dim() != 2:
        raise LossInputError(f"x must have shape (B, T) or (N,), got {tuple(x.shape)}")
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    n = valid.sum(-1)
    nonempty = n > 0
    row_mean = torch.where(valid, x, zero).sum(-1) / n.clamp_min(1).to(x.dtype)
    if seq_weight is not None:
        if not isinstance(seq_weight, torch.Tensor) or tuple(seq_weight.shape) != (x.shape[0],):
            got = (
                tuple(seq_weight.shape) if isinstance(seq_weight, torch.Tensor) else type(seq_weight).__name__
            )
            raise LossInputError(f"seq_weight must be a tensor of shape ({x.shape[0]},), got {got}")
        row_mean = row_mean * seq_weight
    total = torch.where(nonempty, row_mean, zero).sum()
    if normalize == "global_tokens":
        d = _check_step_counts(step_counts, normalize).sequences.to(device=x.device).clamp_min(1)
    else:
        d = nonempty.sum().clamp_min(1)
    return total / d.to(total.dtype)


def step_counts(
    micro_targets: torch.Tensor | Sequence[torch.Tensor],
    *,
    ignore_index: int | None = -100,
    masks: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
    padding_token: int | None = None,
    group: object | None = None,
) -> StepCounts:
    """Valid tokens and non-empty sequences of one optimizer step, summed over micro-batches and ranks.

    A position is valid where ``target != ignore_index``, ``mask`` is True and (if given)
    ``target != padding_token``. A sequence is a row of a ``(B, T)`` target; ``(N,)`` targets count each
    position as its own sequence. With a ``padding_token``, ``base_tokens`` also counts the positions before
    its exclusion (the basis of plain-CE metrics such as the pipeline's ``loss_raw``). Under
    torch.distributed (``group`` given, or the default group initialised) the packed counts are summed with
    one ``all_reduce(SUM)``. No host sync: the counts stay on the device.

    Args:
        micro_targets: the targets of every micro-batch of the step (one tensor, or a sequence of them).
        ignore_index: target value without supervision (None: none).
        masks: optional bool masks, one per micro-batch (None entries allowed), or one tensor for one batch.
        padding_token: a target value excluded too (seed 000's ``target_smoothing_padding_token``).
        group: process group for the all-reduce (default: the default group, when initialised).

    Returns:
        ``StepCounts(tokens, sequences, base_tokens)``, 0-d int64 tensors on the targets' device
        (``base_tokens`` None without a padding token).
    """
    if isinstance(micro_targets, torch.Tensor):
        micro_targets = [micro_targets]
        if masks is not None and isinstance(masks, torch.Tensor):
            masks = [masks]
    micro_targets = list(micro_targets)
    if not micro_targets:
        raise LossInputError("micro_targets must hold at least one target tensor, got an empty sequence")
    if masks is None:
        masks = [None] * len(micro_targets)
    masks = list(masks)
    if len(masks) != len(micro_targets):
        raise LossInputError(
            f"masks must have one entry per micro-batch ({len(micro_targets)}), got {len(masks)}"
        )
    if padding_token is not None:
        padding_token = operator.index(padding_token)
    device = micro_targets[0].device if isinstance(micro_targets[0], torch.Tensor) else None
    counts = torch.zeros(3, dtype=torch.int64, device=device)  # tokens, sequences, base tokens
    for k, (target, mask) in enumerate(zip(micro_targets, masks, strict=True)):
        if not isinstance(target, torch.Tensor) or target.is_floating_point() or target.dtype == torch.bool:
            got = target.dtype if isinstance(target, torch.Tensor) else type(target).__name__
            raise LossInputError(f"micro_targets[{k}] must be an integer tensor, got {got}")
        if target.dim() not in (1, 2):
            raise LossInputError(
                f"micro_targets[{k}] must have shape (B, T) or (N,), got {tuple(target.shape)}"
            )
        if mask is not None and (
            not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != target.shape
        ):
            got = (
                f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            )
            raise LossInputError(
                f"masks[{k}] must be a bool tensor of shape {tuple(target.shape)}, got {got}"
            )
        base = validity_mask(target, ignore_index=ignore_index, mask=mask)
        valid = base if padding_token is None else base & (target != padding_token)
        rows = valid if valid.dim() == 2 else valid[:, None]
        counts = counts + torch.stack([rows.sum(), rows.any(-1).sum(), base.sum()]).to(device=counts.device)
    if group is not None or _dist_initialized():
        import torch.distributed as dist

        kwargs = {} if group is None else {"group": group}
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, **kwargs)
    return StepCounts(tokens=counts[0], sequences=counts[1],
                      base_tokens=None if padding_token is None else counts[2])


def _dist_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def warn_empty(num_valid: int, *, stacklevel: int = 2) -> None:
    """Issue ``EmptyBatchWarning(EMPTY_BATCH_MESSAGE)`` if ``num_valid`` (a host int) is 0.

    For callers that have already read the count to the host; this function never syncs by itself when
    given an int.
    """
    count = int(num_valid) if isinstance(num_valid, torch.Tensor) else operator.index(num_valid)
    if count == 0:
        warnings.warn(EmptyBatchWarning(EMPTY_BATCH_MESSAGE), stacklevel=stacklevel + 1)


def check_once(
    bad: torch.Tensor,
    num_valid: torch.Tensor,
    explain: Callable[[], None],
    *extra: torch.Tensor,
    stacklevel: int = 2,
) -> list[float]:
    """The one host read of an eagerly checked call: ``bad``, the valid count and ``extra`` in one transfer.

    ``bad`` (0-d bool: some valid row holds bad input) calls ``explain``, which runs the detailed value checks
    (``contract.check_target_range`` / ``check_finite_logits``, themselves reading only now that something is
    wrong) and raises their ``LossInputError``; if it finds nothing to name, a generic ``LossInputError`` is
    raised. A zero ``num_valid`` warns ``EmptyBatchWarning``. Returns the values of ``extra`` (as floats) for
    the caller's own checks. Every eager check of losskit (functional calls, ``kernels.cross_entropy``, the
    modifier pipeline) goes through here, so each costs exactly one sync. ``stacklevel`` counts as for
    ``warnings.warn`` from the caller of ``check_once`` (1: that caller).
    """
    values = torch.stack(
        [bad.detach().to(torch.float64).reshape(()), num_valid.detach().to(torch.float64).reshape(())]
        + [e.detach().to(torch.float64).reshape(()) for e in extra]
    ).tolist()
    if values[0]:
        explain()
        raise LossInputError("logits/target: non-finite statistics (NaN/inf) at valid positions; expected finite "
                             "logits and targets in [0, V)")
    warn_empty(int(values[1]), stacklevel=stacklevel + 1)
    return values[2:]
