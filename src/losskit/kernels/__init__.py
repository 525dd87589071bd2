"""``losskit.kernels``: every cross-entropy-family statistic from one streaming pass (spec/kernels.md).

Public functions:

* ``token_stats`` → ``TokenStats``: lse, target logit, nll, ln(1 − p_y), support mean, H(p), H(q), argmax,
  correct, bad. The float fields are differentiable, and the backward is one pass over the logits however
  they are combined (deferred mode).
* ``fused_token_loss`` → ``FusedLoss``: Σ_t v_t·w_t·(CE_ε + λ·lse²) / normalizer (or per token), eager
  (gradient written in the forward) or deferred.
* ``cross_entropy``: ``functional.cross_entropy``'s signature and semantics on the fast path.
* ``resolve_impl``: the dispatch of §2.4.

Implementations: ``"torch"`` (``reference.py``, the oracle), ``"chunked"`` (``chunked.py``, pure torch with
bounded memory; the default off CUDA). ``token_stats`` and ``fused_token_loss`` never read a tensor value
on the host: bad values only set the ``bad`` flags (§3.7).
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import torch

from losskit.contract import (
    NORMALIZERS,
    REDUCTIONS,
    CrossEntropyParts,
    FusedLoss,
    LossInputError,
    StepCounts,
    TokenStats,
    check_choice,
    check_finite_logits,
    check_target_range,
)
from losskit.functional.cross_entropy import check_z_loss
from losskit.functional.reduce import normalizer as reduce_normalizer
from losskit.functional.reduce import warn_empty
from losskit.kernels import chunked, reference
from losskit.kernels.chunked import StatFields
from losskit.kernels.dispatch import resolve_impl
from losskit.kernels.prepare import Prepared, Smoothing, check_label_smoothing, prepare, prepare_smoothing

__all__ = ["cross_entropy", "fused_token_loss", "resolve_impl", "token_stats"]

GRAD_MODES: tuple[str, ...] = ("auto", "forward", "backward")
FUSED_REDUCTIONS: tuple[str, ...] = ("sum", "none")


def _to_token_stats(f: StatFields, prep: Prepared, *, detach: bool = False) -> TokenStats:
    shape = prep.lead_shape

    def r(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(shape)
        return x.detach() if detach else x

    return TokenStats(
        valid=r(prep.valid),
        lse=r(f.lse),
        target_logit=r(f.target_logit),
        nll=r(f.nll),
        log1m_target_prob=r(f.log1m_target_prob),
        support_mean_logit=r(f.support_mean_logit),
        entropy=r(f.entropy),
        wrong_entropy=r(f.wrong_entropy),
        support_gap=r(f.support_gap),
        argmax=r(f.argmax),
        correct=r(f.correct),
        bad=r(f.bad),
    )


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise LossInputError(f"{name} must be a bool, got {value!r}")
    return value


def _check_inplace_grad(inplace_grad, logits: torch.Tensor) -> bool:
    """``inplace_grad`` as a bool; refused on a leaf that requires grad, or on a view of one.

    Writing the gradient into such a tensor would overwrite a parameter (or an input the caller keeps) with its
    own gradient; torch refuses in-place operations on it for the same reason.
    """
    _check_bool("inplace_grad", inplace_grad)
    if inplace_grad and _grad_wanted(logits):  # without a backward nothing is written
        root = logits
        while root._base is not None:
            root = root._base
        if root.is_leaf:
            what = "a view of a leaf tensor" if root is not logits else "a leaf tensor"
            raise LossInputError(
                f"inplace_grad=True needs logits produced by an operation (e.g. a model's output); got {what} "
                "that requires grad, whose data the gradient would overwrite (torch refuses in-place operations "
                "on such tensors too). Pass inplace_grad=False, or compute the logits from the leaf first"
            )
    return inplace_grad


def _grad_wanted(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _plan(logits: torch.Tensor, prep: Prepared, chunk_bytes) -> chunked.Plan:
    """The chunk plan of a ``"chunked"`` call (checks ``chunk_bytes``)."""
    return chunked.Plan.make(
        prep.num_classes, prep.dtype, chunked.check_chunk_bytes(chunk_bytes, logits.device)
    )


def _fields(logits, prep: Prepared, impl: str, inplace_grad: bool, chunk_bytes) -> StatFields:
    """Differentiable statistics of one pass (deferred mode) for the resolved ``impl``."""
    if impl == "torch":
        return reference.token_fields(logits, prep)[0]
    plan = _plan(logits, prep, chunk_bytes)
    if _grad_wanted(logits):
        out = chunked.TokenStatsFunction.apply(logits, prep, plan, inplace_grad)
        return StatFields(*out)
    with torch.no_grad():
        rs = chunked.stats_pass(logits, prep, plan)
    return chunked.finish(rs, prep)


def _resolve(impl: str, logits) -> str:
    if not isinstance(logits, torch.Tensor):
        raise LossInputError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    resolved = resolve_impl(impl, logits)
    # resolve_impl answers "triton" only when losskit.kernels.triton imports, which this build does not ship;
    # the guard keeps a future triton module from being silently served by the chunked code below.
    if resolved == "triton":
        raise LossInputError('impl="triton" is not implemented in this build; use impl="chunked"')
    return resolved


def token_stats(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int | None = -100,
    mask: torch.Tensor | None = None,
    smoothing_exclude=(),
    impl: str = "auto",
    inplace_grad: bool = False,
    chunk_bytes: int | None = None,
) -> TokenStats:
    """Per-token statistics of one streaming pass over the logits (spec/kernels.md §2.1, §3).

    With ``z`` a row, ``y`` its target, ``p = softmax(z)``, ``q`` = p renormalised over ``i ≠ y``,
    ``A = [0, V) \\ smoothing_exclude`` (``K = |A|``): ``lse = log Σ e^{z_i}``, ``target_logit = z_y``,
    ``nll = −ln p_y``, ``log1m_target_prob = ln(1 − p_y)``, ``support_mean_logit = Σ_{i∈A} z_i / K``,
    ``entropy = H(p)``, ``wrong_entropy = H(q)``, ``argmax`` (lowest index on ties; −1 where invalid),
    ``correct``, ``bad`` (valid row with an out-of-range target or non-finite lse/target logit).
    Float fields are fp32 (fp64 for fp64 logits), exactly 0 at invalid rows, NaN for out-of-range targets.

    Plain torch (``impl="torch"``, the oracle)::

        lp = logits.float().log_softmax(-1)
        nll = -lp.gather(-1, target[..., None])[..., 0]
        log1m = logits.float().scatter(-1, target[..., None], -inf).logsumexp(-1) - lp_lse
        entropy = -(lp.exp() * lp).sum(-1)   # with 0·log 0 = 0

    The float fields are differentiable when grad is on; however they are combined, the backward is one
    pass over the logits (§3.5). No host sync.

    Args:
        logits: ``(N, V)`` or ``(B, T, V)`` (any row strides, e.g. ``x[:, :-1]``), fp16/bf16/fp32/fp64.
        target: int64 (int32 accepted) of the leading shape.
        ignore_index: target value without supervision; None ignores nothing by value.
        mask: optional bool of the leading shape, ANDed into validity.
        smoothing_exclude: excluded class ids E (list, tuple or 1-D int tensor); only the support mean uses it.
        impl: ``"auto"``, ``"torch"``, ``"chunked"`` or ``"triton"`` (§2.4).
        inplace_grad: write the gradient into the logits' storage in backward (the caller promises nothing
            else reads those logits); their version counter is bumped.
        chunk_bytes: chunk budget of ``"chunked"`` (default 4 MiB on CPU, 256 MiB on CUDA).
    """
    resolved = _resolve(impl, logits)
    _check_inplace_grad(inplace_grad, logits)
    prep = prepare(logits, target, ignore_index=ignore_index, mask=mask, smoothing_exclude=smoothing_exclude)
    return _to_token_stats(_fields(logits, prep, resolved, inplace_grad, chunk_bytes), prep)


def _check_scalar_tensor(name: str, value, device: torch.device, *, allow_none: bool):
    if value is None:
        if allow_none:
            return None
        raise LossInputError(f"{name} must be a number or a 0-d tensor, got None")
    if isinstance(value, torch.Tensor):
        if (
            value.dim() != 0
            or not value.is_floating_point()
            and value.dtype not in (torch.int64, torch.int32)
        ):
            raise LossInputError(f"{name} must be a 0-d float tensor, got {value.dtype} {tuple(value.shape)}")
        if value.device != device:
            raise LossInputError(f"{name} must be on the device of logits ({device}), got {value.device}")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise LossInputError(f"{name} must be a finite number or a 0-d tensor, got {value!r}")
    return float(value)


def _smoothing_bad(f: StatFields, prep: Prepared, sm: Smoothing) -> StatFields:
    """``f`` with the ``bad`` of the fused loss: with ε > 0 a non-finite support mean also counts (§3.7)."""
    if sm.eps_t is None:
        return f
    return dataclasses.replace(f, bad=f.bad | (prep.valid & ~torch.isfinite(f.support_mean_logit)))


def _loss_fields(
    logits, prep: Prepared, sm: Smoothing, lam: float, impl: str, inplace_grad: bool, chunk_bytes
) -> tuple[torch.Tensor, StatFields]:
    """Deferred mode: flat differentiable per-token ``CE_ε + λ·lse²`` and the fields (with the loss's ``bad``)."""
    if impl == "torch":
        per_token, f = reference.fused_terms(logits, prep, sm, lam)
    else:
        f = _fields(logits, prep, impl, inplace_grad, chunk_bytes)
        per_token = chunked.fused_token_terms(f, sm, lam)
    return per_token, _smoothing_bad(f, prep, sm)


def _row_weight(token_weight: torch.Tensor | None, prep: Prepared) -> torch.Tensor | None:
    """Flat ``token_weight`` in the compute dtype, 0 at invalid rows (where it may be NaN, e.g. ``cw[-100]``)."""
    if token_weight is None:
        return None
    zero = torch.zeros((), dtype=prep.dtype, device=prep.valid.device)
    return torch.where(prep.valid, token_weight.reshape(-1).to(prep.dtype), zero)


def _reduce_rows(
    x: torch.Tensor, prep: Prepared, weight: torch.Tensor | None, reduction: str, normalizer
) -> torch.Tensor:
    """``Σ_t v_t·w_t·x_t / normalizer`` (None: 1), or ``v_t·w_t·x_t`` in the leading shape for ``"none"``.

    ``weight`` comes from ``_row_weight``; ``reduction`` is ``"none"``, ``"sum"`` or ``"mean"`` (a sum over
    the caller's normalizer).
    """
    zero = torch.zeros((), dtype=prep.dtype, device=x.device)
    x = torch.where(prep.valid, x if weight is None else x * weight, zero)
    if reduction == "none":
        return x.reshape(prep.lead_shape)
    total = x.sum()
    return total if normalizer is None else total / normalizer.to(prep.dtype)


def fused_token_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int | None = -100,
    mask: torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    smoothing_convention: str = "torch",
    smoothing_exclude=(),
    hard_target_ids=None,
    z_loss: float = 0.0,
    normalizer=None,
    reduction: str = "sum",
    grad_mode: str = "auto",
    grad_scale=1.0,
    inplace_grad: bool = False,
    impl: str = "auto",
    chunk_bytes: int | None = None,
) -> FusedLoss:
    """Fused per-token loss ``ℓ_t = v_t·w_t·(CE_ε,t + λ·lse_t²)`` in one pass (spec/kernels.md §2.2, §4.1).

    ``CE_ε = nll − ε_t·a/K_t`` (§3.3) with ``a = Σ_{i∈A}(z_i − z_y)``; ``K_t = K`` ("torch") or
    ``K − [y∈A]`` ("fairseq"); ε_t = 0 on rows whose target is in ``hard_target_ids`` (default: the
    excluded ids). ``reduction="sum"``: ``Σ_t ℓ_t / normalizer`` (None means 1; a float or 0-d device tensor
    from ``functional.reduce``); ``"none"``: ℓ_t with the leading shape (no normalizer).

    Plain torch (``token_weight=w``, E = ∅, "torch" convention)::

        ce = F.cross_entropy(logits.flatten(0, -2).float(), target.flatten(), ignore_index=ignore_index,
                             label_smoothing=eps, reduction="none")
        lse = logits.float().logsumexp(-1).flatten()
        loss = (w.flatten() * (ce + z_loss * lse**2) * valid).sum() / normalizer

    Gradient modes: ``"forward"`` (eager; ``reduction="sum"`` only) writes G for an upstream of
    ``grad_scale`` during the forward and only rescales in backward when the upstream differs;
    ``"backward"`` (deferred) saves row constants and writes G in backward; ``"auto"`` picks eager for
    ``reduction="sum"`` on CPU (chunked), deferred otherwise. A gradient of ``token_weight`` (if it requires
    grad) is ``upstream·(CE_ε + λ·lse²)/normalizer``. Never syncs; bad rows set ``stats.bad``.

    Returns:
        ``FusedLoss(loss, token_loss, stats)``; ``token_loss`` (detached, unweighted ``CE_ε + λ·lse²``) and
        ``stats`` have the leading shape.
    """
    resolved = _resolve(impl, logits)
    check_choice("reduction", reduction, FUSED_REDUCTIONS)
    check_choice("grad_mode", grad_mode, GRAD_MODES)
    _check_inplace_grad(inplace_grad, logits)
    lam = check_z_loss(z_loss)
    prep = prepare(
        logits,
        target,
        ignore_index=ignore_index,
        mask=mask,
        smoothing_exclude=smoothing_exclude,
        token_weight=token_weight,
    )
    eps = check_label_smoothing(label_smoothing, smoothing_convention, prep.num_support)
    sm = prepare_smoothing(prep, eps, smoothing_convention, hard_target_ids, logits.device)
    normalizer = _check_scalar_tensor("normalizer", normalizer, logits.device, allow_none=True)
    if reduction == "none" and normalizer is not None:
        raise LossInputError(
            'normalizer applies to reduction="sum" only; with reduction="none" pass normalizer=None'
        )
    grad_scale = _check_scalar_tensor("grad_scale", grad_scale, logits.device, allow_none=False)
    if not isinstance(grad_scale, torch.Tensor) and grad_scale == 0.0:
        raise LossInputError(
            "grad_scale must be non-zero (it is the upstream gradient G is computed for), got 0.0"
        )
    if grad_mode == "forward" and reduction != "sum":
        raise LossInputError(
            'grad_mode="forward" (eager) needs reduction="sum": per-token upstream gradients are only known in '
            'backward; use grad_mode="backward" or "auto"'
        )
    if isinstance(normalizer, (int, float)):
        normalizer = torch.tensor(float(normalizer), dtype=prep.dtype, device=logits.device)
    return _fused(
        logits,
        token_weight,
        prep,
        sm,
        lam,
        normalizer,
        reduction,
        grad_mode,
        grad_scale,
        inplace_grad,
        resolved,
        chunk_bytes,
    )


def _fused(
    logits,
    token_weight,
    prep: Prepared,
    sm: Smoothing,
    lam: float,
    normalizer,
    reduction: str,
    grad_mode: str,
    grad_scale,
    inplace_grad: bool,
    impl: str,
    chunk_bytes,
) -> FusedLoss:
    """``fused_token_loss`` on checked arguments (``impl`` resolved, ``normalizer`` None or a 0-d tensor)."""
    eager = (
        impl == "chunked"
        and reduction == "sum"
        and _grad_wanted(logits)
        and (grad_mode == "forward" or (grad_mode == "auto" and logits.device.type != "cuda"))
    )
    if eager:
        return _fused_eager(
            logits, token_weight, prep, sm, lam, normalizer, grad_scale, inplace_grad, chunk_bytes
        )
    per_token, f = _loss_fields(logits, prep, sm, lam, impl, inplace_grad, chunk_bytes)
    return FusedLoss(
        loss=_reduce_rows(per_token, prep, _row_weight(token_weight, prep), reduction, normalizer),
        token_loss=per_token.detach().reshape(prep.lead_shape),
        stats=_to_token_stats(f, prep, detach=True),
    )


def _fused_eager(
    logits, token_weight, prep, sm, lam, normalizer, grad_scale, inplace_grad, chunk_bytes
) -> FusedLoss:
    plan = _plan(logits, prep, chunk_bytes)
    norm_in = normalizer
    graph_norm = normalizer is not None and normalizer.requires_grad and torch.is_grad_enabled()
    if graph_norm:
        norm_in = normalizer.detach()
    out = chunked.FusedTokenLossFunction.apply(
        logits, token_weight, prep, plan, sm, lam, norm_in, grad_scale, inplace_grad
    )
    loss, token_loss = out[0], out[1]
    if graph_norm:
        # The value is Σ/normalizer; the ratio is exactly 1, so the upstream reaching the Function stays
        # grad_scale and no rescale pass runs, while the normalizer still gets its gradient.
        loss = loss * (norm_in / normalizer)
    f = _smoothing_bad(StatFields(*out[2:]), prep, sm)
    return FusedLoss(
        loss=loss, token_loss=token_loss.reshape(prep.lead_shape), stats=_to_token_stats(f, prep, detach=True)
    )


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int | None = -100,
    mask: torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    smoothing_convention: str = "torch",
    smoothing_exclude=(),
    z_loss: float = 0.0,
    reduction: str = "mean",
    normalize: str = "tokens",
    step_counts: StepCounts | None = None,
    return_parts: bool = False,
    impl: str = "auto",
    inplace_grad: bool = False,
    chunk_bytes: int | None = None,
) -> torch.Tensor | CrossEntropyParts:
    """``functional.cross_entropy`` on the fast path (spec/modifiers.md §1.2, spec/kernels.md §2.2).

    Same signature (plus ``impl``, ``inplace_grad``, ``chunk_bytes``) and semantics: per token
    ``ℓ_n = m_n·u_n·(ℓ^ε_n + λ·lse_n²)``, reduced by ``"none"`` / ``"sum"`` / ``"mean"`` with the
    denominator of ``functional.reduce.normalizer``. The plain torch it equals (``token_weight=None``,
    no exclusions, ``z_loss=0``, "torch" convention)::

        F.cross_entropy(logits.flatten(0, -2), target.flatten(), ignore_index=ignore_index,
                        label_smoothing=eps, reduction=reduction)

    except that an all-invalid ``"mean"`` is a graph-connected 0 with an ``EmptyBatchWarning``.

    Checks like the functional call, with ONE host read (the number of valid rows and the pass's ``bad``
    flag packed into one integer): an out-of-range target, NaN/+inf logits, −inf at a target or (ε > 0)
    inside the smoothing support raise ``LossInputError`` with the functional call's detailed message.
    With ``return_parts`` every part is differentiable (deferred mode).
    """
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("normalize", normalize, NORMALIZERS)
    prep = prepare(
        logits,
        target,
        ignore_index=ignore_index,
        mask=mask,
        smoothing_exclude=smoothing_exclude,
        token_weight=token_weight,
    )
    eps = check_label_smoothing(label_smoothing, smoothing_convention, prep.num_support)
    lam = check_z_loss(z_loss)
    resolved = _resolve(impl, logits)
    _check_inplace_grad(inplace_grad, logits)
    sm = prepare_smoothing(prep, eps, smoothing_convention, None, logits.device)
    denom = None
    if reduction == "mean":
        # Raises for normalize="global_tokens" without step_counts, naming functional.step_counts.
        denom = reduce_normalizer(
            prep.valid.reshape(prep.lead_shape),
            weight=token_weight,
            normalize=normalize,
            step_counts=step_counts,
            dtype=prep.dtype,
        )
    if return_parts:
        return _cross_entropy_parts(
            logits, target, token_weight, prep, sm, lam, denom, reduction, resolved, inplace_grad, chunk_bytes
        )
    # The prepared call goes straight to the fused core: fused_token_loss would check and prepare it again.
    fused_reduction = "none" if reduction == "none" else "sum"
    res = _fused(
        logits,
        token_weight,
        prep,
        sm,
        lam,
        denom,
        fused_reduction,
        "auto",
        1.0,
        inplace_grad,
        resolved,
        chunk_bytes,
    )
    _check_once(logits, target, prep, sm, res.stats.bad)
    return res.loss


def _check_once(logits, target, prep: Prepared, sm: Smoothing, bad: torch.Tensor) -> None:
    """The one host read of an eager call: ``2·num_valid + any(bad)``; detailed checks only when bad."""
    packed = prep.valid.sum() * 2 + bad.any().long()
    value = int(packed)
    num_valid, any_bad = value >> 1, value & 1
    if any_bad:
        valid = prep.valid.reshape(prep.lead_shape)
        check_target_range(target, valid, prep.num_classes)
        support = prep.support.indicator.bool() if sm.eps_t is not None else None
        check_finite_logits(logits, target, valid, smoothing_support=support)
        raise LossInputError("logits/target: non-finite statistics at valid positions")
    warn_empty(num_valid, stacklevel=4)


def _cross_entropy_parts(
    logits,
    target,
    token_weight,
    prep: Prepared,
    sm: Smoothing,
    lam: float,
    denom,
    reduction: str,
    impl: str,
    inplace_grad: bool,
    chunk_bytes,
) -> CrossEntropyParts:
    """``return_parts=True``: loss, nll, smoothing and z-loss parts, all from one differentiable pass."""
    per_token, f = _loss_fields(logits, prep, sm, lam, impl, inplace_grad, chunk_bytes)
    _check_once(logits, target, prep, sm, f.bad)
    weight = _row_weight(token_weight, prep)
    z_part = lam * f.lse * f.lse if lam else torch.zeros_like(f.nll)
    ce_eps = per_token - z_part if lam else per_token

    def red(x: torch.Tensor) -> torch.Tensor:
        return _reduce_rows(x, prep, weight, reduction, denom)

    return CrossEntropyParts(
        loss=red(per_token),
        nll=red(f.nll),
        smooth=red(ce_eps - f.nll),
        z_loss=red(z_part),
        num_valid=prep.valid.sum(),
    )
