"""Argument checks and per-row preparation shared by every implementation.

``prepare`` turns the user arguments of ``token_stats`` / ``fused_token_loss`` into flat per-row tensors
(validity, clamped target, out-of-range flags, ``[y∈A]``) and the cached column sets, without reading any
tensor value on the host. ``prepare_smoothing`` adds the per-row label-smoothing factors.
"""

from __future__ import annotations

import dataclasses

import torch

from losskit.contract import check_ignore_index, check_logits_target, validity_mask
from losskit.functional.cross_entropy import check_label_smoothing as functional_check_label_smoothing
from losskit.kernels.columns import ColumnSet, member_set, normalize_ids, support_set


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Flat per-row view of one call.

    Attributes:
        lead_shape: leading shape of the logits (``(N,)`` or ``(B, T)``).
        num_classes: V.
        dtype: compute dtype (fp32, or fp64 for fp64 logits).
        valid: ``(n,)`` bool validity, ``mask & (target != ignore_index)``.
        target: ``(n,)`` int64 target clamped to ``[0, V)`` (safe to gather with).
        out_of_range: ``(n,)`` bool, valid rows whose target lies outside ``[0, V)``.
        support: the smoothing support A (indicator 1 on A).
        target_in_support: ``(n,)`` float ``[y∈A]``.
    """

    lead_shape: tuple[int, ...]
    num_classes: int
    dtype: torch.dtype
    valid: torch.Tensor
    target: torch.Tensor
    out_of_range: torch.Tensor
    support: ColumnSet
    target_in_support: torch.Tensor

    @property
    def num_support(self) -> int:
        return self.support.count


def compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """fp64 logits compute in fp64; every other float dtype computes in fp32 (load any dtype, compute in fp32, round once on the store)."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def prepare(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int | None,
    mask: torch.Tensor | None,
    smoothing_exclude,
    token_weight: torch.Tensor | None = None,
) -> Prepared:
    """Check shapes and dtypes (no value reads) and build the per-row tensors of a call."""
    check_logits_target(logits, target, mask=mask, token_weight=token_weight)
    check_ignore_index(ignore_index)
    v = logits.shape[-1]
    dtype = compute_dtype(logits)
    excluded = normalize_ids(smoothing_exclude, v, "smoothing_exclude")
    support = support_set(excluded, v, logits.device, dtype)
    tgt = target.reshape(-1).long()
    valid = validity_mask(tgt, ignore_index=ignore_index, mask=None if mask is None else mask.reshape(-1))
    in_range = (tgt >= 0) & (tgt < v)
    clamped = tgt.clamp(0, v - 1)
    return Prepared(
        lead_shape=tuple(logits.shape[:-1]),
        num_classes=v,
        dtype=dtype,
        valid=valid,
        target=clamped,
        out_of_range=valid & ~in_range,
        support=support,
        target_in_support=support.indicator[clamped],
    )


@dataclasses.dataclass(frozen=True)
class Smoothing:
    """Per-row label smoothing (None fields when ε = 0).

    Attributes:
        eps: the global ε.
        eps_t: ``(n,)`` ε_t (0 on hard-target rows).
        eps_over_kt: ``(n,)`` ε_t / K_t (0 where ε_t = 0).
        target_in_at: ``(n,)`` ``[y∈A_t]``: ``[y∈A]`` for "torch", 0 for "fairseq".
        k_ratio: ``(n,)`` K / K_t, so that ``ε_t·a/K_t = ε_t·k_ratio·(a/K)``.
    """

    eps: float
    eps_t: torch.Tensor | None
    eps_over_kt: torch.Tensor | None
    target_in_at: torch.Tensor | None
    k_ratio: torch.Tensor | None


def check_label_smoothing(eps, convention: str, num_support: int) -> float:
    """``functional.check_label_smoothing`` (``0 <= ε < 1``, a known convention, K ≥ 1 / K ≥ 2), returning ε.

    The functional check is reused so both paths reject bad settings with the same message.
    """
    functional_check_label_smoothing(eps, convention, num_support)
    return float(eps)


def prepare_smoothing(
    prep: Prepared, eps: float, convention: str, hard_target_ids, device: torch.device
) -> Smoothing:
    """ε_t, ε_t/K_t and ``[y∈A_t]`` per row; hard targets (default: the excluded ids) get ε_t = 0."""
    if eps == 0.0:
        return Smoothing(eps, None, None, None, None)
    v, k = prep.num_classes, prep.num_support
    if hard_target_ids is None:
        hard = member_set(prep.support.ids, v, device, prep.dtype)
    else:
        hard = member_set(normalize_ids(hard_target_ids, v, "hard_target_ids"), v, device, prep.dtype)
    eps_t = (
        eps * (1.0 - hard.indicator[prep.target])
        if hard.count
        else torch.full_like(prep.target_in_support, eps)
    )
    if convention == "torch":
        k_t = torch.full_like(eps_t, float(k))
        target_in_at = prep.target_in_support
    else:
        k_t = k - prep.target_in_support
        target_in_at = torch.zeros_like(eps_t)
    k_t_safe = k_t.clamp_min(1.0)
    eps_over_kt = torch.where(eps_t > 0, eps_t / k_t_safe, torch.zeros_like(eps_t))
    return Smoothing(eps, eps_t, eps_over_kt, target_in_at, float(k) / k_t_safe)
