"""Cross-entropy family in plain, differentiable torch: the oracle every fast path is tested against.

Covers docs/modifiers.md (seed 000 "Loss Modifiers System", seed 004 label-smoothing
notebook): ``cross_entropy`` with label smoothing in two conventions and an excluded column set, PaLM-style
z-loss, per-token weights and every reduction; ``entropy`` H(p) and ``wrong_answer_entropy`` H(q).

Implementation rules:

* Everything is computed from ``log_softmax`` of the logits in fp32 (fp64 stays fp64). The dense target
  distribution is never built: label smoothing uses the closed form, a sum of log-probabilities over the
  support.
* Invalid rows (``target == ignore_index`` or ``mask`` False) are replaced by zeros before any arithmetic and
  the results there are selected away with ``torch.where``. So those rows may hold NaN or any target value,
  and still give exact zeros in the value and in the gradient.
* Targets are clamped before every gather.

Only ``cross_entropy`` reads values on the host, once per call: it validates targets and logits and warns
on an all-invalid batch. ``entropy`` and ``wrong_answer_entropy`` never sync, so the ``torch`` kernel
implementation can build on them.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterable

import torch

from losskit.contract import (
    NORMALIZERS,
    REDUCTIONS,
    SMOOTHING_CONVENTIONS,
    CrossEntropyParts,
    LossInputError,
    StepCounts,
    check_choice,
    check_ignore_index,
    check_logits_target,
    explain_bad_rows,
    validity_mask,
)
from losskit.functional.reduce import check_once, masked_mean, masked_sum

__all__ = [
    "check_label_smoothing",
    "check_z_loss",
    "cross_entropy",
    "entropy",
    "exclude_ids",
    "smoothing_support",
    "wrong_answer_entropy",
]

_NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------------------
# Settings: the smoothing support and the smoothing factor
# ---------------------------------------------------------------------------------------------------------


def exclude_ids(
    smoothing_exclude: Iterable[int] | torch.Tensor | None,
    num_classes: int | None,
    *,
    name: str = "smoothing_exclude",
) -> tuple[int, ...]:
    """The excluded ids X as a sorted tuple of distinct ints, checked against ``[0, V)``.

    Also the one validator of every other class-id list (``kernels`` passes ``name="hard_target_ids"``), so
    the functional and the fast path reject bad ids with the same message.

    Args:
        smoothing_exclude: list/tuple/set/range of ints, a 0-d or 1-D integer tensor, or None (empty).
        num_classes: V, or None where V is not known yet (a module's constructor): ids must then be >= 0, and
            the upper bound is checked at the first call.
        name: the argument named in error messages.

    Raises:
        LossInputError: an id is not an integer or lies outside ``[0, V)`` (names ``name``, the id and V).
    """
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1
    ):
        raise LossInputError(f"num_classes must be a positive int, got {num_classes!r}")
    if smoothing_exclude is None:
        return ()
    if isinstance(smoothing_exclude, torch.Tensor):
        if (
            smoothing_exclude.is_floating_point()
            or smoothing_exclude.is_complex()
            or (smoothing_exclude.dtype == torch.bool)
        ):
            raise LossInputError(
                f"{name} must hold integer class ids, got a tensor of dtype {smoothing_exclude.dtype}"
            )
        if smoothing_exclude.dim() > 1:
            raise LossInputError(
                f"{name} must be a 1-D tensor of class ids, got shape {tuple(smoothing_exclude.shape)}"
            )
        # A list of ids is configuration, not a training-step tensor: reading it is a one-off.
        items = smoothing_exclude.reshape(-1).tolist()
    elif isinstance(smoothing_exclude, (str, bytes)) or not isinstance(smoothing_exclude, Iterable):
        raise LossInputError(
            f"{name} must be a list, tuple, set or 1-D tensor of class ids, got {type(smoothing_exclude).__name__}"
        )
    else:
        items = list(smoothing_exclude)
    ids = set()
    for item in items:
        if isinstance(item, bool):
            raise LossInputError(f"{name} must hold integer class ids, got {item!r}")
        try:
            idx = operator.index(item)
        except TypeError:
            raise LossInputError(
                f"{name} must hold integer class ids, got {item!r} ({type(item).__name__})"
            ) from None
        if num_classes is None and idx < 0:
            raise LossInputError(f"{name}: class id {idx} is negative; expected class ids >= 0")
        if num_classes is not None and not 0 <= idx < num_classes:
            raise LossInputError(
                f"{name}: class id {idx} is outside [0, V) with V={num_classes}; expected ids in [0, {num_classes})"
            )
        ids.add(idx)
    return tuple(sorted(ids))


def smoothing_support(
    smoothing_exclude: Iterable[int] | torch.Tensor | None,
    num_classes: int,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Bool ``(V,)`` indicator of the smoothing support ``A = [0, V) \\ X``.

    Duplicate ids are dropped; ids outside ``[0, V)`` raise ``LossInputError`` naming ``smoothing_exclude``,
    the id and V. ``K = support.sum()`` is ``V - len(exclude_ids(smoothing_exclude, V))``.
    """
    ids = exclude_ids(smoothing_exclude, num_classes)
    support = torch.ones(num_classes, dtype=torch.bool, device=device)
    if ids:
        support[torch.tensor(ids, dtype=torch.long, device=device)] = False
    return support


def check_label_smoothing(label_smoothing: float, smoothing_convention: str, support_size: int) -> None:
    """Validate the smoothing settings.

    ``0 <= label_smoothing < 1``; ``smoothing_convention`` is ``"torch"`` or ``"fairseq"``; when
    ``label_smoothing > 0`` the support size K must be ``>= 1`` ("torch") or ``>= 2`` ("fairseq": the
    target's mass goes to the *other* support classes).

    Raises:
        LossInputError: naming ``label_smoothing``, ``smoothing_convention`` or ``smoothing_exclude``.
    """
    if (
        isinstance(label_smoothing, bool)
        or not isinstance(label_smoothing, numbers.Real)
        or not 0.0 <= float(label_smoothing) < 1.0
    ):
        raise LossInputError(f"label_smoothing must be a number in [0, 1), got {label_smoothing!r}")
    check_choice("smoothing_convention", smoothing_convention, SMOOTHING_CONVENTIONS)
    if label_smoothing > 0:
        need = 1 if smoothing_convention == "torch" else 2
        if support_size < need:
            raise LossInputError(
                f"smoothing_exclude leaves K={support_size} class(es) in the smoothing support; "
                f"label_smoothing={label_smoothing} with smoothing_convention={smoothing_convention!r} "
                f"needs K >= {need}"
            )


def check_z_loss(z_loss: float) -> float:
    """Validate the PaLM z-loss coefficient λ (a finite number ``>= 0``) and return it as a float.

    Raises:
        LossInputError: naming ``z_loss`` and the value.
    """
    if (
        isinstance(z_loss, bool)
        or not isinstance(z_loss, numbers.Real)
        or not 0.0 <= float(z_loss) < math.inf
    ):
        raise LossInputError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    return float(z_loss)


# ---------------------------------------------------------------------------------------------------------
# Sync-free building blocks
# ---------------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half/bfloat16 (and any other float), fp64 stays fp64."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _valid_rows(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Logits in the computation dtype with invalid rows replaced by zeros.

    Zeroing (rather than multiplying) keeps NaN/inf of ignored rows out of the value and the gradient.
    """
    z = logits.to(_compute_dtype(logits.dtype))
    return torch.where(valid[..., None], z, torch.zeros((), dtype=z.dtype, device=z.device))


def _neg_sum_plogp(logp: torch.Tensor) -> torch.Tensor:
    """``-Σ_c p_c log p_c`` over the last dim from log-probabilities, with ``0·log 0 = 0``.

    ``-inf`` log-probabilities (masked classes) are replaced by 0 before the product, so neither the value
    nor the gradient sees ``0·(-inf)``: their term and its gradient are exactly 0.
    """
    safe = torch.where(logp == _NEG_INF, torch.zeros((), dtype=logp.dtype, device=logp.device), logp)
    return -(logp.exp() * safe).sum(-1)


def _clamped_target(target: torch.Tensor, valid: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 targets safe to gather with: 0 at invalid positions, clamped to ``[0, V)`` elsewhere."""
    return torch.where(valid, target.long(), 0).clamp(0, num_classes - 1)


def _reduce_tokens(
    x: torch.Tensor,
    valid: torch.Tensor,
    reduction: str,
    *,
    weight: torch.Tensor | None = None,
    normalize: str = "tokens",
    step_counts: StepCounts | None = None,
) -> torch.Tensor:
    """Apply ``reduction`` to per-token values ``x`` (weighted by ``weight``), with exact zeros when invalid."""
    if reduction == "mean":
        return masked_mean(x, valid, weight=weight, normalize=normalize, step_counts=step_counts)
    if reduction == "sum":
        return masked_sum(x, valid, weight=weight)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    out = torch.where(valid, x, zero)
    if weight is not None:
        out = out * torch.where(valid, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
    return out


# ---------------------------------------------------------------------------------------------------------
# Value checks (one host read)
# ---------------------------------------------------------------------------------------------------------


def _check_values(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, support: torch.Tensor | None
) -> None:
    """Validate target range and finiteness on valid rows, and warn on an empty batch: one host read
    (``reduce.check_once``); the detailed contract checks run only when something is wrong, to build their
    messages. ``support`` is the smoothing support when ``label_smoothing > 0`` (``-inf`` inside it is then an
    error), else None.
    """
    num_classes = logits.shape[-1]
    rows = logits.reshape(-1, num_classes)
    vflat = valid.reshape(-1)
    tflat = target.reshape(-1).long()
    bad = (tflat < 0) | (tflat >= num_classes)
    # amax propagates NaN, so `not (max < inf)` catches NaN and +inf without a dense temporary.
    bad = bad | ~(rows.amax(dim=1) < float("inf"))
    bad = bad | (rows.gather(1, tflat.clamp(0, num_classes - 1)[:, None]).squeeze(1) == _NEG_INF)
    if support is not None:
        bad = bad | ((rows == _NEG_INF) & support[None, :]).any(dim=1)
    def explain() -> None:
        explain_bad_rows(logits, target, valid, smoothing_support=support)

    check_once((bad & vflat).any(), vflat.sum(), explain, stacklevel=3)


# ---------------------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------------------


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int | None = -100,
    mask: torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    smoothing_convention: str = "torch",
    smoothing_exclude: Iterable[int] | torch.Tensor = (),
    z_loss: float = 0.0,
    reduction: str = "mean",
    normalize: str = "tokens",
    step_counts: StepCounts | None = None,
    return_parts: bool = False,
) -> torch.Tensor | CrossEntropyParts:
    """Cross-entropy with label smoothing, excluded columns, z-loss and token weights.

    Per token ``ℓ_n = m_n · u_n · (ℓ^ε_n + λ·lse_n²)`` with ``m`` the validity mask
    ``(target != ignore_index) & mask``, ``u`` = ``token_weight`` (default 1), ``λ`` = ``z_loss`` (PaLM) and
    ``ℓ^ε`` the smoothed CE. With ``lp = log_softmax(z)``, ``CE = -lp_y``, support ``A = [0,V) \\ X``,
    ``K = |A|``:

    * ``y ∈ X`` or ``ε = 0``: ``ℓ^ε = CE`` (special targets stay hard).
    * ``"torch"``: ``ℓ^ε = (1-ε)·CE + ε·(-Σ_{c∈A} lp_c)/K``, target distribution
      ``(1-ε)[c=y] + (ε/K)[c∈A]``; with ``X = ∅`` this is ``F.cross_entropy(label_smoothing=ε)``.
    * ``"fairseq"``: ``ℓ^ε = (1-ε)·CE + ε·(-Σ_{c∈A, c≠y} lp_c)/(K-1)``, target distribution
      ``(1-ε)[c=y] + (ε/(K-1))[c∈A, c≠y]``; with ``X = ∅`` this is fairseq's ``ε/(V-1)`` rule.

    Reductions: ``"none"`` returns the leading shape with exact zeros at invalid positions; ``"sum"`` returns
    ``Σ ℓ_n``; ``"mean"`` returns ``Σ ℓ_n / D`` with D from ``reduce.normalizer``: ``"tokens"`` → ``Σ m``,
    ``"weights"`` → ``Σ m·u``, ``"global_tokens"`` → ``step_counts.tokens`` (each clamped so an empty batch
    gives an exact 0). ``token_weight = cw[target]`` with ``normalize="weights"`` reproduces torch's
    class-weighted mean at ``ε = 0``.

    Plain torch equivalent (``token_weight=None``, ``X = ∅``, ``z_loss = 0``, ``"torch"``)::

        F.cross_entropy(logits.flatten(0, -2), target.flatten(), ignore_index=ignore_index,
                        label_smoothing=ε, reduction=reduction)

    except that an all-invalid ``"mean"`` is 0 (with an ``EmptyBatchWarning``) where torch gives NaN.

    Checks (one host read): valid targets in ``[0, V)`` (else ``LossInputError`` naming ``target``); on valid
    rows no NaN or ``+inf`` logits, no ``-inf`` at the target, and with ``ε > 0`` no ``-inf`` inside the
    smoothing support (the error suggests ``smoothing_exclude``). An all-invalid batch warns
    ``EmptyBatchWarning`` and returns a graph-connected 0.

    Args:
        logits: ``(N, V)`` or ``(B, T, V)``, any float dtype (computed in fp32; fp64 stays fp64).
        target: integer tensor of the leading shape.
        ignore_index: target value without supervision (None: ignore nothing by value).
        mask: optional bool mask of the leading shape, ANDed into validity.
        token_weight: optional float per-token weights of the leading shape (gradients flow through them).
        label_smoothing: ε in ``[0, 1)``.
        smoothing_convention: ``"torch"`` or ``"fairseq"``.
        smoothing_exclude: class ids X that receive no smoothing mass and whose targets stay hard.
        z_loss: λ ≥ 0.
        reduction: ``"none"``, ``"sum"`` or ``"mean"``.
        normalize: ``"tokens"``, ``"weights"`` or ``"global_tokens"`` (``"mean"`` only).
        step_counts: ``StepCounts`` of the step, required for ``"global_tokens"``.
        return_parts: return ``CrossEntropyParts(loss, nll, smooth, z_loss, num_valid)``.

    Returns:
        The loss in the computation dtype, or ``CrossEntropyParts``.
    """
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("normalize", normalize, NORMALIZERS)
    check_logits_target(logits, target, mask=mask, token_weight=token_weight)
    check_ignore_index(ignore_index)
    num_classes = logits.shape[-1]
    excluded = exclude_ids(smoothing_exclude, num_classes)
    support_size = num_classes - len(excluded)
    check_label_smoothing(label_smoothing, smoothing_convention, support_size)
    eps = float(label_smoothing)
    lam = check_z_loss(z_loss)
    if reduction == "mean" and normalize == "global_tokens" and step_counts is None:
        raise LossInputError(
            'step_counts is required with normalize="global_tokens" (build it with '
            "losskit.functional.step_counts(micro_targets, ...)), got None"
        )

    valid = validity_mask(target, ignore_index=ignore_index, mask=mask)
    support = smoothing_support(excluded, num_classes, device=logits.device) if eps > 0 else None
    _check_values(logits, target, valid, support)

    z = _valid_rows(logits, valid)
    tc = _clamped_target(target, valid, num_classes)
    logp = torch.log_softmax(z, dim=-1)
    target_logp = logp.gather(-1, tc[..., None]).squeeze(-1)
    nll = -target_logp
    token_loss = nll
    if eps > 0:
        if excluded:
            # where, not a product with the indicator: excluded columns may be -inf (masked vocabulary).
            support_logp = torch.where(
                support, logp, torch.zeros((), dtype=logp.dtype, device=logp.device)
            ).sum(-1)
        else:
            support_logp = logp.sum(-1)
        if smoothing_convention == "torch":
            smooth_ce = -support_logp / support_size
        else:
            # fairseq: the target's own column gets no smoothing mass; y ∈ A on every smoothed row.
            smooth_ce = -(support_logp - target_logp) / (support_size - 1)
        smoothed = (1.0 - eps) * nll + eps * smooth_ce
        # Positions whose target is excluded keep the hard target.
        token_loss = torch.where(support[tc], smoothed, nll) if excluded else smoothed
    ce_eps = token_loss
    zl = None
    if lam > 0:
        zl = lam * torch.logsumexp(z, dim=-1).square()
        token_loss = token_loss + zl

    u = None if token_weight is None else token_weight.to(z.dtype)
    red = {"weight": u, "normalize": normalize, "step_counts": step_counts}
    loss = _reduce_tokens(token_loss, valid, reduction, **red)
    if not return_parts:
        return loss
    nll_part = _reduce_tokens(nll, valid, reduction, **red)
    if eps > 0:
        smooth_part = _reduce_tokens(ce_eps - nll, valid, reduction, **red)
    else:
        smooth_part = nll_part * 0
    z_part = _reduce_tokens(zl, valid, reduction, **red) if zl is not None else nll_part * 0
    return CrossEntropyParts(
        loss=loss, nll=nll_part, smooth=smooth_part, z_loss=z_part, num_valid=valid.sum()
    )


def _entropy_validity(
    logits: torch.Tensor, target: torch.Tensor | None, ignore_index: int | None, mask: torch.Tensor | None
) -> torch.Tensor:
    """Checked validity mask of ``entropy``: the contract's when ``target`` is given, else ``mask`` (or all).

    ``contract.check_logits_target`` needs a target, so the target-free call checks logits and mask here.
    """
    if target is not None:
        check_logits_target(logits, target, mask=mask)
        return validity_mask(target, ignore_index=ignore_index, mask=mask)
    if not isinstance(logits, torch.Tensor):
        raise LossInputError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() not in (2, 3) or not logits.is_floating_point() or logits.shape[-1] < 2:
        raise LossInputError(
            "logits must be a floating-point tensor of shape (N, V) or (B, T, V) with V >= 2, got "
            f"{tuple(logits.shape)} of dtype {logits.dtype}"
        )
    lead = tuple(logits.shape[:-1])
    if mask is None:
        return torch.ones(lead, dtype=torch.bool, device=logits.device)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != lead:
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise LossInputError(f"mask must be a bool tensor of the leading shape of logits {lead}, got {got}")
    return mask


def entropy(
    logits: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    ignore_index: int | None = -100,
    mask: torch.Tensor | None = None,
    reduction: str = "none",
) -> torch.Tensor:
    """Predictive entropy ``H(p) = -Σ_c p_c ln p_c`` (nats) per position.

    Plain torch::

        lp = torch.log_softmax(logits, -1)
        -(lp.exp() * torch.where(lp == -inf, 0, lp)).sum(-1)

    ``-inf`` logits (masked classes) contribute exactly 0 to the value and the gradient
    ``∂H/∂z_j = -p_j (z_j - lse + H)``. Validity is ``(target != ignore_index) & mask`` (all positions when
    ``target`` is None); invalid positions are exact zeros; a row without any finite logit gives 0.
    Reductions as in ``cross_entropy`` (``"mean"`` over valid tokens). No host sync.

    Args:
        logits: ``(N, V)`` or ``(B, T, V)``, any float dtype (fp32 computation; fp64 stays fp64).
        target: optional integer tensor of the leading shape (only used for validity).
        ignore_index: target value without supervision.
        mask: optional bool mask of the leading shape.
        reduction: ``"none"``, ``"sum"`` or ``"mean"``.
    """
    check_choice("reduction", reduction, REDUCTIONS)
    valid = _entropy_validity(logits, target, ignore_index, mask)
    z = _valid_rows(logits, valid)
    # A row of only -inf logits would give NaN log-probabilities; such rows are zeroed and report H = 0.
    # NaN rows are kept (NaN == -inf is False), so bad input stays visible.
    has_mass = ~(z.amax(dim=-1) == _NEG_INF)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    z = torch.where(has_mass[..., None], z, zero)
    h = torch.where(has_mass, _neg_sum_plogp(torch.log_softmax(z, dim=-1)), zero)
    return _reduce_tokens(h, valid, reduction)


def wrong_answer_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int | None = -100,
    mask: torch.Tensor | None = None,
    reduction: str = "none",
) -> torch.Tensor:
    """Entropy of the wrong-answer distribution ``H(q) = -Σ_{j≠y} q_j ln q_j``.

    ``q_j = p_j / (1 - p_y)`` for ``j ≠ y`` is the softmax of the logits with the target column removed, so
    H(q) is computed exactly (no eps) as the entropy of ``log_softmax`` of the row with ``z_y`` set to
    ``-inf``. It is independent of ``z_y``: ``∂H(q)/∂z_y`` is exactly 0 (the scatter overwrites that
    column), and ``∂H(q)/∂z_j = -q_j (z_j - L¬ + H(q))`` for ``j ≠ y`` with ``L¬ = logsumexp_{i≠y} z_i``.
    It is 0 only where no non-target logit is finite. Seed 000's example: logits ``[2, 1, 4, .5]``, y = 2
    give 0.905959. Plain torch::

        zq = logits.scatter(-1, target[..., None], -inf)
        lq = torch.log_softmax(zq, -1)
        -(lq.exp() * torch.where(lq == -inf, 0, lq)).sum(-1)

    Invalid positions are exact zeros; a valid target outside ``[0, V)`` gives NaN there (no host sync, so
    no exception; ``cross_entropy`` raises for it). Reductions as in ``cross_entropy``.

    Args:
        logits: ``(N, V)`` or ``(B, T, V)``, any float dtype (fp32 computation; fp64 stays fp64).
        target: integer tensor of the leading shape.
        ignore_index: target value without supervision.
        mask: optional bool mask of the leading shape.
        reduction: ``"none"``, ``"sum"`` or ``"mean"``.
    """
    check_choice("reduction", reduction, REDUCTIONS)
    check_logits_target(logits, target, mask=mask)
    num_classes = logits.shape[-1]
    valid = validity_mask(target, ignore_index=ignore_index, mask=mask)
    z = _valid_rows(logits, valid)
    tc = _clamped_target(target, valid, num_classes)
    zq = z.scatter(-1, tc[..., None], _NEG_INF)
    has_wrong = ~(zq.amax(dim=-1) == _NEG_INF)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    zq = torch.where(has_wrong[..., None], zq, zero)
    hq = torch.where(has_wrong, _neg_sum_plogp(torch.log_softmax(zq, dim=-1)), zero)
    in_range = (target >= 0) & (target < num_classes)
    hq = torch.where(in_range | ~valid, hq, torch.full((), float("nan"), dtype=z.dtype, device=z.device))
    return _reduce_tokens(hq, valid, reduction)
