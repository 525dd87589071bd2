"""Which code sweeps the logits for a ``chunked`` call: the native C++ row sweeps, or the pure-torch chunk passes.

``native.cpp`` serves CPU logits whose last dimension has stride 1 once it has been built (``native.module()``);
everything else (other devices, the build unavailable, ``LOSSKIT_CHUNKED_NATIVE=0``) runs ``passes.py``. Both
return the same raw streaming state per row, read by the same ``rowmath`` closed forms, and write the same G.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from losskit.kernels import rowmath
from losskit.kernels.chunked import native, passes
from losskit.kernels.chunked.layout import Plan
from losskit.kernels.prepare import Prepared, Smoothing
from losskit.kernels.rowmath import RowState, RowStats, RowTargets

__all__ = ["eager", "grad", "native_module", "stats"]


def native_module(logits: torch.Tensor):
    """The native extension when it serves ``logits``, else None."""
    if logits.device.type != "cpu" or logits.stride(-1) != 1:
        return None
    return native.module()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``(B, T, V)`` view of 2-D or 3-D logits (no copy)."""
    return x.unsqueeze(0) if x.dim() == 2 else x


def _indicator(prep: Prepared) -> torch.Tensor:
    """The float32 support indicator, or an empty tensor when nothing is excluded (every column in A)."""
    if not prep.support.ids:
        return torch.empty(0)
    return prep.support.indicator.to(torch.float32)


def _empty(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=dtype, device=device)


def _finalize(raw, prep: Prepared) -> RowStats:
    m, d, s, a, ssum, amax_val, amax_idx, zy = raw
    state = RowState(m=m, d=d, s=s, a=a, support_sum=ssum, amax_val=amax_val, amax_idx=amax_idx)
    return rowmath.finalize(state, RowTargets(zy, prep.target, prep.target_in_support, prep.num_support))


def stats(logits: torch.Tensor, prep: Prepared, plan: Plan) -> RowStats:
    """The unmasked ``RowStats`` of every row."""
    mod = native_module(logits)
    if mod is None:
        return passes.stats_pass(logits, prep, plan)
    raw = mod.stats(_rows(logits), prep.target, prep.valid, _indicator(prep), float(prep.num_support))
    return _finalize(raw, prep)


def grad(logits: torch.Tensor, out: torch.Tensor, prep: Prepared, plan: Plan, rs: RowStats,
         co: rowmath.GradCoefficients) -> None:
    """Write G into ``out`` (shaped like ``logits``; may be ``logits`` itself); invalid rows get exact zeros."""
    mod = native_module(logits)
    if mod is None:
        passes.grad_pass(logits, out, prep, plan, rs, co)
        return
    g = passes.GradRows.of(co, rs, prep.target)
    none = _empty(prep.dtype, logits.device)
    mod.grad(_rows(logits), _rows(out), prep.target, prep.valid, g.shift, g.scale,
             none if g.beta is None else g.beta, none if g.gamma is None else g.gamma, g.g_target, _indicator(prep))


def eager(logits: torch.Tensor, out: torch.Tensor, prep: Prepared, plan: Plan, coef: torch.Tensor, sm: Smoothing,
          z_loss: float, coefficients: Callable[[RowStats, slice], rowmath.GradCoefficients]) -> RowStats:
    """The ``RowStats`` of every row, and G of the fused loss with per-row coefficient ``coef`` written into ``out``
    while each row is hot. ``coefficients`` serves the pure-torch passes (the native sweep forms the same closed
    forms itself)."""
    mod = native_module(logits)
    if mod is None:
        return passes.stats_pass(logits, prep, plan, passes.Eager(out, coefficients))
    none = _empty(prep.dtype, logits.device)
    smooth = sm.eps_t is not None
    raw = mod.fused_eager(
        _rows(logits), _rows(out), prep.target, prep.valid, coef,
        sm.eps_t if smooth else none, sm.eps_over_kt if smooth else none, sm.target_in_at if smooth else none,
        float(z_loss), _indicator(prep), float(prep.num_support),
    )
    return _finalize(raw, prep)
