"""The ``triton`` implementation's launchers and autograd Functions.

Layering: ``kernels.py`` (``@triton.jit``) → ``launch.py`` (raw launchers) → ``ops.py`` (torch custom ops) → this
module: launchers on the validated per-row inputs (``prepare.Prepared``, ``prepare.Smoothing``) and the two
autograd Functions, drop-in siblings of ``chunked.TokenStatsFunction`` and ``chunked.FusedTokenLossFunction``
(same inputs, with a ``LaunchConfig`` or None in place of chunked's ``Plan``, and the same outputs in the same
order).

What they compute equals, in plain torch (the oracle the tests use, ``reference.py``)::

    lsm = logits.double().log_softmax(-1)
    nll = -lsm.gather(-1, target[..., None])[..., 0]
    entropy = -(lsm.exp() * lsm).sum(-1)
    ...and autograd for the gradients.

Gradient modes: *deferred* (``TokenStatsFunction``: the forward saves 9 fp32 row constants; the backward is
one pass that folds the upstream gradients of every field into per-row coefficients and writes G) and *eager*
(``FusedTokenLossFunction``: G for an upstream of ``grad_scale`` is written in the forward; backward launches the
guarded rescale, a no-op on the device when the upstream equals ``grad_scale``). With ``inplace`` G goes into the
logits' storage and their version counter is bumped. Nothing here reads a tensor value on the host.
"""

from __future__ import annotations

import dataclasses

import torch

from losskit.contract import LossInputError
from losskit.kernels import eager
from losskit.kernels.fields import StatFields
from losskit.kernels.prepare import Prepared, Smoothing
from losskit.kernels.triton import ops
from losskit.kernels.triton.launch import LaunchConfig, check_logits, default_config, exclusion_bitmask

__all__ = [
    "FusedOptions",
    "FusedTokenLossFunction",
    "LaunchConfig",
    "TokenStatsFunction",
    "fused_loss_bwd",
    "fused_loss_fwd",
    "token_stats_bwd",
    "token_stats_fwd",
]



def resolve_config(config: LaunchConfig | None, logits: torch.Tensor) -> LaunchConfig:
    """``config``, or the table's entry for the logits' V, dtype and device (``launch.default_config``)."""
    if config is None:
        return default_config(logits.shape[-1], logits.dtype, logits.device.type)
    if not isinstance(config, LaunchConfig):
        raise LossInputError(f"config must be a LaunchConfig or None, got {type(config).__name__}")
    return config


def _cfg_args(cfg: LaunchConfig) -> tuple[int, int, int, int]:
    return cfg.block_v, cfg.rows, cfg.num_warps, cfg.num_stages


def _excl(prep: Prepared, device: torch.device) -> torch.Tensor | None:
    return exclusion_bitmask(prep.support.ids, prep.num_classes, device)


def _check(logits: torch.Tensor, prep: Prepared) -> None:
    check_logits(logits)
    if prep.dtype != torch.float32:
        raise LossInputError(f'impl="triton" computes in fp32, got a call prepared for {prep.dtype}')


def token_stats_fwd(
    logits: torch.Tensor, prep: Prepared, config: LaunchConfig | None = None, *, save_constants: bool = False
) -> tuple[StatFields, torch.Tensor | None]:
    """Pass 1 (``_token_stats_kernel``): the masked ``StatFields`` of every row, flat ``(n,)``.

    With ``save_constants`` also the ``(9, n)`` fp32 row constants the deferred backward needs (shift m, ln d,
    1/d, p_y, 1 − p_y, nll, ln(1 − p_y), H, H(q); 0 at invalid rows), else None. No host sync.
    """
    _check(logits, prep)
    cfg = resolve_config(config, logits)
    outs = ops.token_stats(
        logits, prep.target, prep.valid, prep.out_of_range, _excl(prep, logits.device), prep.num_support,
        save_constants, *_cfg_args(cfg),
    )
    return StatFields(*outs[:11]), (outs[11] if save_constants else None)


def token_stats_bwd(
    logits: torch.Tensor,
    prep: Prepared,
    constants: torch.Tensor,
    grads: list[torch.Tensor | None],
    *,
    inplace: bool,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """The one-pass backward (``_token_grad_kernel``) for upstream ``grads`` of the 8 float StatFields.

    ``grads`` follow the float fields' order (lse, target_logit, nll, log1m_target_prob, support_mean_logit,
    entropy, wrong_entropy, support_gap); each is None (unused: its term is compiled out) or ``(n,)``-shaped, any
    float dtype and stride (a broadcast scalar stays stride 0). Returns G: a new tensor shaped like ``logits``, or
    ``logits`` itself with ``inplace`` (its version counter bumped).
    """
    cfg = resolve_config(config, logits)
    flat = [None if g is None else g.reshape(-1) for g in grads]
    args = (prep.target, prep.valid, _excl(prep, logits.device), prep.num_support, constants, flat, *_cfg_args(cfg))
    if inplace:
        ops.token_grad_inplace(logits, *args)
        torch.autograd.graph.increment_version(logits)
        return logits
    return ops.token_grad(logits, *args)


def fused_loss_fwd(
    logits: torch.Tensor,
    token_weight: torch.Tensor | None,
    prep: Prepared,
    sm: Smoothing,
    z_loss: float,
    normalizer: torch.Tensor | None,
    grad_scale,
    *,
    inplace: bool,
    config: LaunchConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, StatFields]:
    """Eager fused loss (``_fused_loss_kernel``): ``(G, loss, token_loss, fields)``.

    ``loss = Σ_t v_t·w_t·(CE_ε + λ·lse²) / normalizer`` (0-d fp32; None normalizer means 1), ``token_loss`` the
    unweighted per-token ``CE_ε + λ·lse²`` (flat), G the gradient for an upstream of ``grad_scale`` (float or 0-d
    device tensor), written into a new tensor or, with ``inplace``, into ``logits`` (version bumped).
    """
    _check(logits, prep)
    cfg = resolve_config(config, logits)
    w = None if token_weight is None else token_weight.reshape(-1)
    gs_t = grad_scale if isinstance(grad_scale, torch.Tensor) else None
    gs = 1.0 if gs_t is not None else float(grad_scale)
    args = (
        prep.target, prep.valid, prep.out_of_range, _excl(prep, logits.device), prep.num_support, w, gs, gs_t,
        normalizer, sm.eps_t, sm.eps_over_kt, sm.target_in_at, float(z_loss), *_cfg_args(cfg),
    )
    if inplace:
        outs = ops.fused_loss_inplace(logits, *args)
        torch.autograd.graph.increment_version(logits)
        grad = logits
    else:
        grad, *outs = ops.fused_loss(logits, *args)
    row_loss, token_loss = outs[0], outs[1]
    loss = row_loss.sum()
    if normalizer is not None:
        loss = loss / normalizer.to(torch.float32)
    return grad, loss, token_loss, StatFields(*outs[2:])


def fused_loss_bwd(
    grad: torch.Tensor, upstream: torch.Tensor, grad_scale, config: LaunchConfig | None = None
) -> torch.Tensor:
    """Eager backward (``_grad_rescale_kernel``): ``grad *= upstream / grad_scale`` in place, on the device; each
    program returns at once when they are equal. Returns ``grad``."""
    cfg = resolve_config(config, grad)
    exp_t = grad_scale if isinstance(grad_scale, torch.Tensor) else None
    ops.grad_rescale(grad, upstream, 1.0 if exp_t is not None else float(grad_scale), exp_t, *_cfg_args(cfg))
    return grad


def _rescale(ctx, grad: torch.Tensor, g_loss: torch.Tensor) -> None:
    """``eager.backward``'s rescale: ``fused_loss_bwd`` with the config the forward launched with."""
    fused_loss_bwd(grad, g_loss, ctx.grad_scale, ctx.cfg)


class TokenStatsFunction(torch.autograd.Function):
    """Deferred mode: the forward streams the statistics and saves row constants; the backward is one pass.

    ``apply(logits, prep, config, inplace)``; outputs: the float fields of ``TokenStats`` (``FLOAT_FIELDS`` order,
    the last being ``support_gap = a/K``), then argmax, correct, bad (non-differentiable).
    """

    @staticmethod
    def forward(ctx, logits, prep: Prepared, config: LaunchConfig | None, inplace: bool):
        cfg = resolve_config(config, logits)
        f, consts = token_stats_fwd(logits, prep, cfg, save_constants=True)
        ctx.save_for_backward(logits, consts)
        ctx.prep, ctx.cfg, ctx.inplace = prep, cfg, inplace
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(f.argmax, f.correct, f.bad)
        return f.outputs()

    @staticmethod
    @torch.compiler.disable  # runs from loss.backward() inside a compiled step: eager, not traced
    def backward(ctx, *grads):
        eager.check_once_differentiable("triton")
        logits, consts = ctx.saved_tensors
        if all(g is None for g in grads[:8]):
            return None, None, None, None
        g = token_stats_bwd(logits, ctx.prep, consts, list(grads[:8]), inplace=ctx.inplace, config=ctx.cfg)
        return g, None, None, None


@dataclasses.dataclass(frozen=True)
class FusedOptions:
    """The non-tensor inputs of ``FusedTokenLossFunction`` (the fields of ``chunked.FusedOptions`` with a
    ``LaunchConfig`` in place of the chunk plan; any object with these attributes works, a missing ``config``
    meaning the table's entry): the call's rows, smoothing, λ, the upstream gradient G is computed for (float or
    0-d device tensor) and whether G goes into the logits."""

    prep: Prepared
    smoothing: Smoothing
    z_loss: float
    grad_scale: float | torch.Tensor
    inplace: bool
    config: LaunchConfig | None = None


class FusedTokenLossFunction(torch.autograd.Function):
    """Eager mode: G for an upstream of ``grad_scale`` is written in the forward.

    ``apply(logits, token_weight, normalizer, options)`` with ``options`` a ``FusedOptions`` (or
    ``chunked.FusedOptions``); outputs: loss, token_loss, then the ``StatFields`` in order (all but the loss
    non-differentiable). Backward rescales G on the device when the upstream differs from ``grad_scale`` (no host
    read); a second backward (``retain_graph``) raises. A ``token_weight`` that requires grad gets
    ``upstream·token_loss·v_t/normalizer``.
    """

    @staticmethod
    def forward(ctx, logits, token_weight, normalizer, opts):
        cfg = resolve_config(getattr(opts, "config", None), logits)
        prep = opts.prep
        grad, loss, token_loss, f = fused_loss_fwd(
            logits, token_weight, prep, opts.smoothing, opts.z_loss, normalizer, opts.grad_scale,
            inplace=opts.inplace, config=cfg,
        )
        ctx.cfg = cfg
        return eager.end_forward(ctx, impl="triton", rescale=_rescale, grad=grad, grad_scale=opts.grad_scale,
                                 token_weight=token_weight, valid=prep.valid, normalizer=normalizer, loss=loss,
                                 token_loss=token_loss, outputs=f.outputs())

    backward = staticmethod(eager.backward)
