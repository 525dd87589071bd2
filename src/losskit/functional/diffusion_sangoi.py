"""The Sangoi loss weight (seed 001).

The seed's ``_sangoi_loss_modifier`` (OneTrainer, README of October 2024) weights each example by
``exp(−(1 − MAPE)·log(1 + clamp(SNR, 1e-4, 100)))``, where MAPE is the mean of ``min(|(t − p)/(t + 1e-8)|, 1)``
over the example. This module computes the same numbers without its NaNs: the README divides by ``t + 1e-8``,
which is 0 for a target of −1e-8 and for any zero fp16 target (1e-8 underflows), giving 0/0 = NaN.
"""

from __future__ import annotations

import math

import torch

from losskit.contract import LossInputError
from losskit.functional.diffusion_weights import _compute_dtype

__all__ = ["sangoi_mape", "sangoi_relative_error", "sangoi_weight", "sangoi_weight_from_mape"]


def _check_snr_range(min_snr: float, max_snr: float) -> None:
    for name, value in (("min_snr", min_snr), ("max_snr", max_snr)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise LossInputError(f"{name} must be a number, got {value!r}")
    if not 0 <= min_snr <= max_snr:
        raise LossInputError(f"need 0 <= min_snr <= max_snr, got min_snr={min_snr!r}, max_snr={max_snr!r}")


def _check_float_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise LossInputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise LossInputError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def _snr_per_example(snr: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    """``snr`` as a ``[B]`` tensor in the compute dtype; ``[B]``, ``[B, 1, ...]`` or one value are accepted."""
    if not isinstance(snr, torch.Tensor):
        snr = torch.as_tensor(snr, dtype=torch.float64)
    if snr.is_complex():
        raise LossInputError(f"snr must be a real tensor, got dtype {snr.dtype}")
    if snr.numel() == 1:
        snr = snr.reshape(1).expand(batch)
    elif snr.numel() != batch or (snr.dim() > 0 and snr.shape[0] != batch):
        raise LossInputError(
            f"snr must hold one value per example (shape [{batch}] for batch size B={batch}), got shape "
            f"{tuple(snr.shape)}"
        )
    return snr.reshape(batch).to(device=device, dtype=_compute_dtype(device))


def sangoi_weight_from_mape(
    snr: torch.Tensor,
    mape: torch.Tensor,
    *,
    min_snr: float = 1e-4,
    max_snr: float = 100.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The last two lines of the Sangoi rule: ``w = exp(−(1 − MAPE)·log1p(clamp(SNR, min_snr, max_snr)))``.

    Equivalently ``(1 + s)^(MAPE − 1)``. ``w ∈ [1/(1 + max_snr), 1]``; MAPE 1 gives 1; MAPE 0 with
    ``SNR ≤ max_snr`` equals P2's ε weight with k = 1, γ = 1. ``+∞`` SNR is clamped to ``max_snr``; NaN propagates.

    Plain torch (the seed): ``torch.exp(-(1 - mape) * torch.log(snr.clamp(min_snr, max_snr) + 1))``.

    Args:
        snr: ``[B]`` SNR values (≥ 0).
        mape: ``[B]`` MAPE values in ``[0, 1]``; its graph is kept (the caller decides on detaching).
        min_snr, max_snr: the clamp, ``0 ≤ min_snr ≤ max_snr``.
        dtype: output dtype.

    Returns:
        ``[B]`` weights in ``dtype``.
    """
    _check_snr_range(min_snr, max_snr)
    if not isinstance(mape, torch.Tensor):
        mape = torch.as_tensor(mape, dtype=torch.float64)
    batch = mape.numel()
    s = _snr_per_example(snr, batch, mape.device).clamp(min=min_snr, max=max_snr)
    m = mape.reshape(batch).to(s.dtype)
    return torch.exp(-(1 - m) * torch.log1p(s)).to(dtype)


def sangoi_relative_error(
    predicted: torch.Tensor, target: torch.Tensor, *, eps: float = 1e-8
) -> torch.Tensor:
    """Element-wise ``rel = min(|t − p| / |t + eps|, 1)`` without NaN or ∞.

    Computed in ``c = promote(predicted.dtype, target.dtype, float32)``. Where ``|t + eps| > 0`` it equals the
    README's ``torch.clamp(torch.abs((t - p) / (t + eps)), 0, 1)`` bit for bit (``|a|/|b| = |a/b|`` in IEEE
    arithmetic). Where ``t + eps = 0`` it is 1 if ``p ≠ t`` (README: ∞, clamped to 1) and 0 if ``p = t`` (README:
    NaN). The denominator is made safe before dividing, so no branch holds inf/NaN and gradients stay finite.
    NaN or ∞ in ``predicted``/``target`` gives NaN at that element (never hidden by the clamp).
    """
    c = torch.promote_types(torch.promote_types(predicted.dtype, target.dtype), torch.float32)
    p, t = predicted.to(c), target.to(c)
    err = torch.abs(t - p)
    den = torch.abs(t + eps)
    nonzero = den > 0
    rel = torch.where(nonzero, err / torch.where(nonzero, den, torch.ones_like(den)), (err > 0).to(c))
    rel = torch.clamp(rel, max=1.0)
    finite = torch.isfinite(p) & torch.isfinite(t)
    return torch.where(finite, rel, torch.full_like(rel, math.nan))


def sangoi_mape(
    predicted: torch.Tensor,
    target: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Per-example ``MAPE_b = Σ_e m_be·rel_be / Σ_e m_be`` over all non-batch elements (``m ≡ 1`` without mask).

    A fully masked example has MAPE 1 (weight 1: neutral, since its masked loss is 0). Masked-out elements are
    excluded entirely, so a NaN there does not reach the example. Without a mask this is the seed's
    ``rel.mean(dim=[1, 2, 3])`` generalised to all non-batch dims.

    Returns:
        ``[B]`` MAPE in dtype ``c`` (see :func:`sangoi_relative_error`), with the inputs' graph.
    """
    batch = predicted.shape[0]
    rel = sangoi_relative_error(predicted, target, eps=eps).reshape(batch, -1)
    if mask is None and rel.shape[1] > 0:
        return rel.mean(dim=1)
    if mask is None:
        m = torch.zeros_like(rel)
    else:
        if not isinstance(mask, torch.Tensor):
            raise LossInputError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        try:
            m = torch.broadcast_to(mask, predicted.shape)
        except RuntimeError:
            raise LossInputError(
                f"mask must broadcast to the shape of predicted {tuple(predicted.shape)}, got {tuple(mask.shape)}"
            ) from None
        m = m.to(device=rel.device, dtype=rel.dtype).reshape(batch, -1)
    total = (torch.where(m != 0, m * rel, torch.zeros_like(rel))).sum(dim=1)
    count = m.sum(dim=1)
    has = count > 0
    return torch.where(has, total / torch.where(has, count, torch.ones_like(count)), torch.ones_like(count))


def sangoi_weight(
    snr: torch.Tensor,
    predicted: torch.Tensor,
    target: torch.Tensor,
    gamma: float | None = None,
    *,
    mask: torch.Tensor | None = None,
    min_snr: float = 1e-4,
    max_snr: float = 100.0,
    eps: float = 1e-8,
    detach: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Sangoi per-example loss weights (seed 001), NaN-safe.

    ::

        rel_be = min(|t − p| / |t + eps|, 1)      (0 where t + eps = 0 and p = t; 1 where t + eps = 0 and p ≠ t)
        MAPE_b = Σ_e m_be·rel_be / Σ_e m_be       (1 if Σ_e m_be = 0)
        w_b    = exp(−(1 − MAPE_b)·log1p(clamp(SNR_b, min_snr, max_snr)))

    Plain torch (the README, finite wherever ``t + eps ≠ 0``)::

        mape = torch.clamp(torch.abs((target - predicted) / (target + 1e-8)), 0, 1).flatten(1).mean(1)
        w = torch.exp(-(1 - mape) * torch.log(torch.clamp(snr, 1e-4, 100) + 1))

    ``w ∈ [1/(1 + max_snr), 1]``: never above 1, so the README's "reward" is a loss discount. The prediction type is
    ignored, as in the seed; ``min_snr=0`` reproduces the zero-terminal setting of sd-scripts' port (w = 1 at SNR 0).

    Args:
        snr: ``[B]`` SNR per example (replaces the seed's ``timesteps`` + scheduler lookup).
        predicted: ``[B, ...]`` network output, rank ≥ 1, floating point.
        target: same shape as ``predicted``.
        gamma: accepted and unused (the seed documents it as unused); any value gives the same weights.
        mask: optional bool or float mask broadcasting to ``predicted``.
        min_snr, max_snr: SNR clamp (the seed's 1e-4 and 100).
        eps: the seed's 1e-8 added to the target.
        detach: if False, keep the gradient through MAPE (the seed's original behaviour).
        dtype: output dtype.

    Returns:
        ``[B]`` weights, detached by default, on the device of ``predicted``.
    """
    del gamma  # positional compatibility with the seed only
    predicted = _check_float_tensor("predicted", predicted)
    target = _check_float_tensor("target", target)
    if predicted.dim() == 0:
        raise LossInputError(
            "predicted must have a batch dimension (rank >= 1, shape [B, ...]), got a 0-d tensor"
        )
    if predicted.shape != target.shape:
        raise LossInputError(
            f"target must have the shape of predicted {tuple(predicted.shape)}, got {tuple(target.shape)}"
        )
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps):
        raise LossInputError(f"eps must be a finite number, got {eps!r}")
    if detach:
        predicted, target = predicted.detach(), target.detach()
    mape = sangoi_mape(predicted, target, mask=mask, eps=eps)
    return sangoi_weight_from_mape(snr, mape, min_snr=min_snr, max_snr=max_snr, dtype=dtype)
