"""The public functions of ``losskit.kernels``, each a thin layer over one ``call.describe`` and one run.

* ``token_stats`` → ``TokenStats``: lse, target logit, nll, ln(1 − p_y), support mean and gap, H(p), H(q),
  argmax, correct, bad. The float fields are differentiable, and the backward is one pass over the logits however
  they are combined (deferred mode).
* ``fused_token_loss`` → ``FusedLoss``: Σ_t v_t·w_t·(CE_ε + λ·lse²) / normalizer (or per token), eager
  (gradient written in the forward) or deferred.
* ``cross_entropy``: ``functional.cross_entropy``'s signature and semantics on the fast path: the same fused
  call, with the denominator of ``functional.reduce`` and the one host read of an eager check.

``token_stats`` and ``fused_token_loss`` never read a tensor value on the host: bad values only set the ``bad``
flags, and when to raise is the caller's policy.

Under ``torch.compile`` each of the three is one graph break: dynamo runs it eagerly (``torch.compiler.disable``)
and compiles the code before and after it, so a compiled training step that calls losskit gives the eager
results, with losskit's own kernels (C++ or Triton, already fused) serving the loss.
"""

from __future__ import annotations

import torch

from losskit.contract import (
    NORMALIZERS,
    REDUCTIONS,
    CrossEntropyParts,
    FusedLoss,
    StepCounts,
    TokenStats,
    check_choice,
    explain_bad_rows,
)
from losskit.functional.reduce import check_once
from losskit.functional.reduce import normalizer as reduce_normalizer
from losskit.kernels import call as calls
from losskit.kernels.fields import to_token_stats

__all__ = ["cross_entropy", "fused_token_loss", "token_stats"]


@torch.compiler.disable
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
    """Per-token statistics of one streaming pass over the logits.

    With ``z`` a row, ``y`` its target, ``p = softmax(z)``, ``q`` = p renormalised over ``i ≠ y``,
    ``A = [0, V) \\ smoothing_exclude`` (``K = |A|``): ``lse = log Σ e^{z_i}``, ``target_logit = z_y``,
    ``nll = −ln p_y``, ``log1m_target_prob = ln(1 − p_y)``, ``support_mean_logit = Σ_{i∈A} z_i / K``,
    ``support_gap = Σ_{i∈A} (z_i − z_y) / K``, ``entropy = H(p)``, ``wrong_entropy = H(q)``, ``argmax`` (lowest
    index on ties; −1 where invalid), ``correct``, ``bad`` (valid row with an out-of-range target or non-finite
    lse/target logit). Float fields are fp32 (fp64 for fp64 logits), exactly 0 at invalid rows, NaN for
    out-of-range targets. A degenerate row (every non-target logit −inf) has lse = z_y, nll = 0,
    ln(1 − p_y) = −inf, H(p) = H(q) = 0 and zero gradients.

    Plain torch (``impl="torch"``, the oracle)::

        lp = logits.float().log_softmax(-1)
        nll = -lp.gather(-1, target[..., None])[..., 0]
        log1m = logits.float().scatter(-1, target[..., None], -inf).logsumexp(-1) - lp_lse
        entropy = -(lp.exp() * lp).sum(-1)   # with 0·log 0 = 0

    The float fields are differentiable when grad is on; however they are combined, the backward is one
    pass over the logits. No host sync.

    Args:
        logits: ``(N, V)`` or ``(B, T, V)`` (any row strides, e.g. ``x[:, :-1]``), fp16/bf16/fp32/fp64.
        target: int64 (int32 accepted) of the leading shape.
        ignore_index: target value without supervision; None ignores nothing by value.
        mask: optional bool of the leading shape, ANDed into validity.
        smoothing_exclude: excluded class ids E (list, tuple or 1-D int tensor); the support mean and gap use it.
        impl: ``"auto"``, ``"torch"``, ``"chunked"`` or ``"triton"``.
        inplace_grad: write the gradient into the logits' storage in backward (the caller promises nothing
            else reads those logits); their version counter is bumped. Refused on a leaf that requires grad.
        chunk_bytes: chunk budget of ``"chunked"`` (default 4 MiB on CPU, 256 MiB on CUDA).
    """
    c = calls.describe(logits, target, ignore_index=ignore_index, mask=mask, smoothing_exclude=smoothing_exclude,
                       impl=impl, inplace_grad=inplace_grad, chunk_bytes=chunk_bytes)
    return to_token_stats(calls.stats(c), c.prep.valid, c.prep.lead_shape)


@torch.compiler.disable
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
    """Fused per-token loss ``ℓ_t = v_t·w_t·(CE_ε,t + λ·lse_t²)`` in one pass.

    ``CE_ε = nll − ε_t·a/K_t`` with ``a = Σ_{i∈A}(z_i − z_y)``; ``K_t = K`` ("torch") or
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
    ``reduction="sum"`` (chunked on CPU, triton), deferred otherwise. ``impl="torch"`` (the reference) always
    differentiates with autograd: ``grad_mode``, ``grad_scale`` and ``inplace_grad`` are permissions and hints for
    the fast paths and change no value. A gradient of ``token_weight`` (if it requires grad) is
    ``upstream·(CE_ε + λ·lse²)/normalizer``. Never syncs; bad rows set ``stats.bad``.

    Returns:
        ``FusedLoss(loss, token_loss, stats)``; ``token_loss`` (detached, unweighted ``CE_ε + λ·lse²``) and
        ``stats`` have the leading shape.
    """
    c = calls.describe(
        logits, target, ignore_index=ignore_index, mask=mask, token_weight=token_weight,
        label_smoothing=label_smoothing, smoothing_convention=smoothing_convention,
        smoothing_exclude=smoothing_exclude, hard_target_ids=hard_target_ids, z_loss=z_loss, normalizer=normalizer,
        reduction=reduction, grad_mode=grad_mode, grad_scale=grad_scale, inplace_grad=inplace_grad, impl=impl,
        chunk_bytes=chunk_bytes,
    )
    return calls.fused(c)


@torch.compiler.disable
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
    """``functional.cross_entropy`` on the fast path.

    Same signature (plus ``impl``, ``inplace_grad``, ``chunk_bytes``) and semantics: per token
    ``ℓ_n = m_n·u_n·(ℓ^ε_n + λ·lse_n²)``, reduced by ``"none"`` / ``"sum"`` / ``"mean"`` with the
    denominator of ``functional.reduce.normalizer``. The plain torch it equals (``token_weight=None``,
    no exclusions, ``z_loss=0``, "torch" convention)::

        F.cross_entropy(logits.flatten(0, -2), target.flatten(), ignore_index=ignore_index,
                        label_smoothing=eps, reduction=reduction)

    except that an all-invalid ``"mean"`` is a graph-connected 0 with an ``EmptyBatchWarning``.

    Checks like the functional call, with ONE host read (``functional.reduce.check_once``): an out-of-range
    target, NaN/+inf logits, −inf at a target or (ε > 0) inside the smoothing support raise ``LossInputError``
    with the functional call's detailed message. With ``return_parts`` every part is differentiable (deferred
    mode).
    """
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("normalize", normalize, NORMALIZERS)
    c = calls.describe(
        logits, target, ignore_index=ignore_index, mask=mask, token_weight=token_weight,
        label_smoothing=label_smoothing, smoothing_convention=smoothing_convention,
        smoothing_exclude=smoothing_exclude, z_loss=z_loss, reduction="none" if reduction == "none" else "sum",
        inplace_grad=inplace_grad, impl=impl, chunk_bytes=chunk_bytes,
    )
    if reduction == "mean":
        # Raises for normalize="global_tokens" without step_counts, naming functional.step_counts.
        c = c.with_normalizer(reduce_normalizer(c.prep.valid.reshape(c.prep.lead_shape), weight=token_weight,
                                                normalize=normalize, step_counts=step_counts, dtype=c.prep.dtype))
    if return_parts:
        return _parts(c, target)
    res = calls.fused(c)
    _check(c, target, res.stats.bad)
    return res.loss


def _check(c: calls.Call, target: torch.Tensor, bad: torch.Tensor, stacklevel: int = 3) -> None:
    """The one host read of ``cross_entropy``; the detailed checks run only when something is bad."""

    def explain() -> None:
        valid = c.prep.valid.reshape(c.prep.lead_shape)
        support = c.prep.support.indicator.bool() if c.smoothing.eps_t is not None else None
        explain_bad_rows(c.logits, target, valid, smoothing_support=support)

    check_once(bad.any(), c.prep.valid.sum(), explain, stacklevel=stacklevel)


def _parts(c: calls.Call, target: torch.Tensor) -> CrossEntropyParts:
    """``return_parts=True``: loss, nll, smoothing and z-loss parts, all from one differentiable pass."""
    per_token, f = calls.parts(c)
    _check(c, target, f.bad, stacklevel=4)
    weight = calls.row_weight(c)
    z_part = c.z_loss * f.lse * f.lse if c.z_loss else torch.zeros_like(f.nll)
    ce_eps = per_token - z_part if c.z_loss else per_token

    def red(x: torch.Tensor) -> torch.Tensor:
        return calls.reduce_rows(x, c, weight)

    return CrossEntropyParts(
        loss=red(per_token), nll=red(f.nll), smooth=red(ce_eps - f.nll), z_loss=red(z_part),
        num_valid=c.prep.valid.sum(),
    )
