"""The ``torch`` implementation: the readable reference.

Plain torch on the whole tensor, computed in fp32 (fp64 stays fp64), gradients by autograd, built on the
functional ops of ``functional/cross_entropy.py``. Tests run it in fp64 as the oracle of ``chunked`` (and of
``triton``). No in-place or eager mode: ``inplace_grad``, ``grad_mode`` and ``grad_scale`` change nothing
here (they are permissions and hints for the fast paths, never semantics).

Per row, with ``lp = log_softmax(z)`` and ``zq`` = z with the target column at −∞::

    lse = logsumexp(z);  target_logit = z_y;  L¬ = logsumexp(zq)
    nll = logaddexp(L¬ − z_y, 0)             # = −lp_y
    log1m_target_prob = −logaddexp(z_y − L¬, 0)  # = logsumexp(zq) − lse
    support_mean_logit = Σ_{i∈A} z_i / K
    entropy = functional.entropy(z);  wrong_entropy = functional.wrong_answer_entropy(z, y)
    argmax = torch.argmax(z)

``nll`` and ``log1m_target_prob`` are written with ``logaddexp(·, 0)`` (a stable softplus) rather than
as ``−lp_y`` and ``logsumexp(zq) − lse``: same values, but autograd then gives the target gradient as
``−(1 − p_y)`` instead of ``p_y − 1``, which in fp64 rounds to 0 beyond a 37-nat margin, and
an oracle must be more accurate than what it judges.

and the fused loss in the dense-sum form the functional oracle uses:
``(1 − ε_t)·nll + ε_t·(−Σ_{c∈A_t} lp_c)/K_t + λ·lse²``.
"""

from __future__ import annotations

import torch

from losskit.functional.cross_entropy import entropy, wrong_answer_entropy
from losskit.kernels.fields import StatFields
from losskit.kernels.prepare import Prepared, Smoothing

_NEG_INF = float("-inf")


def softplus(x: torch.Tensor) -> torch.Tensor:
    """``ln(1 + e^x)`` as ``logaddexp(x, 0)``: stable in value and, unlike ``max(x,0) + log1p(e^{−|x|})``,
    with the exact autograd derivative ``sigmoid(x)`` at ``x = 0`` too."""
    return torch.logaddexp(x, torch.zeros((), dtype=x.dtype, device=x.device))


def _rows(logits: torch.Tensor, prep: Prepared) -> torch.Tensor:
    """``(n, V)`` logits in the compute dtype with invalid rows replaced by zeros (no NaN can leak)."""
    z = logits.reshape(-1, logits.shape[-1]).to(prep.dtype)
    return torch.where(prep.valid[:, None], z, torch.zeros((), dtype=z.dtype, device=z.device))


def _shift(z: torch.Tensor) -> torch.Tensor:
    """The (detached) row maximum, 0 where it is not finite (all −inf, or NaN/+inf: bad rows).

    The statistics are computed on ``z − shift`` and the shift is added back only to lse: a common offset
    then cancels exactly (``z − max`` is exact for logits near the max) instead of rounding lse to the ulp of
    a large logit, which would become the absolute error of nll and of every ``p_j``.
    """
    top = z.detach().amax(dim=-1)
    return torch.where(torch.isfinite(top), top, torch.zeros((), dtype=z.dtype, device=z.device))


def _mask(x: torch.Tensor, prep: Prepared) -> torch.Tensor:
    """0 at invalid rows, NaN at valid rows with an out-of-range target."""
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    nan = torch.full((), float("nan"), dtype=x.dtype, device=x.device)
    return torch.where(prep.out_of_range, nan, torch.where(prep.valid, x, zero))


def token_fields(logits: torch.Tensor, prep: Prepared) -> tuple[StatFields, torch.Tensor]:
    """All statistics of ``token_stats`` (flat, masked) plus ``lp`` (the ``(n, V)`` log-probabilities, for the loss)."""
    z_orig = _rows(logits, prep)
    shift = _shift(z_orig)
    z = z_orig - shift[:, None]
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    tgt = prep.target[:, None]
    # the target logit itself, unshifted: (z_y − max) + max need not round back to z_y
    target_logit = z_orig.gather(-1, tgt)[:, 0]
    lse = torch.logsumexp(z, dim=-1)
    lp = z - lse[:, None]
    zy = z.gather(-1, tgt)[:, 0]
    zq = z.scatter(-1, tgt, _NEG_INF)
    # A degenerate row (no finite non-target logit) has L¬ = −inf: logsumexp's backward would evaluate
    # exp(−inf − (−inf)) = NaN there, so L¬ is taken on a harmless stand-in row and set to −inf afterwards
    # (nll = 0 and ln(1 − p_y) = −inf, each with a zero gradient).
    has_wrong = zq.amax(dim=-1) > _NEG_INF
    lneg_safe = torch.logsumexp(torch.where(has_wrong[:, None], zq, zero), dim=-1)
    neg_inf = torch.full((), _NEG_INF, dtype=z.dtype, device=z.device)
    nll = torch.where(has_wrong, softplus(lneg_safe - zy), zero)
    log1m = torch.where(has_wrong, -softplus(zy - lneg_safe), neg_inf)
    k = prep.num_support
    # support mean: the plain mean of the original logits; gap = mean − z_y taken over z − z_y, where a common
    # offset cancels exactly (the smoothing term uses the gap). where, not a product with the indicator:
    # excluded columns may be −inf (masked vocabulary).
    in_a = prep.support.indicator.bool()
    if k == 0:
        gap = torch.zeros_like(zy)
        support_mean = target_logit
    else:
        gap = torch.where(in_a, z - zy[:, None], zero).sum(-1) / k
        support_mean = torch.where(in_a, z_orig, zero).sum(-1) / k
    h = entropy(z)
    # wrong_answer_entropy gives NaN at out-of-range targets itself; it needs the unclamped target for that.
    hq = wrong_answer_entropy(z, prep.target, ignore_index=None)
    lse = lse + shift
    argmax = torch.argmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
    argmax = torch.where(prep.valid, argmax, torch.full_like(argmax, -1))
    fields = StatFields(
        lse=_mask(lse, prep),
        target_logit=_mask(target_logit, prep),
        nll=_mask(nll, prep),
        log1m_target_prob=_mask(log1m, prep),
        support_mean_logit=_mask(support_mean, prep),
        entropy=_mask(h, prep),
        wrong_entropy=_mask(hq, prep),
        support_gap=_mask(gap, prep),
        argmax=argmax,
        correct=prep.valid & ~prep.out_of_range & (argmax == prep.target),
        bad=prep.valid & (prep.out_of_range | ~torch.isfinite(lse) | ~torch.isfinite(target_logit)),
    )
    return fields, lp


def fused_terms(
    logits: torch.Tensor, prep: Prepared, sm: Smoothing, z_loss: float
) -> tuple[torch.Tensor, StatFields]:
    """Per-token ``CE_ε + λ·lse²`` (flat, differentiable, 0 at invalid rows) and the statistics.

    ``torch``: ``(1 − ε_t)·nll + ε_t·(−Σ_{c∈A} lp_c)/K``; ``fairseq``: the sum and K_t omit the target.
    """
    f, lp = token_fields(logits, prep)
    loss = f.nll
    if sm.eps_t is not None:
        zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
        if prep.support.ids:
            # where, not a product with the indicator: excluded columns may be −inf (masked vocabulary).
            sum_a = torch.where(prep.support.indicator.bool(), lp, zero).sum(-1)
        else:
            sum_a = lp.sum(-1)
        lp_y = -f.nll
        # fairseq: A_t = A \ {y}; torch: A_t = A. target_in_at is [y∈A_t]; [y∈A] − [y∈A_t] removes y.
        sum_at = sum_a - (prep.target_in_support - sm.target_in_at) * lp_y
        k_t = prep.num_support / sm.k_ratio
        smooth = -sum_at / k_t
        smoothed = (1.0 - sm.eps_t) * f.nll + sm.eps_t * smooth
        loss = torch.where(sm.eps_t > 0, smoothed, f.nll)
    if z_loss != 0.0:
        loss = loss + z_loss * f.lse * f.lse
    return _mask(loss, prep), f
