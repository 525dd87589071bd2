"""Per-example diffusion loss weights as functions of λ = log SNR.

Sources: Min-SNR-γ (Hang et al. 2023, arXiv 2303.09556), P2 (Choi et al. 2022, arXiv 2204.00227), debiased
estimation (Yu et al., arXiv 2310.08442), EDM (Karras et al. 2022), SD3 (Esser et al. 2024, arXiv 2403.03206);
trainer conventions from Nerogar/OneTrainer, kohya-ss/sd-scripts and huggingface/diffusers.

Every weight multiplies a per-example MSE computed in the loss space ``prediction_type``. At fixed ``x_t``,
``L_ε = SNR·L_x0``, ``L_v = (1 + SNR)·L_x0`` and ``L_flow = L_x0/σ²``, so an x0-space weight becomes
``w = w_x0·F(λ)`` with ``F`` = ``e^{−λ}`` (epsilon), ``s(−λ)`` (v), ``1`` (sample) or ``s(−λ/2)²`` (flow), where
``s`` is the sigmoid. The formulas below are those conversions written in λ, so that they are exact at λ = ±∞
(no ``0·∞``, ``∞ − ∞`` or ``0/0``); a formula that diverges clamps λ to ±ln(SNR_GUARD) on its divergent side only.

Outputs have the shape and device of ``log_snr``, are detached, computed in float64 (float32 where the device has
no float64) and returned in ``dtype`` (float32 by default). Inputs are never modified. NaN in λ gives NaN.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from losskit.contract import LossInputError, check_choice

__all__ = [
    "CONVENTIONS",
    "PREDICTION_TYPES",
    "SCHEMES",
    "SNR_GUARD",
    "canonical_prediction_type",
    "check_convention",
    "constant_weight",
    "debiased_weight",
    "edm_weight",
    "min_snr_weight",
    "p2_weight",
    "sd3_cosmap_weight",
    "sd3_sigma_sqrt_weight",
]

SNR_GUARD = 1e10
_LOG_GUARD = math.log(SNR_GUARD)

SCHEMES: tuple[str, ...] = (
    "constant",
    "sangoi",
    "min_snr",
    "debiased",
    "p2",
    "sd3_sigma_sqrt",
    "sd3_cosmap",
    "edm",
)
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample", "x0", "flow")
CONVENTIONS: tuple[str, ...] = ("reference", "onetrainer", "kohya", "diffusers")
_SPACES = ("epsilon", "v_prediction", "sample", "flow")

# The (scheme, prediction space) cells each trainer defines; anything else under a named convention is an error, not an invented formula.
_DEFINED: dict[str, dict[str, tuple[str, ...]]] = {
    "min_snr": {
        "reference": _SPACES,
        "onetrainer": ("epsilon", "v_prediction"),
        "kohya": ("epsilon", "v_prediction"),
        "diffusers": ("epsilon", "v_prediction", "sample"),
    },
    "debiased": {
        "reference": _SPACES,
        "onetrainer": ("epsilon", "v_prediction"),
        "kohya": ("epsilon", "v_prediction"),
        "diffusers": (),
    },
    "p2": {
        "reference": _SPACES,
        "onetrainer": ("epsilon", "v_prediction"),
        "kohya": (),
        "diffusers": (),
    },
}

# debiased under onetrainer/kohya caps the SNR at 1000 (their literal `torch.minimum(snr, 1000)`).
_TRAINER_DEBIASED_MAX_SNR = 1000.0

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    """Warn once per process for ``key`` (a weight is computed every step; one warning is enough)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


def canonical_prediction_type(prediction_type: str) -> str:
    """Check a loss-space name and map the alias ``x0`` to ``sample``."""
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    return "sample" if prediction_type == "x0" else prediction_type


def check_convention(scheme: str, prediction_type: str, convention: str, *, p2_k: float = 1.0) -> None:
    """Raise ``LossInputError`` for a (scheme, space, convention) cell that the named trainer does not define.

    Only min_snr, debiased and p2 have trainer conventions; other schemes accept any known convention.
    """
    check_choice("convention", convention, CONVENTIONS)
    space = canonical_prediction_type(prediction_type)
    cells = _DEFINED.get(scheme)
    if cells is None:
        return
    defined = cells[convention]
    if space not in defined:
        listed = ", ".join(repr(s) for s in defined) if defined else "none"
        raise LossInputError(
            f"loss weighting {scheme!r} is not defined for prediction_type={prediction_type!r} under "
            f"convention={convention!r} (that trainer has no such formula; spaces it defines: {listed}); "
            "use convention='reference'"
        )
    if scheme == "p2" and convention == "onetrainer" and p2_k != 1:
        raise LossInputError(
            f"loss weighting 'p2' under convention='onetrainer' (prediction_type={prediction_type!r}) requires "
            f"k == 1 (OneTrainer hard-codes 1 + SNR), got k={p2_k!r}; use convention='reference'"
        )


def _compute_dtype(device: torch.device) -> torch.dtype:
    # MPS has no float64; everywhere else the B scalars are computed in float64 to keep the vectors exact.
    return torch.float32 if device.type == "mps" else torch.float64


def _check_clamps(snr_clamp_min: float | None, snr_clamp_max: float | None) -> None:
    lo = 0.0 if snr_clamp_min is None else snr_clamp_min
    hi = math.inf if snr_clamp_max is None else snr_clamp_max
    if not (0 <= lo):
        raise LossInputError(f"snr_clamp_min must be >= 0, got {snr_clamp_min!r}")
    if not (lo <= hi):
        raise LossInputError(
            f"snr_clamp_min must be <= snr_clamp_max, got snr_clamp_min={snr_clamp_min!r}, "
            f"snr_clamp_max={snr_clamp_max!r}"
        )


def _prepare(
    log_snr: torch.Tensor | float, snr_clamp_min: float | None, snr_clamp_max: float | None
) -> torch.Tensor:
    """λ as a detached tensor in the compute dtype, clamped to ``[ln min, ln max]`` (clamp propagates NaN)."""
    _check_clamps(snr_clamp_min, snr_clamp_max)
    if not isinstance(log_snr, torch.Tensor):
        log_snr = torch.as_tensor(log_snr, dtype=torch.float64)
    if log_snr.is_complex():
        raise LossInputError(f"log_snr must be a real tensor, got dtype {log_snr.dtype}")
    lam = log_snr.detach().to(_compute_dtype(log_snr.device))
    lo = -math.inf if snr_clamp_min in (None, 0) else math.log(snr_clamp_min)
    hi = math.inf if snr_clamp_max is None else math.log(snr_clamp_max) if snr_clamp_max > 0 else -math.inf
    if lo > -math.inf or hi < math.inf:
        lam = lam.clamp(min=lo, max=hi)
    return lam


def _finish(w: torch.Tensor, lam: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # NaN in λ is a caller bug: keep it visible for the trainer's non-finite policy, whatever the branch chose.
    return torch.where(torch.isnan(lam), lam, w).to(dtype)


def _guard_low(lam: torch.Tensor) -> torch.Tensor:
    return lam.clamp(min=-_LOG_GUARD)


def _guard_high(lam: torch.Tensor) -> torch.Tensor:
    return lam.clamp(max=_LOG_GUARD)


def _check_dtype(dtype: torch.dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise LossInputError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")


def _positive(name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not value > 0
        or not math.isfinite(value)
    ):
        raise LossInputError(f"{name} must be a finite number > 0, got {value!r}")


def min_snr_weight(
    log_snr: torch.Tensor,
    *,
    prediction_type: str,
    gamma: float = 5.0,
    convention: str = "reference",
    snr_clamp_min: float | None = None,
    snr_clamp_max: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Min-SNR-γ weight (Hang et al. 2023): ``w_x0 = min(SNR, γ)``, converted to the loss space.

    ==============  =====================================  ==========================
    space           formula in λ                           plain torch (S = SNR)
    ==============  =====================================  ==========================
    epsilon         ``λ < ln γ ? 1 : γ e^{−λ}``            ``min(S, γ) / S``
    v_prediction    ``λ < ln γ ? s(λ) : γ s(−λ)``          ``min(S, γ) / (S + 1)``
    sample / x0     ``λ < ln γ ? e^λ : γ``                 ``min(S, γ)``
    flow            ``λ < ln γ ? s(λ/2)² : γ s(−λ/2)²``    ``min(S, γ) · σ²``
    ==============  =====================================  ==========================

    All four conventions give these numbers where they are defined; at SNR 0 epsilon gives the limit 1 (the
    literal form is 0/0). Using the epsilon form ``min(1, γ/S)`` on a flow loss is a common mistake.

    Args:
        log_snr: λ, any shape.
        prediction_type: the loss space: ``epsilon``, ``v_prediction``, ``sample`` (``x0``) or ``flow``.
        gamma: γ > 0 (the paper recommends 5).
        convention: ``reference``, ``onetrainer``, ``kohya`` or ``diffusers`` (only checks the cell exists).
        snr_clamp_min, snr_clamp_max: optional SNR clamp applied to λ first.
        dtype: output dtype.

    Returns:
        Detached weights shaped like ``log_snr``.
    """
    check_convention("min_snr", prediction_type, convention)
    space = canonical_prediction_type(prediction_type)
    _positive("gamma", gamma)
    _check_dtype(dtype)
    lam = _prepare(log_snr, snr_clamp_min, snr_clamp_max)
    below = lam < math.log(gamma)
    if space == "epsilon":
        w = torch.where(below, torch.ones_like(lam), gamma * torch.exp(-lam))
    elif space == "v_prediction":
        w = torch.where(below, torch.sigmoid(lam), gamma * torch.sigmoid(-lam))
    elif space == "sample":
        w = torch.where(below, torch.exp(lam), torch.full_like(lam, gamma))
    else:
        w = torch.where(below, torch.sigmoid(lam / 2) ** 2, gamma * torch.sigmoid(-lam / 2) ** 2)
    return _finish(w, lam, dtype)


def debiased_weight(
    log_snr: torch.Tensor,
    *,
    prediction_type: str,
    convention: str = "reference",
    snr_clamp_min: float | None = None,
    snr_clamp_max: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Debiased estimation (Yu et al., arXiv 2310.08442): ``w_ε = SNR^{−1/2}``, converted to the loss space.

    ===================  ========================================  ================================
    space / convention   formula in λ                              plain torch (S = SNR)
    ===================  ========================================  ================================
    epsilon              ``e^{−λ/2}`` (guard at λ → −∞)            ``S ** -0.5``
    v_prediction         ``1/(2 cosh(λ/2))``                       ``S ** 0.5 / (1 + S)``
    sample / x0          ``e^{λ/2}`` (guard at λ → +∞)             ``S ** 0.5``
    flow                 ``s(λ/2) s(−λ/2)``                        ``σ (1 − σ)``
    v, onetrainer        ``exp(−½ log(1 + e^λ))``                  ``(S + 1) ** -0.5``
    v, kohya             ``s(−λ)``                                 ``1 / (S + 1)``
    ===================  ========================================  ================================

    Under ``onetrainer``/``kohya`` the SNR is capped at 1000 unless ``snr_clamp_max`` is given (their literal
    ``min(S, 1000)``); ``diffusers`` has no debiased weighting. See :func:`min_snr_weight` for the arguments.
    """
    check_convention("debiased", prediction_type, convention)
    space = canonical_prediction_type(prediction_type)
    _check_dtype(dtype)
    if snr_clamp_max is None and convention in ("onetrainer", "kohya"):
        snr_clamp_max = max(_TRAINER_DEBIASED_MAX_SNR, snr_clamp_min or 0.0)
    lam = _prepare(log_snr, snr_clamp_min, snr_clamp_max)
    if space == "epsilon":
        w = torch.exp(-_guard_low(lam) / 2)
    elif space == "sample":
        w = torch.exp(_guard_high(lam) / 2)
    elif space == "flow":
        w = torch.sigmoid(lam / 2) * torch.sigmoid(-lam / 2)
    elif convention == "onetrainer":
        w = torch.exp(-0.5 * torch.logaddexp(torch.zeros_like(lam), lam))
    elif convention == "kohya":
        w = torch.sigmoid(-lam)
    else:
        w = 0.5 / torch.cosh(lam / 2)
    return _finish(w, lam, dtype)


def p2_weight(
    log_snr: torch.Tensor,
    *,
    prediction_type: str,
    gamma: float = 1.0,
    k: float = 1.0,
    convention: str = "reference",
    snr_clamp_min: float | None = None,
    snr_clamp_max: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """P2 weighting (Choi et al. 2022): ``w_ε = (k + SNR)^{−γ}``, converted to the loss space.

    With ``P = exp(−γ·logaddexp(ln k, λ))``:

    ===================  ==================================  ===================================
    space / convention   formula in λ                        plain torch (S = SNR)
    ===================  ==================================  ===================================
    epsilon              ``P``                               ``(k + S) ** -γ``
    v_prediction         ``P·s(λ)``                          ``S * (k + S) ** -γ / (1 + S)``
    sample / x0          ``P·e^λ`` (guard at λ → +∞)         ``S * (k + S) ** -γ``
    flow                 ``P·s(λ/2)²``                       ``S * (k + S) ** -γ * σ²``
    v, onetrainer        ``exp(−γ·logaddexp(ln 2, λ))``      ``(2 + S) ** -γ``
    ===================  ==================================  ===================================

    ``γ = 0`` gives ``P ≡ 1`` exactly, also at λ = ±∞. The paper uses k = 1 and γ ∈ {0.5, 1}; γ > 2 warns once
    (OneTrainer's default strength 5 used as the P2 γ gives 4e-16 at SD t = 0). ``onetrainer`` requires k = 1.

    Args:
        gamma: γ ≥ 0.
        k: k > 0.
        (the rest as in :func:`min_snr_weight`)
    """
    if (
        isinstance(gamma, bool)
        or not isinstance(gamma, (int, float))
        or not gamma >= 0
        or not math.isfinite(gamma)
    ):
        raise LossInputError(f"gamma must be a finite number >= 0 (P2), got {gamma!r}")
    _positive("k", k)
    check_convention("p2", prediction_type, convention, p2_k=k)
    space = canonical_prediction_type(prediction_type)
    _check_dtype(dtype)
    if gamma > 2:
        _warn_once(
            "p2_gamma",
            f"P2 gamma={gamma} > 2 makes the weights vanish at high SNR (gamma=5 gives 4e-16 at SD t=0); the paper "
            "uses gamma in {0.5, 1}",
        )
    lam = _prepare(log_snr, snr_clamp_min, snr_clamp_max)
    if space == "sample":
        lam = _guard_high(lam)

    def power(log_k: float) -> torch.Tensor:
        if gamma == 0:
            return torch.ones_like(lam)  # exactly 1; γ·logaddexp would be 0·∞ = NaN at λ = +∞
        return torch.exp(-gamma * torch.logaddexp(torch.full_like(lam, log_k), lam))

    if space == "v_prediction" and convention == "onetrainer":
        w = power(math.log(2.0))
    else:
        p = power(math.log(k))
        if space == "epsilon":
            w = p
        elif space == "v_prediction":
            w = p * torch.sigmoid(lam)
        elif space == "sample":
            w = p * torch.exp(lam)
        else:
            w = p * torch.sigmoid(lam / 2) ** 2
    return _finish(w, lam, dtype)


def edm_weight(
    log_snr: torch.Tensor,
    *,
    prediction_type: str,
    sigma_data: float = 0.5,
    snr_clamp_min: float | None = None,
    snr_clamp_max: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """EDM's loss weight (Karras et al. 2022): ``w_x0 = (σ_E² + σ_d²)/(σ_E σ_d)²`` at ``σ_E² = 1/SNR``.

    ==============  ===================================================  ==============================
    space           formula in λ                                         plain torch
    ==============  ===================================================  ==============================
    epsilon         ``1 + σ_d^{−2} e^{−λ}`` (guard at λ → −∞)            ``w_x0 / S``
    v_prediction    ``s(λ) + σ_d^{−2} s(−λ)``                            ``w_x0 / (1 + S)``
    sample / x0     ``e^λ + σ_d^{−2}`` (guard at λ → +∞)                 ``(σ² + σ_d²) / (σ σ_d)²``
    flow            ``s(λ/2)² + σ_d^{−2} s(−λ/2)²``                      ``w_x0 · σ_f²``
    ==============  ===================================================  ==============================

    EDM pairs it with log-normal σ sampling (not part of this module); alone it is large at the extremes.

    Args:
        sigma_data: σ_d > 0, the data standard deviation.
        (the rest as in :func:`min_snr_weight`; EDM has no trainer conventions)
    """
    space = canonical_prediction_type(prediction_type)
    _positive("sigma_data", sigma_data)
    _check_dtype(dtype)
    inv_sd2 = 1.0 / sigma_data**2
    lam = _prepare(log_snr, snr_clamp_min, snr_clamp_max)
    if space == "epsilon":
        w = 1 + inv_sd2 * torch.exp(-_guard_low(lam))
    elif space == "sample":
        w = torch.exp(_guard_high(lam)) + inv_sd2
    elif space == "v_prediction":
        w = torch.sigmoid(lam) + inv_sd2 * torch.sigmoid(-lam)
    else:
        w = torch.sigmoid(lam / 2) ** 2 + inv_sd2 * torch.sigmoid(-lam / 2) ** 2
    return _finish(w, lam, dtype)


def sd3_sigma_sqrt_weight(
    log_snr: torch.Tensor,
    *,
    snr_clamp_min: float | None = None,
    snr_clamp_max: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """SD3's ``sigma_sqrt`` weighting: the literal loss multiplier ``σ_f^{−2}`` with ``σ_f = s(−λ/2)``.

    In λ: ``(1 + e^{λ/2})²``, guarded at λ → +∞ (σ_f = 0). Applied as-is in every loss space, as diffusers and
    sd-scripts do (``weighting = sigmas ** -2.0``); on an x0 loss it is exactly unit weight on the flow loss.
    """
    _check_dtype(dtype)
    lam = _prepare(log_snr, snr_clamp_min, snr_clamp_max)
    w = (1 + torch.exp(_guard_high(lam) / 2)) ** 2
    return _finish(w, lam, dtype)


def sd3_cosmap_weight(
    log_snr: torch.Tensor,
    *,
    snr_clamp_min: float | None = None,
    snr_clamp_max: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """SD3's ``cosmap`` weighting: the literal multiplier ``2/(π(1 − 2σ_f + 2σ_f²))``, ``σ_f = s(−λ/2)``.

    In λ: ``2/(π(s(−λ/2)² + s(λ/2)²))``, bounded in ``[2/π, 4/π]``; applied as-is in every loss space.
    """
    _check_dtype(dtype)
    lam = _prepare(log_snr, snr_clamp_min, snr_clamp_max)
    w = 2 / (math.pi * (torch.sigmoid(-lam / 2) ** 2 + torch.sigmoid(lam / 2) ** 2))
    return _finish(w, lam, dtype)


def constant_weight(
    log_snr: torch.Tensor,
    *,
    snr_clamp_min: float | None = None,
    snr_clamp_max: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Unit weights shaped like ``log_snr`` (NaN where λ is NaN, like every other scheme)."""
    _check_dtype(dtype)
    lam = _prepare(log_snr, snr_clamp_min, snr_clamp_max)
    return _finish(torch.ones_like(lam), lam, dtype)
