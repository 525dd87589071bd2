"""Policy-gradient and preference losses with Tinker semantics: token-level **sums**, no clamp on the ratio.

These are the built-in losses of the training service (``losskit serve``). Every function takes the learner's
log-probabilities ``lp`` of the target tokens from this pass (differentiable) and returns a
``LossFnOutput(loss, logprobs, diagnostics)`` whose diagnostics are detached 0-d tensors keyed
``name:reduction`` (exactly one colon). Notation: ``q`` are the sampler's log-probabilities, ``A`` the
advantages, ``r = exp(lp - q)``, ``sg`` stop-gradient. There is no mean and no length normalisation:
normalise through ``weights`` or ``A``.

* ``token_cross_entropy``: ``-Σ lp·w`` (``weights`` default 1, may be negative);
* ``importance_sampling``: ``-Σ r·A``;
* ``ppo``: ``-Σ min(r·A, clip(r, lo, hi)·A)``, ``clip_low_threshold`` 0.8, ``clip_high_threshold`` 1.2;
* ``cispo``: ``-Σ sg(clip(r, lo, hi))·lp·A``, ``clip_low_threshold`` 0.0, ``clip_high_threshold`` 4.0;
* ``dro``: ``-Σ (lp·A - ½·β·(lp - q)²)``, ``beta`` required;
* ``dpo``: ``-Σ_pairs log σ(β·((πc - πr) - (ρc - ρr)))`` over per-pair sequence logprobs, ``beta`` 0.1.

Clip thresholds are absolute ratio bounds (not ε); a tensor of ``lp``'s shape gives per-token bounds.
``mask`` (bool, ``lp``'s shape; default all True) marks the supervised entries: the others contribute nothing
to the loss or the metrics (the service uses it for the padding of a batch). The RL metrics ``ratio:mean``,
``ratio:min`` and ``ratio:max`` are taken over the entries with ``A != 0`` so that prompt and padding positions
do not pollute them; they are NaN when there is no such entry.

Plain torch (the oracle of the tests), e.g. for ``ppo``::

    r = torch.exp(lp - q)
    loss = -torch.minimum(r * A, torch.clamp(r, lo, hi) * A).sum()
"""

from __future__ import annotations

import math
import numbers

import torch

from losskit.contract import LossFnOutput, LossInputError

__all__ = ["cispo", "dpo", "dro", "importance_sampling", "ppo", "token_cross_entropy"]


def _check_tensor(name: str, value, like: torch.Tensor | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise LossInputError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if like is not None and tuple(value.shape) != tuple(like.shape):
        raise LossInputError(f"{name} must have the shape of logprobs {tuple(like.shape)}, got {tuple(value.shape)}")
    if like is not None and value.device != like.device:
        raise LossInputError(f"{name} must be on the device of logprobs ({like.device}), got {value.device}")
    return value


def _check_logprobs(logprobs) -> torch.Tensor:
    _check_tensor("logprobs", logprobs)
    if not logprobs.is_floating_point():
        raise LossInputError(f"logprobs must be a floating-point tensor, got dtype {logprobs.dtype}")
    return logprobs


def _float_input(name: str, value, lp: torch.Tensor) -> torch.Tensor:
    _check_tensor(name, value, lp)
    if value.dtype == torch.bool:
        raise LossInputError(f"{name} must be a numeric tensor, got dtype bool")
    return value.to(lp.dtype)


def _mask(mask, lp: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones(lp.shape, dtype=torch.bool, device=lp.device)
    _check_tensor("mask", mask, lp)
    if mask.dtype != torch.bool:
        raise LossInputError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    return mask


def _threshold(name: str, value, lp: torch.Tensor) -> torch.Tensor | float:
    if isinstance(value, torch.Tensor):
        return _float_input(name, value, lp)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise LossInputError(f"{name} must be a finite number or a tensor of the shape of logprobs, got {value!r}")
    return float(value)


def _check_bounds(lo, hi) -> None:
    if isinstance(lo, float) and isinstance(hi, float) and lo > hi:
        raise LossInputError(
            f"clip_low_threshold must be <= clip_high_threshold, got {lo!r} > {hi!r} (absolute ratio bounds)"
        )


def _masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum()


def _stats_over(x: torch.Tensor, sel: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    """``prefix:mean/min/max`` of ``x`` over ``sel`` (NaN when ``sel`` is empty); detached, no host sync."""
    x = x.detach()
    n = sel.sum()
    nan = torch.full((), float("nan"), dtype=x.dtype, device=x.device)
    inf = torch.full((), float("inf"), dtype=x.dtype, device=x.device)
    mean = torch.where(sel, x, torch.zeros_like(x)).sum() / n.clamp_min(1).to(x.dtype)
    lo = torch.where(sel, x, inf).amin() if x.numel() else inf
    hi = torch.where(sel, x, -inf).amax() if x.numel() else -inf
    empty = n == 0
    return {
        f"{prefix}:mean": torch.where(empty, nan, mean),
        f"{prefix}:min": torch.where(empty, nan, lo),
        f"{prefix}:max": torch.where(empty, nan, hi),
    }


def _fraction(flag: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """Share of ``sel`` where ``flag`` holds (0 when ``sel`` is empty)."""
    return (flag & sel).sum().to(torch.float32) / sel.sum().clamp_min(1).to(torch.float32)


def _output(loss: torch.Tensor, lp: torch.Tensor, mask: torch.Tensor, extra: dict) -> LossFnOutput:
    diagnostics = {"loss:sum": loss.detach(), "num_tokens:sum": mask.sum().to(lp.dtype), **extra}
    return LossFnOutput(loss=loss, logprobs=lp, diagnostics=diagnostics)


def token_cross_entropy(logprobs: torch.Tensor, weights: torch.Tensor | None = None, *,
                        mask: torch.Tensor | None = None) -> LossFnOutput:
    """Tinker's ``cross_entropy``: ``-Σ lp·w`` over the supervised entries (a sum, not a mean).

    Weights may be any real numbers, negative included (the SDK's client-side custom losses send
    ``weights = -∂loss/∂lp``). Plain torch: ``-(logprobs * weights).sum()``.

    Args:
        logprobs: learner log-probabilities of the target tokens, any shape (``[T]`` or ``[T, K]`` per datum).
        weights: same shape; default ones.
        mask: optional bool, same shape: entries outside it contribute nothing.

    Returns:
        ``LossFnOutput`` with diagnostics ``loss:sum``, ``num_tokens:sum``, ``weights:sum``.
    """
    lp = _check_logprobs(logprobs)
    m = _mask(mask, lp)
    w = torch.ones_like(lp) if weights is None else _float_input("weights", weights, lp)
    loss = -_masked_sum(lp * w, m)
    return _output(loss, lp, m, {"weights:sum": _masked_sum(w, m).detach()})


def _rl_inputs(logprobs, sampling_logprobs, advantages, mask):
    lp = _check_logprobs(logprobs)
    q = _float_input("sampling_logprobs", sampling_logprobs, lp)
    adv = _float_input("advantages", advantages, lp)
    return lp, q.detach(), adv.detach(), _mask(mask, lp)


def importance_sampling(logprobs: torch.Tensor, sampling_logprobs: torch.Tensor, advantages: torch.Tensor, *,
                        mask: torch.Tensor | None = None) -> LossFnOutput:
    """REINFORCE with importance sampling: ``-Σ r·A`` with ``r = exp(lp - q)`` (no clamp).

    Plain torch: ``-(torch.exp(lp - q) * A).sum()``.

    Returns:
        ``LossFnOutput`` with ``loss:sum``, ``num_tokens:sum``, ``ratio:mean/min/max`` (over ``A != 0``).
    """
    lp, q, adv, m = _rl_inputs(logprobs, sampling_logprobs, advantages, mask)
    ratio = torch.exp(lp - q)
    loss = -_masked_sum(ratio * adv, m)
    return _output(loss, lp, m, _stats_over(ratio, m & (adv != 0), "ratio"))


def ppo(logprobs: torch.Tensor, sampling_logprobs: torch.Tensor, advantages: torch.Tensor, *,
        clip_low_threshold: float | torch.Tensor = 0.8, clip_high_threshold: float | torch.Tensor = 1.2,
        mask: torch.Tensor | None = None) -> LossFnOutput:
    """PPO's clipped surrogate: ``-Σ min(r·A, clip(r, lo, hi)·A)`` (bounds are absolute ratios, not ε).

    Plain torch: ``-torch.minimum(r * A, torch.clamp(r, lo, hi) * A).sum()``.

    Returns:
        ``LossFnOutput`` with ``loss:sum``, ``num_tokens:sum``, ``ratio:mean/min/max`` and
        ``clipped_fraction:mean``: the share of ``A != 0`` entries where the clipped branch is the active
        minimum (strictly smaller than the unclipped one).
    """
    lp, q, adv, m = _rl_inputs(logprobs, sampling_logprobs, advantages, mask)
    lo = _threshold("clip_low_threshold", clip_low_threshold, lp)
    hi = _threshold("clip_high_threshold", clip_high_threshold, lp)
    _check_bounds(lo, hi)
    ratio = torch.exp(lp - q)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, lo, hi) * adv
    loss = -_masked_sum(torch.minimum(unclipped, clipped), m)
    sel = m & (adv != 0)
    extra = _stats_over(ratio, sel, "ratio")
    extra["clipped_fraction:mean"] = _fraction(clipped.detach() < unclipped.detach(), sel)
    return _output(loss, lp, m, extra)


def cispo(logprobs: torch.Tensor, sampling_logprobs: torch.Tensor, advantages: torch.Tensor, *,
          clip_low_threshold: float | torch.Tensor = 0.0, clip_high_threshold: float | torch.Tensor = 4.0,
          mask: torch.Tensor | None = None) -> LossFnOutput:
    """CISPO: ``-Σ sg(clip(r, lo, hi))·lp·A``, a REINFORCE gradient with a clipped, detached IS weight.

    Plain torch: ``-(torch.clamp(torch.exp(lp - q), lo, hi).detach() * lp * A).sum()``.

    Returns:
        ``LossFnOutput`` with ``loss:sum``, ``num_tokens:sum``, ``ratio:mean/min/max`` and
        ``clipped_fraction:mean``: the share of ``A != 0`` entries whose ratio lies outside ``[lo, hi]``.
    """
    lp, q, adv, m = _rl_inputs(logprobs, sampling_logprobs, advantages, mask)
    lo = _threshold("clip_low_threshold", clip_low_threshold, lp)
    hi = _threshold("clip_high_threshold", clip_high_threshold, lp)
    _check_bounds(lo, hi)
    ratio = torch.exp(lp.detach() - q)
    weight = torch.clamp(ratio, lo, hi)
    loss = -_masked_sum(weight * lp * adv, m)
    sel = m & (adv != 0)
    extra = _stats_over(ratio, sel, "ratio")
    out_of_bounds = (ratio < lo) | (ratio > hi)
    extra["clipped_fraction:mean"] = _fraction(out_of_bounds, sel)
    return _output(loss, lp, m, extra)


def dro(logprobs: torch.Tensor, sampling_logprobs: torch.Tensor, advantages: torch.Tensor, *, beta: float,
        mask: torch.Tensor | None = None) -> LossFnOutput:
    """DRO (direct reward optimisation): ``-Σ (lp·A - ½·β·(lp - q)²)``; ``beta`` is required.

    Plain torch: ``-(lp * A - 0.5 * beta * (lp - q) ** 2).sum()``.

    Returns:
        ``LossFnOutput`` with ``loss:sum``, ``num_tokens:sum``, ``ratio:mean/min/max`` (over ``A != 0``).
    """
    lp, q, adv, m = _rl_inputs(logprobs, sampling_logprobs, advantages, mask)
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not math.isfinite(float(beta)):
        raise LossInputError(f"beta must be a finite number, got {beta!r}")
    loss = -_masked_sum(lp * adv - 0.5 * float(beta) * (lp - q) ** 2, m)
    return _output(loss, lp, m, _stats_over(torch.exp(lp.detach() - q), m & (adv != 0), "ratio"))


def dpo(chosen_logprobs: torch.Tensor, rejected_logprobs: torch.Tensor, reference_chosen_logprobs: torch.Tensor,
        reference_rejected_logprobs: torch.Tensor, *, beta: float = 0.1) -> LossFnOutput:
    """DPO (Rafailov et al. 2023) over pairs: ``-Σ_pairs log σ(β·((πc - πr) - (ρc - ρr)))``.

    The four inputs are per-pair sequence log-probabilities ``[P]`` (each the sum of the token logprobs of
    one response): ``π`` from the policy, ``ρ`` from the frozen reference. A sum over pairs, as every Tinker
    loss; divide by P for the paper's mean. Plain torch::

        margin = (pc - pr) - (rc - rr)
        loss = -torch.nn.functional.logsigmoid(beta * margin).sum()

    Returns:
        ``LossFnOutput(loss, logprobs=chosen_logprobs, diagnostics)`` with ``loss:sum``, ``pairs:sum``,
        ``reward_accuracy:mean`` (share of pairs with ``margin > 0``), ``margin:mean``,
        ``chosen_reward:mean`` ``β·(πc - ρc)`` and ``rejected_reward:mean`` ``β·(πr - ρr)``.
    """
    pc = _check_logprobs(chosen_logprobs)
    pr = _float_input("rejected_logprobs", rejected_logprobs, pc)
    rc = _float_input("reference_chosen_logprobs", reference_chosen_logprobs, pc).detach()
    rr = _float_input("reference_rejected_logprobs", reference_rejected_logprobs, pc).detach()
    if pc.dim() != 1:
        raise LossInputError(f"chosen_logprobs must be per-pair sums of shape [P], got {tuple(pc.shape)}")
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not math.isfinite(float(beta)):
        raise LossInputError(f"beta must be a finite number, got {beta!r}")
    beta = float(beta)
    margin = (pc - pr) - (rc - rr)
    loss = -torch.nn.functional.logsigmoid(beta * margin).sum()
    n = max(pc.shape[0], 1)
    d = margin.detach()
    diagnostics = {
        "loss:sum": loss.detach(),
        "pairs:sum": torch.tensor(float(pc.shape[0]), dtype=pc.dtype, device=pc.device),
        "reward_accuracy:mean": (d > 0).to(pc.dtype).sum() / n,
        "margin:mean": d.sum() / n,
        "chosen_reward:mean": (beta * (pc.detach() - rc)).sum() / n,
        "rejected_reward:mean": (beta * (pr.detach() - rr)).sum() / n,
    }
    return LossFnOutput(loss=loss, logprobs=pc, diagnostics=diagnostics)
