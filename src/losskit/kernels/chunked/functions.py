"""The autograd Functions of the ``chunked`` implementation and the masking of its per-row outputs.

Gradient modes: *deferred* (``TokenStatsFunction``: row constants saved, one recompute pass in backward) and
*eager* (``FusedTokenLossFunction``: G written in the forward while the chunk is cache-hot, only a guarded
rescale in backward). In-place mode writes G into the logits' storage and bumps its version counter, so any
other consumer of those logits fails loudly.
"""

from __future__ import annotations

import dataclasses

import torch

from losskit.kernels import eager, rowmath
from losskit.kernels.chunked import sweeps
from losskit.kernels.chunked.layout import Plan
from losskit.kernels.fields import StatFields
from losskit.kernels.prepare import Prepared, Smoothing
from losskit.kernels.rowmath import RowStats

__all__ = ["FusedOptions", "FusedTokenLossFunction", "TokenStatsFunction", "finish", "fused_token_terms"]



def finish(rs: RowStats, prep: Prepared) -> StatFields:
    """The masked outputs of a pass: float fields 0 at invalid rows and NaN at out-of-range targets, argmax −1
    at invalid rows, ``correct``, and ``bad`` (a valid row with an out-of-range target or a non-finite lse /
    target logit)."""
    valid, oob = prep.valid, prep.out_of_range
    zero = torch.zeros((), dtype=rs.lse.dtype, device=rs.lse.device)
    nan = torch.full((), float("nan"), dtype=rs.lse.dtype, device=rs.lse.device)

    def m(x: torch.Tensor) -> torch.Tensor:
        return torch.where(oob, nan, torch.where(valid, x, zero))

    argmax = torch.where(valid, rs.argmax, torch.full_like(rs.argmax, -1))
    return StatFields(
        lse=m(rs.lse),
        target_logit=m(rs.target_logit),
        nll=m(rs.nll),
        log1m_target_prob=m(rs.log1m),
        support_mean_logit=m(rs.support_mean),
        entropy=m(rs.entropy),
        wrong_entropy=m(rs.wrong_entropy),
        support_gap=m(rs.support_gap),
        argmax=argmax,
        correct=valid & ~oob & (argmax == prep.target),
        bad=valid & (oob | ~torch.isfinite(rs.lse) | ~torch.isfinite(rs.target_logit)),
    )


def _masked_constants(rs: RowStats, valid: torch.Tensor) -> RowStats:
    """Row constants for the backward with invalid rows zeroed, so no NaN of an ignored row can leak."""
    zero = torch.zeros((), dtype=rs.lse.dtype, device=rs.lse.device)
    keep = {"argmax"}
    cleared = {"target_logit", "support_gap", "support_mean"}  # not read by the backward
    return RowStats(**{
        f.name: getattr(rs, f.name) if f.name in keep
        else zero if f.name in cleared
        else torch.where(valid, getattr(rs, f.name), zero)
        for f in dataclasses.fields(rs)
    })


def _mask_coefficients(co: rowmath.GradCoefficients, valid: torch.Tensor) -> rowmath.GradCoefficients:
    zero = torch.zeros((), dtype=co.alpha.dtype, device=co.alpha.device)

    def m(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else torch.where(valid, x, zero)

    return rowmath.GradCoefficients(m(co.alpha), m(co.beta), m(co.gamma), m(co.g_target))


class TokenStatsFunction(torch.autograd.Function):
    """Deferred mode: forward streams the statistics and saves row constants; backward is one pass.

    ``apply(logits, prep, plan, inplace)``. Outputs: the float fields of ``TokenStats`` (``FLOAT_FIELDS`` order),
    then argmax, correct, bad.
    """

    @staticmethod
    def forward(ctx, logits, prep: Prepared, plan: Plan, inplace: bool):
        rs = sweeps.stats(logits, prep, plan)
        f = finish(rs, prep)
        ctx.save_for_backward(logits)
        ctx.prep, ctx.plan, ctx.inplace = prep, plan, inplace
        ctx.rs = _masked_constants(rs, prep.valid)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(f.argmax, f.correct, f.bad)
        return f.outputs()

    @staticmethod
    @torch.compiler.disable  # runs from loss.backward() inside a compiled step: eager, not traced
    def backward(ctx, g_lse, g_zy, g_nll, g_l1m, g_mean, g_h, g_hq, g_gap, *_):
        eager.check_once_differentiable("chunked")
        (logits,) = ctx.saved_tensors
        prep: Prepared = ctx.prep
        valid = prep.valid
        zero = torch.zeros((), dtype=prep.dtype, device=logits.device)

        def flat(g):
            return None if g is None else torch.where(valid, g.reshape(-1).to(prep.dtype), zero)

        g_lse, g_zy, g_nll, g_l1m, g_mean, g_h, g_hq, g_gap = map(
            flat, (g_lse, g_zy, g_nll, g_l1m, g_mean, g_h, g_hq, g_gap)
        )
        if g_gap is not None:  # support_gap = support mean − z_y
            g_mean = g_gap if g_mean is None else g_mean + g_gap
            g_zy = -g_gap if g_zy is None else g_zy - g_gap
        co = rowmath.stats_grad_coefficients(
            ctx.rs, prep.target_in_support, prep.num_support,
            g_lse=g_lse, g_zy=g_zy, g_nll=g_nll, g_l1m=g_l1m, g_mean=g_mean, g_h=g_h, g_hq=g_hq,
        )
        co = _mask_coefficients(co, valid)
        out = logits if ctx.inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        sweeps.grad(logits, out, prep, ctx.plan, ctx.rs, co)
        if ctx.inplace:
            torch.autograd.graph.increment_version(logits)
        return out, None, None, None


def fused_token_terms(f: StatFields, sm: Smoothing, z_loss: float) -> torch.Tensor:
    """Per-token ``CE_ε + λ·lse²`` from the fields: ``nll − ε_t·(K/K_t)·support_gap + λ·lse²``."""
    loss = f.nll
    if sm.eps_t is not None:
        loss = rowmath.smoothed_nll(f.nll, f.support_gap, sm.eps_t * sm.k_ratio)
    if z_loss != 0.0:
        loss = loss + z_loss * f.lse * f.lse
    return loss


def _rescale(ctx, grad: torch.Tensor, g_loss: torch.Tensor) -> None:
    """``G ← G·g_loss/grad_scale`` in place: skipped when the two agree on the host, one elementwise op (no
    host read) when either lives on a device."""
    expected = _host_scalar(ctx.grad_scale)
    actual = _host_scalar(g_loss)
    if expected is not None and actual is not None:
        if actual != expected:
            grad.mul_(actual / expected)
        return
    # Device scalars: one elementwise rescale (exactly ×1 when they agree), no host read.
    scale = ctx.grad_scale if isinstance(ctx.grad_scale, torch.Tensor) else torch.tensor(ctx.grad_scale)
    grad.mul_((g_loss / scale.to(device=g_loss.device, dtype=g_loss.dtype)).to(grad.dtype))


def _host_scalar(x) -> float | None:
    """The value of a float or of a CPU 0-d tensor, read without a device sync; None for device tensors.

    A CPU tensor lives in host memory, so reading it stalls nothing; numpy reads it without going through
    the dispatcher (no ``aten._local_scalar_dense``), so the no-sync guard stays meaningful for device reads.
    """
    if not isinstance(x, torch.Tensor):
        return float(x)
    if x.device.type != "cpu":
        return None
    try:
        return float(x.detach().numpy())
    except (ImportError, RuntimeError, TypeError):
        return None


@dataclasses.dataclass(frozen=True)
class FusedOptions:
    """The non-tensor inputs of ``FusedTokenLossFunction``: the call's rows, chunk plan, smoothing, λ, the
    upstream gradient G is computed for (float or 0-d device tensor) and whether G goes into the logits."""

    prep: Prepared
    plan: Plan
    smoothing: Smoothing
    z_loss: float
    grad_scale: float | torch.Tensor
    inplace: bool


class FusedTokenLossFunction(torch.autograd.Function):
    """Eager mode: G for an upstream of ``grad_scale`` is written in the forward, chunk by chunk.

    ``apply(logits, token_weight, normalizer, options)``. Backward only checks the upstream: equal to
    ``grad_scale`` → G as is; else G is rescaled in place. A second backward (``retain_graph``) raises: the buffer
    was handed to autograd by the first. Outputs: loss, token_loss, then the ``StatFields`` in order (all but the
    loss non-differentiable).
    """

    @staticmethod
    def forward(ctx, logits, token_weight, normalizer, opts: FusedOptions):
        prep, sm, z_loss = opts.prep, opts.smoothing, opts.z_loss
        valid = prep.valid
        dt = prep.dtype
        zero = torch.zeros((), dtype=dt, device=logits.device)
        w = None if token_weight is None else torch.where(valid, token_weight.reshape(-1).to(dt), zero)
        coef = torch.where(valid, torch.ones((), dtype=dt, device=logits.device), zero) if w is None else w
        if isinstance(opts.grad_scale, torch.Tensor):
            coef = coef * opts.grad_scale.to(dt)
        elif opts.grad_scale != 1.0:
            coef = coef * float(opts.grad_scale)
        if normalizer is not None:
            coef = coef / normalizer.to(dt)
        out = logits if opts.inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)

        def coefficients(rs: RowStats, sl: slice) -> rowmath.GradCoefficients:
            smooth = sm.eps_t is not None
            co = rowmath.fused_grad_coefficients(
                rs,
                coef[sl],
                sm.eps_t[sl] if smooth else None,
                sm.eps_over_kt[sl] if smooth else None,
                sm.target_in_at[sl] if smooth else None,
                z_loss,
            )
            return _mask_coefficients(co, valid[sl])

        rs = sweeps.eager(logits, out, prep, opts.plan, coef, sm, z_loss, coefficients)
        f = finish(rs, prep)
        token_loss = fused_token_terms(f, sm, z_loss)
        weighted = token_loss if w is None else token_loss * w
        loss = torch.where(valid, weighted, zero).sum()
        if normalizer is not None:
            loss = loss / normalizer.to(dt)
        if opts.inplace:
            torch.autograd.graph.increment_version(logits)
        return eager.end_forward(ctx, impl="chunked", rescale=_rescale, grad=out, grad_scale=opts.grad_scale,
                                 token_weight=token_weight, valid=valid, normalizer=normalizer, loss=loss,
                                 token_loss=token_loss, outputs=f.outputs())

    backward = staticmethod(eager.backward)
