"""One validated call description, and the dispatch of a call to its implementation.

``describe`` checks every argument of ``token_stats`` / ``fused_token_loss`` / ``cross_entropy`` once, in one
order and with one wording (shapes and dtypes, ``ignore_index``, the excluded column ids, the implementation, the
reduction and gradient mode, label smoothing and the hard-target ids, z-loss, normalizer and upstream scale,
in-place permission, chunk budget), and returns a frozen ``Call``. Nothing below it checks again: ``stats``, ``fused`` and ``parts`` run a
``Call`` on the implementation it names (``"torch"``: ``reference``; ``"chunked"``; ``"triton"``).

Which gradient mode a fused call takes (the eager/deferred policy)::

    eager   = impl is "chunked" or "triton", reduction == "sum" and a gradient is wanted, and
              grad_mode == "forward", or grad_mode == "auto" and (impl == "triton" or not on CUDA)
    deferred otherwise (G written in backward from saved row constants; "torch" is always autograd)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types

import torch

from losskit.contract import FusedLoss, LossInputError, check_choice
from losskit.functional.cross_entropy import check_z_loss
from losskit.kernels import chunked, reference
from losskit.kernels.dispatch import resolve_impl
from losskit.kernels.fields import StatFields, to_token_stats
from losskit.kernels.prepare import Prepared, Smoothing, check_label_smoothing, prepare, prepare_smoothing

__all__ = ["DEFAULTS", "FUSED_REDUCTIONS", "GRAD_MODES", "Call", "describe", "fused", "parts", "stats"]

GRAD_MODES: tuple[str, ...] = ("auto", "forward", "backward")
FUSED_REDUCTIONS: tuple[str, ...] = ("sum", "none")


@dataclasses.dataclass(frozen=True)
class Call:
    """A checked call: the logits, their per-row preparation and every option in its final form.

    Attributes:
        logits: the caller's tensor (never copied here).
        prep: flat validity, clamped targets, column sets (``prepare``).
        impl: the resolved implementation, ``"torch"``, ``"chunked"`` or ``"triton"``.
        smoothing: per-row ε_t, ε_t/K_t, ``[y∈A_t]`` (``prepare_smoothing``; None fields when ε = 0).
        z_loss: λ.
        token_weight: per-token coefficients (leading shape) or None.
        normalizer: 0-d tensor in the compute dtype, or None (a sum).
        reduction: ``"sum"`` or ``"none"``.
        grad_mode: ``"auto"``, ``"forward"`` or ``"backward"``.
        grad_scale: the upstream gradient eager mode computes G for (float or 0-d device tensor).
        inplace_grad: whether G may be written into the logits' storage.
        chunk_bytes: the chunk budget of ``"chunked"``.
    """

    logits: torch.Tensor
    prep: Prepared
    impl: str
    smoothing: Smoothing
    z_loss: float
    token_weight: torch.Tensor | None
    normalizer: torch.Tensor | None
    reduction: str
    grad_mode: str
    grad_scale: float | torch.Tensor
    inplace_grad: bool
    chunk_bytes: int

    @property
    def grad_wanted(self) -> bool:
        return _grad_wanted(self.logits)

    def with_normalizer(self, normalizer: torch.Tensor | None) -> Call:
        """The same call reduced by ``normalizer`` (a 0-d tensor from ``functional.reduce``)."""
        return dataclasses.replace(self, normalizer=normalizer)


def _grad_wanted(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise LossInputError(f"{name} must be a bool, got {value!r}")
    return value


def _check_scalar(name: str, value, device: torch.device, *, allow_none: bool):
    """A finite float, a 0-d tensor on ``device``, or (``allow_none``) None."""
    if value is None:
        if allow_none:
            return None
        raise LossInputError(f"{name} must be a number or a 0-d tensor, got None")
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or not value.is_floating_point() and value.dtype not in (torch.int64, torch.int32):
            raise LossInputError(f"{name} must be a 0-d float tensor, got {value.dtype} {tuple(value.shape)}")
        if value.device != device:
            raise LossInputError(f"{name} must be on the device of logits ({device}), got {value.device}")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise LossInputError(f"{name} must be a finite number or a 0-d tensor, got {value!r}")
    return float(value)


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


#: Every option of a call and its default: the keyword arguments of ``kernels.fused_token_loss``.
DEFAULTS = types.MappingProxyType(dict(
    ignore_index=-100, mask=None, token_weight=None, label_smoothing=0.0, smoothing_convention="torch",
    smoothing_exclude=(), hard_target_ids=None, z_loss=0.0, normalizer=None, reduction="sum", grad_mode="auto",
    grad_scale=1.0, inplace_grad=False, impl="auto", chunk_bytes=None,
))


def describe(logits: torch.Tensor, target: torch.Tensor, **options) -> Call:
    """Check every argument once and build the ``Call`` (``LossInputError`` naming the argument otherwise).

    ``options`` are keyword arguments of ``DEFAULTS`` (the public functions pass theirs through).
    """
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"describe() got unknown options {unknown}; known: {sorted(DEFAULTS)}")
    o = {**DEFAULTS, **options}
    ignore_index, mask, token_weight = o["ignore_index"], o["mask"], o["token_weight"]
    label_smoothing, smoothing_convention = o["label_smoothing"], o["smoothing_convention"]
    smoothing_exclude, hard_target_ids, z_loss = o["smoothing_exclude"], o["hard_target_ids"], o["z_loss"]
    normalizer, reduction, grad_mode, grad_scale = o["normalizer"], o["reduction"], o["grad_mode"], o["grad_scale"]
    inplace_grad, impl, chunk_bytes = o["inplace_grad"], o["impl"], o["chunk_bytes"]
    prep = prepare(logits, target, ignore_index=ignore_index, mask=mask, smoothing_exclude=smoothing_exclude,
                   token_weight=token_weight)
    resolved = resolve_impl(impl, logits)
    check_choice("reduction", reduction, FUSED_REDUCTIONS)
    check_choice("grad_mode", grad_mode, GRAD_MODES)
    if grad_mode == "forward" and reduction != "sum":
        raise LossInputError(
            'grad_mode="forward" (eager) needs reduction="sum": per-token upstream gradients are only known in '
            'backward; use grad_mode="backward" or "auto"'
        )
    eps = check_label_smoothing(label_smoothing, smoothing_convention, prep.num_support)
    smoothing = prepare_smoothing(prep, eps, smoothing_convention, hard_target_ids, logits.device)
    lam = check_z_loss(z_loss)
    normalizer = _check_scalar("normalizer", normalizer, logits.device, allow_none=True)
    if reduction == "none" and normalizer is not None:
        raise LossInputError(
            'normalizer applies to reduction="sum" only; with reduction="none" pass normalizer=None'
        )
    if isinstance(normalizer, float):
        normalizer = torch.tensor(normalizer, dtype=prep.dtype, device=logits.device)
    grad_scale = _check_scalar("grad_scale", grad_scale, logits.device, allow_none=False)
    if not isinstance(grad_scale, torch.Tensor) and grad_scale == 0.0:
        raise LossInputError("grad_scale must be non-zero (it is the upstream gradient G is computed for), got 0.0")
    return Call(
        logits=logits,
        prep=prep,
        impl=resolved,
        smoothing=smoothing,
        z_loss=lam,
        token_weight=token_weight,
        normalizer=normalizer,
        reduction=reduction,
        grad_mode=grad_mode,
        grad_scale=grad_scale,
        inplace_grad=_check_inplace_grad(inplace_grad, logits),
        chunk_bytes=chunked.check_chunk_bytes(chunk_bytes, logits.device),
    )


# ------------------------------------------------------------------------------------------------------------
# Running a call.
# ------------------------------------------------------------------------------------------------------------


def _plan(call: Call) -> chunked.Plan:
    return chunked.Plan.make(call.prep.num_classes, call.prep.dtype, call.chunk_bytes)


def _triton():
    # imported only when the Triton path is chosen (resolve_impl has checked that it imports)
    from losskit.kernels import triton

    return triton


def stats(call: Call) -> StatFields:
    """The statistics of one pass, differentiable when a gradient is wanted (deferred mode)."""
    logits, prep = call.logits, call.prep
    if call.impl == "torch":
        return reference.token_fields(logits, prep)[0]
    if call.impl == "triton":
        if call.grad_wanted:
            return StatFields(*_triton().TokenStatsFunction.apply(logits, prep, None, call.inplace_grad))
        with torch.no_grad():
            return _triton().token_stats_fwd(logits, prep)[0]
    if call.grad_wanted:
        return StatFields(*chunked.TokenStatsFunction.apply(logits, prep, _plan(call), call.inplace_grad))
    with torch.no_grad():
        return chunked.finish(chunked.sweeps.stats(logits, prep, _plan(call)), prep)


def _smoothing_bad(f: StatFields, call: Call) -> StatFields:
    """``f`` with the ``bad`` of the fused loss: with ε > 0 a non-finite support mean also counts."""
    if call.smoothing.eps_t is None:
        return f
    return dataclasses.replace(f, bad=f.bad | (call.prep.valid & ~torch.isfinite(f.support_mean_logit)))


def parts(call: Call) -> tuple[torch.Tensor, StatFields]:
    """Deferred mode: flat differentiable per-token ``CE_ε + λ·lse²`` and the fields (with the loss's ``bad``)."""
    if call.impl == "torch":
        per_token, f = reference.fused_terms(call.logits, call.prep, call.smoothing, call.z_loss)
    else:
        f = stats(call)
        per_token = chunked.fused_token_terms(f, call.smoothing, call.z_loss)
    return per_token, _smoothing_bad(f, call)


def row_weight(call: Call) -> torch.Tensor | None:
    """Flat ``token_weight`` in the compute dtype, 0 at invalid rows (where it may be NaN, e.g. ``cw[-100]``)."""
    if call.token_weight is None:
        return None
    prep = call.prep
    zero = torch.zeros((), dtype=prep.dtype, device=prep.valid.device)
    return torch.where(prep.valid, call.token_weight.reshape(-1).to(prep.dtype), zero)


def reduce_rows(x: torch.Tensor, call: Call, weight: torch.Tensor | None) -> torch.Tensor:
    """``Σ_t v_t·w_t·x_t / normalizer`` (None: 1), or ``v_t·w_t·x_t`` in the leading shape for ``"none"``."""
    prep = call.prep
    zero = torch.zeros((), dtype=prep.dtype, device=x.device)
    x = torch.where(prep.valid, x if weight is None else x * weight, zero)
    if call.reduction == "none":
        return x.reshape(prep.lead_shape)
    total = x.sum()
    return total if call.normalizer is None else total / call.normalizer.to(prep.dtype)


def _eager(call: Call) -> bool:
    if call.impl not in ("chunked", "triton") or call.reduction != "sum" or not call.grad_wanted:
        return False
    if call.grad_mode == "forward":
        return True
    # chunked on CUDA stays deferred under "auto": its eager pass holds a chunk-sized G buffer per step
    return call.grad_mode == "auto" and (call.impl == "triton" or call.logits.device.type != "cuda")


def fused(call: Call) -> FusedLoss:
    """``Σ_t v_t·w_t·(CE_ε + λ·lse²) / normalizer`` (or per token) in the gradient mode the policy picks."""
    if _eager(call):
        return _fused_eager(call)
    per_token, f = parts(call)
    return FusedLoss(
        loss=reduce_rows(per_token, call, row_weight(call)),
        token_loss=per_token.detach().reshape(call.prep.lead_shape),
        stats=to_token_stats(f, call.prep.valid, call.prep.lead_shape, detach=True),
    )


def _fused_eager(call: Call) -> FusedLoss:
    normalizer = call.normalizer
    graph_norm = normalizer is not None and normalizer.requires_grad and torch.is_grad_enabled()
    norm_in = normalizer.detach() if graph_norm else normalizer
    if call.impl == "triton":
        tr = _triton()
        opts = tr.FusedOptions(call.prep, call.smoothing, call.z_loss, call.grad_scale, call.inplace_grad)
        out = tr.FusedTokenLossFunction.apply(call.logits, call.token_weight, norm_in, opts)
    else:
        opts = chunked.FusedOptions(call.prep, _plan(call), call.smoothing, call.z_loss, call.grad_scale,
                                    call.inplace_grad)
        out = chunked.FusedTokenLossFunction.apply(call.logits, call.token_weight, norm_in, opts)
    loss, token_loss = out[0], out[1]
    if graph_norm:
        # The value is Σ/normalizer; the ratio is exactly 1, so the upstream reaching the Function stays
        # grad_scale and no rescale pass runs, while the normalizer still gets its gradient.
        loss = loss * (norm_in / normalizer)
    f = _smoothing_bad(StatFields(*out[2:]), call)
    return FusedLoss(
        loss=loss,
        token_loss=token_loss.reshape(call.prep.lead_shape),
        stats=to_token_stats(f, call.prep.valid, call.prep.lead_shape, detach=True),
    )
