"""Diffusion loss weighting: schedules, SNR and per-example weights.

The public face of three modules: :mod:`~losskit.functional.diffusion_schedules` (schedules, SNR, λ),
:mod:`~losskit.functional.diffusion_weights` (min-SNR-γ, debiased, P2, EDM, SD3 in λ) and
:mod:`~losskit.functional.diffusion_sangoi` (the seed-001 Sangoi weight). This module adds the dispatcher
:func:`loss_weight` that ``SNRWeightModifier`` uses, and :func:`sangoi_loss_modifier`, the drop-in for the seed's
``_sangoi_loss_modifier(timesteps, predicted, target, gamma, device)``.

Typical use::

    table = alphas_cumprod_from_betas(scaled_linear_betas())
    lam = log_snr_from_alphas_cumprod(table, timesteps)            # [B], float64
    w = min_snr_weight(lam, prediction_type="epsilon", gamma=5.0)  # [B], float32, detached
    loss = (w * ((pred - eps) ** 2).flatten(1).mean(1)).mean()
"""

from __future__ import annotations

from typing import Any

import torch

import losskit.functional.diffusion_sangoi as _sangoi_module
import losskit.functional.diffusion_schedules as _schedules_module
import losskit.functional.diffusion_weights as _weights_module
from losskit.contract import LossInputError, check_choice
from losskit.functional.diffusion_sangoi import *
from losskit.functional.diffusion_schedules import *
from losskit.functional.diffusion_weights import *
from losskit.functional.diffusion_weights import _warn_once

# The public face: this module's two functions and the three submodules' own lists.
__all__ = ["loss_weight", "sangoi_loss_modifier"]
__all__ += _schedules_module.__all__ + _weights_module.__all__ + _sangoi_module.__all__

_COMMON = ("snr_clamp_min", "snr_clamp_max", "dtype")
# The keyword parameters each scheme takes through loss_weight (besides prediction_type/convention).
_SCHEME_PARAMS: dict[str, tuple[str, ...]] = {
    "constant": _COMMON,
    "min_snr": ("gamma", *_COMMON),
    "debiased": _COMMON,
    "p2": ("gamma", "k", *_COMMON),
    "edm": ("sigma_data", *_COMMON),
    "sd3_sigma_sqrt": _COMMON,
    "sd3_cosmap": _COMMON,
    "sangoi": ("gamma", "eps", "detach", *_COMMON),
}
_SANGOI_DEFAULT_MIN_SNR = 1e-4
_SANGOI_DEFAULT_MAX_SNR = 100.0


def loss_weight(
    scheme: str,
    log_snr: torch.Tensor,
    *,
    prediction_type: str,
    convention: str = "reference",
    predicted: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    **params: Any,
) -> torch.Tensor:
    """Per-example weights of one scheme: the dispatcher behind ``SNRWeightModifier``.

    Args:
        scheme: one of ``SCHEMES``: ``constant``, ``sangoi``, ``min_snr``, ``debiased``, ``p2``,
            ``sd3_sigma_sqrt``, ``sd3_cosmap``, ``edm``.
        log_snr: λ per example (``[B]`` usually).
        prediction_type: the loss space (``epsilon``, ``v_prediction``, ``sample``/``x0``, ``flow``).
        convention: ``reference``, ``onetrainer``, ``kohya`` or ``diffusers`` (checked for min_snr, debiased
            and p2, ignored by the others).
        predicted, target, mask: Sangoi only (required for it): the tensors its MAPE is computed on.
        **params: the scheme's own keywords: ``gamma`` (min_snr, p2; accepted and unused by sangoi), ``k`` (p2),
            ``sigma_data`` (edm), ``eps`` and ``detach`` (sangoi), and for every scheme ``snr_clamp_min``,
            ``snr_clamp_max`` (None = the scheme's default; for Sangoi ``[1e-4, 100]``) and ``dtype``.

    Returns:
        Weights shaped like ``log_snr`` (``[B]`` for Sangoi), in ``dtype`` (float32 by default), detached unless
        Sangoi is called with ``detach=False``.

    The SD3 multipliers are literal multipliers of the loss as computed; on a loss space other than ``flow`` or
    ``sample`` they warn once.
    """
    check_choice("scheme", scheme, SCHEMES)
    space = canonical_prediction_type(prediction_type)
    check_choice("convention", convention, CONVENTIONS)
    allowed = _SCHEME_PARAMS[scheme]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise LossInputError(
            f"loss_weight({scheme!r}) got unexpected parameter(s) {', '.join(unknown)}; accepted: {', '.join(allowed)}"
        )
    if scheme != "sangoi" and (predicted is not None or target is not None or mask is not None):
        raise LossInputError(
            f"predicted, target and mask are used by scheme 'sangoi' only, got scheme {scheme!r}"
        )
    if scheme == "min_snr":
        return min_snr_weight(log_snr, prediction_type=prediction_type, convention=convention, **params)
    if scheme == "debiased":
        return debiased_weight(log_snr, prediction_type=prediction_type, convention=convention, **params)
    if scheme == "p2":
        return p2_weight(log_snr, prediction_type=prediction_type, convention=convention, **params)
    if scheme == "edm":
        return edm_weight(log_snr, prediction_type=prediction_type, **params)
    if scheme in ("sd3_sigma_sqrt", "sd3_cosmap"):
        if space not in ("flow", "sample"):
            _warn_once(
                f"sd3:{space}",
                f"{scheme} is a literal multiplier of the flow/x0 loss as computed; applying it to a "
                f"prediction_type={prediction_type!r} loss changes the objective",
            )
        fn = sd3_sigma_sqrt_weight if scheme == "sd3_sigma_sqrt" else sd3_cosmap_weight
        return fn(log_snr, **params)
    if scheme == "constant":
        return constant_weight(log_snr, **params)
    return _sangoi_from_log_snr(log_snr, predicted, target, mask, **params)


def _sangoi_from_log_snr(
    log_snr: torch.Tensor,
    predicted: torch.Tensor | None,
    target: torch.Tensor | None,
    mask: torch.Tensor | None,
    *,
    gamma: float | None = None,
    eps: float = 1e-8,
    detach: bool = True,
    snr_clamp_min: float | None = None,
    snr_clamp_max: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    if predicted is None or target is None:
        raise LossInputError("scheme 'sangoi' needs predicted and target tensors, got None")
    if not isinstance(log_snr, torch.Tensor):
        log_snr = torch.as_tensor(log_snr, dtype=torch.float64)
    lam = log_snr.detach()
    if lam.device.type != "mps":
        lam = lam.to(torch.float64)
    return sangoi_weight(
        torch.exp(lam),
        predicted,
        target,
        gamma,
        mask=mask,
        min_snr=_SANGOI_DEFAULT_MIN_SNR if snr_clamp_min is None else snr_clamp_min,
        max_snr=_SANGOI_DEFAULT_MAX_SNR if snr_clamp_max is None else snr_clamp_max,
        eps=eps,
        detach=detach,
        dtype=dtype,
    )


def sangoi_loss_modifier(
    timesteps: torch.Tensor,
    predicted: torch.Tensor,
    target: torch.Tensor,
    gamma: float | None = None,
    device: torch.device | str | None = None,
    *,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """Drop-in for the seed's ``_sangoi_loss_modifier(timesteps, predicted, target, gamma, device)``.

    Looks up ``snr = snr_from_alphas_cumprod(alphas_cumprod, timesteps)`` on ``device`` (default: the device of
    ``timesteps``) in place of the seed's ``self._snr(timesteps, device)``, then returns
    ``sangoi_weight(snr, predicted, target, gamma)``: ``[B]`` detached float32 weights.

    Args:
        timesteps: ``[B]`` integer timesteps in ``[0, T)``.
        predicted, target: ``[B, ...]`` tensors.
        gamma: accepted and unused, as in the seed.
        device: where the lookup happens.
        alphas_cumprod: ``[T]`` ``ᾱ`` table of the noise schedule (float64 recommended).
    """
    if not isinstance(timesteps, torch.Tensor):
        raise LossInputError(f"timesteps must be an integer torch.Tensor, got {type(timesteps).__name__}")
    dev = timesteps.device if device is None else torch.device(device)
    snr = snr_from_alphas_cumprod(alphas_cumprod.to(dev), timesteps.to(dev))
    return sangoi_weight(snr, predicted, target, gamma)
