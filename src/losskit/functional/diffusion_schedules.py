"""Noise schedules and signal-to-noise ratios.

Every function takes tensors (never a scheduler object, so losskit depends on no trainer's classes) and returns
tensors in the input table's dtype, float64 by default: a float32 ``scaled_linear`` SNR is off by up to 2.6e-5
relative, more than the tests' tolerance.

Notation (VP): ``x_t = α x0 + σ ε`` with ``α² = ᾱ_t`` (``alphas_cumprod``), ``σ² = 1 − ᾱ_t``,
``SNR = ᾱ/(1 − ᾱ)`` and ``λ = log SNR``. Flow matching: ``x_t = (1 − σ) x0 + σ ε``, ``SNR = ((1 − σ)/σ)²``.
EDM: ``x = x0 + σ_E ε``, ``SNR = 1/σ_E²``.

The value checks here read tensor values (one host sync each); they are meant for eager calls. A training
step precomputes its λ table once and gathers from it.
"""

from __future__ import annotations

import math

import torch

from losskit.contract import LossInputError

__all__ = [
    "alphas_cumprod_from_betas",
    "cosine_betas",
    "edm_log_snr",
    "flow_log_snr",
    "flow_shift",
    "flow_snr",
    "linear_betas",
    "log_snr_from_alphas_cumprod",
    "log_snr_from_snr",
    "rescale_zero_terminal_snr",
    "scaled_linear_betas",
    "snr_from_alphas_cumprod",
    "snr_from_log_snr",
]


def _check_num_timesteps(T: int) -> None:
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise LossInputError(f"T must be a positive int, got {T!r}")


def linear_betas(
    T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, *, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """DDPM's linear schedule (Ho et al. 2020): ``β = linspace(beta_start, beta_end, T)``.

    Returns:
        ``[T]`` betas in ``dtype`` (computed in float64).
    """
    _check_num_timesteps(T)
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64).to(dtype)


def scaled_linear_betas(
    T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012, *, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Stable Diffusion's schedule: ``β = linspace(√beta_start, √beta_end, T)²``.

    Returns:
        ``[T]`` betas in ``dtype`` (computed in float64).
    """
    _check_num_timesteps(T)
    return (torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), T, dtype=torch.float64) ** 2).to(dtype)


def cosine_betas(
    T: int = 1000, s: float = 0.008, max_beta: float = 0.999, *, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """The cosine schedule of Nichol & Dhariwal (2021).

    ``β_i = min(1 − ā((i+1)/T)/ā(i/T), max_beta)`` with ``ā(u) = cos²(((u + s)/(1 + s))·π/2)``.

    Returns:
        ``[T]`` betas in ``dtype`` (computed in float64).
    """
    _check_num_timesteps(T)
    u = torch.arange(T + 1, dtype=torch.float64) / T
    abar = torch.cos((u + s) / (1 + s) * (math.pi / 2)) ** 2
    betas = (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)
    return betas.to(dtype)


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """``ᾱ_t = Π_{i≤t}(1 − β_i)``, accumulated in float64 and returned in the dtype of ``betas``.

    Plain torch: ``torch.cumprod(1 - betas.double(), 0).to(betas.dtype)``.
    """
    if not isinstance(betas, torch.Tensor) or betas.dim() != 1 or not betas.is_floating_point():
        got = (
            f"shape {tuple(betas.shape)}, dtype {betas.dtype}"
            if isinstance(betas, torch.Tensor)
            else type(betas)
        )
        raise LossInputError(f"betas must be a 1-D floating-point tensor, got {got}")
    return torch.cumprod(1 - betas.to(torch.float64), 0).to(betas.dtype)


def _check_table(alphas_cumprod: torch.Tensor) -> None:
    """A ``[T]`` floating table within ``[0, 1]`` (NaN passes, so that it propagates). Reads values."""
    if not isinstance(alphas_cumprod, torch.Tensor):
        raise LossInputError(f"alphas_cumprod must be a torch.Tensor, got {type(alphas_cumprod).__name__}")
    if alphas_cumprod.dim() != 1 or alphas_cumprod.numel() == 0:
        raise LossInputError(
            f"alphas_cumprod must be a non-empty 1-D tensor [T], got shape {tuple(alphas_cumprod.shape)}"
        )
    if not alphas_cumprod.is_floating_point():
        raise LossInputError(f"alphas_cumprod must be floating point, got dtype {alphas_cumprod.dtype}")
    outside = (alphas_cumprod < 0) | (alphas_cumprod > 1)
    if bool(outside.any()):
        lo, hi = alphas_cumprod.min().item(), alphas_cumprod.max().item()
        raise LossInputError(f"alphas_cumprod must lie within [0, 1], got values in [{lo!r}, {hi!r}]")


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Rescale a schedule to zero terminal SNR (Lin et al. 2024, "Common diffusion noise schedules ... are flawed").

    ``√ᾱ' = (√ᾱ − √ᾱ_{T−1})·√ᾱ_0/(√ᾱ_0 − √ᾱ_{T−1})``, so ``ᾱ'_{T−1} = 0`` exactly and ``ᾱ'_0 = ᾱ_0`` (set
    exactly: the formula equals it in exact arithmetic, and an unchanged SNR[0] is part of the contract).

    Args:
        alphas_cumprod: ``[T]`` table within ``[0, 1]``, ``T ≥ 2``, with ``ᾱ_0 > ᾱ_{T−1}``.

    Returns:
        ``[T]`` rescaled table in the input dtype (computed in float64).
    """
    _check_table(alphas_cumprod)
    if alphas_cumprod.numel() < 2 or not bool(alphas_cumprod[0] > alphas_cumprod[-1]):
        raise LossInputError(
            "alphas_cumprod must have T >= 2 and alphas_cumprod[0] > alphas_cumprod[T-1] to be rescaled, got "
            f"T={alphas_cumprod.numel()}, first {alphas_cumprod[0].item()!r}, last {alphas_cumprod[-1].item()!r}"
        )
    sqrt_ab = alphas_cumprod.to(torch.float64).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    rescaled = (sqrt_ab - last) * (first / (first - last))
    out = rescaled**2
    out[0] = alphas_cumprod[0].to(torch.float64)
    out[-1] = 0.0
    return out.to(alphas_cumprod.dtype)


def _gather(table: torch.Tensor, timesteps: torch.Tensor | None) -> torch.Tensor:
    """``table[timesteps]`` with checks; the result has the shape and device of ``timesteps``. Reads values."""
    if timesteps is None:
        return table
    if not isinstance(timesteps, torch.Tensor):
        raise LossInputError(f"timesteps must be an integer torch.Tensor, got {type(timesteps).__name__}")
    if timesteps.is_floating_point() or timesteps.is_complex() or timesteps.dtype == torch.bool:
        raise LossInputError(f"timesteps must be an integer tensor, got dtype {timesteps.dtype}")
    T = table.numel()
    if timesteps.numel():
        lo, hi = int(timesteps.min()), int(timesteps.max())
        if lo < 0 or hi >= T:
            raise LossInputError(
                f"timesteps must lie in [0, {T}) (T = len(alphas_cumprod)), got min {lo}, max {hi}"
            )
    return table.to(timesteps.device)[timesteps.long()]


def log_snr_from_alphas_cumprod(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor | None = None
) -> torch.Tensor:
    """``λ = log SNR = log ᾱ − log1p(−ᾱ)``: the whole ``[T]`` table, or ``λ[timesteps]``.

    Exact at the endpoints: ``ᾱ = 1`` gives ``+∞`` and ``ᾱ = 0`` gives ``−∞``.

    Plain torch: ``(a / (1 - a)).log()[timesteps]`` (the same away from the endpoints).

    Args:
        alphas_cumprod: ``[T]`` floating table within ``[0, 1]``.
        timesteps: optional integer tensor of any shape with values in ``[0, T)``.

    Returns:
        λ in the table's dtype, shaped and placed like ``timesteps`` (or ``[T]``).
    """
    _check_table(alphas_cumprod)
    return _gather(torch.log(alphas_cumprod) - torch.log1p(-alphas_cumprod), timesteps)


def snr_from_alphas_cumprod(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor | None = None
) -> torch.Tensor:
    """``SNR = ᾱ/(1 − ᾱ)``: the whole ``[T]`` table, or ``SNR[timesteps]`` (``+∞`` at ``ᾱ = 1``).

    Arguments, dtype, shape and placement as for :func:`log_snr_from_alphas_cumprod`. Plain torch:
    ``(a / (1 - a))[timesteps]``.
    """
    _check_table(alphas_cumprod)
    return _gather(alphas_cumprod / (1 - alphas_cumprod), timesteps)


def _as_float(x: torch.Tensor | float) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x, dtype=torch.float64)
    if not x.is_floating_point():
        x = x.to(torch.float64)
    return x


def _check_sigma_unit(sigma: torch.Tensor) -> None:
    outside = (sigma < 0) | (sigma > 1)
    if bool(outside.any()):
        raise LossInputError(
            f"sigma must lie within [0, 1] (flow matching), got values in [{sigma.min().item()!r}, "
            f"{sigma.max().item()!r}]"
        )


def flow_log_snr(sigma: torch.Tensor | float) -> torch.Tensor:
    """Rectified-flow ``λ = 2(log1p(−σ) − log σ)`` (``+∞`` at σ = 0, ``−∞`` at σ = 1).

    Pass the σ that actually noised the sample, after any shift (:func:`flow_shift` first).

    Plain torch: ``torch.log(((1 - sigma) / sigma) ** 2)``.
    """
    sigma = _as_float(sigma)
    _check_sigma_unit(sigma)
    return 2 * (torch.log1p(-sigma) - torch.log(sigma))


def flow_snr(sigma: torch.Tensor | float) -> torch.Tensor:
    """Rectified-flow ``SNR = ((1 − σ)/σ)²`` (``+∞`` at σ = 0, 0 at σ = 1)."""
    sigma = _as_float(sigma)
    _check_sigma_unit(sigma)
    return ((1 - sigma) / sigma) ** 2


def flow_shift(sigma: torch.Tensor | float, shift: float) -> torch.Tensor:
    """SD3's timestep shift ``σ' = shift·σ/(1 + (shift − 1)σ)`` (Esser et al. 2024); maps [0, 1] onto [0, 1]."""
    sigma = _as_float(sigma)
    _check_sigma_unit(sigma)
    if not (isinstance(shift, (int, float)) and shift > 0 and math.isfinite(shift)):
        raise LossInputError(f"shift must be a finite number > 0, got {shift!r}")
    return shift * sigma / (1 + (shift - 1) * sigma)


def edm_log_snr(sigma: torch.Tensor | float) -> torch.Tensor:
    """EDM's ``λ = −2 log σ_E`` (Karras et al. 2022), i.e. ``SNR = 1/σ_E²``; ``σ_E ≥ 0``, ``+∞`` allowed."""
    sigma = _as_float(sigma)
    if bool((sigma < 0).any()):
        raise LossInputError(f"sigma must be >= 0 (EDM noise level), got minimum {sigma.min().item()!r}")
    return -2 * torch.log(sigma)


def log_snr_from_snr(snr: torch.Tensor | float) -> torch.Tensor:
    """``λ = log SNR`` for ``SNR ≥ 0`` (0 gives ``−∞``, ``+∞`` gives ``+∞``)."""
    snr = _as_float(snr)
    if bool((snr < 0).any()):
        raise LossInputError(f"snr must be >= 0, got minimum {snr.min().item()!r}")
    return torch.log(snr)


def snr_from_log_snr(log_snr: torch.Tensor | float) -> torch.Tensor:
    """``SNR = exp(λ)``."""
    return torch.exp(_as_float(log_snr))
