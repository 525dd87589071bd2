"""``TargetSmoothingModifier``: label-smoothed CE with special (hard, excluded) ids (seed 000).

Phase-1 producer. From the one ``token_stats`` pass (``smoothing_exclude = special_tokens``), with support
``A = [0, V) \\ X``, ``K = |A|`` and ``ε_t = ε`` where ``y ∉ X`` (0 where the target is special)::

    "torch":   ℓ = nll − ε_t · g                 = (1−ε)·CE + ε·(lse − z̄_A)
    "fairseq": ℓ = nll − ε_t · K·g/(K − 1)       (target gets 1−ε, every other id in A gets ε/(K−1))

with ``g = z̄_A − z_y`` the statistic ``support_gap`` (exact under a common logit offset), through the kernels'
one closed form ``rowmath.smoothed_nll``. With ``X = ∅`` "torch" equals
``F.cross_entropy(logits, y, label_smoothing=ε, reduction="none")``. The dense target distribution is never built.

With ``exclude_padding=True`` positions whose target is ``padding_token`` leave the validity mask ``m``; the
padding column itself stays in the support unless listed in ``special_tokens``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from losskit.contract import ConfigError, check_finite_logits
from losskit.kernels.rowmath import smoothed_nll
from losskit.modifiers.base import BaseLossModifier, ModifierContext
from losskit.modifiers.config_keys import SmoothingSettings
from losskit.modifiers.standalone import run_standalone

__all__ = ["TargetSmoothingModifier", "smoothed_token_loss"]


def smoothed_token_loss(
    nll: torch.Tensor,
    support_gap: torch.Tensor,
    smooth: torch.Tensor,
    *,
    factor: float,
    num_support: int,
    convention: str = "torch",
) -> torch.Tensor:
    """Closed-form smoothed CE per token from the statistics: ``nll − ε_t·(K/K_t)·support_gap``.

    Args:
        nll, support_gap: ``TokenStats`` fields (any shape).
        smooth: bool, positions that are smoothed (``ε_t = ε``); others keep hard CE.
        factor: ε in ``[0, 1)``.
        num_support: ``K = |A|``.
        convention: ``"torch"`` or ``"fairseq"``.

    Plain torch (dense oracle, "torch"): ``-(q * log_softmax(z)).sum(-1)`` with
    ``q = (1−ε)·onehot(y) + ε/K·[c ∈ A]``.
    """
    if factor == 0:
        return nll
    scale = factor if convention == "torch" else factor * num_support / (num_support - 1)
    zero = torch.zeros((), dtype=nll.dtype, device=nll.device)
    return smoothed_nll(nll, support_gap, torch.where(smooth, torch.full((), scale, dtype=nll.dtype,
                                                                         device=nll.device), zero))


class TargetSmoothingModifier(BaseLossModifier):
    """Phase-1 per-token loss producer: label smoothing with special ids.

    Config: ``SmoothingSettings``, or seed 000's dict of short keys (flat keys carry the prefix
    ``target_smoothing_``): ``enabled=False``, ``factor=0.1`` (``[0, 1)``), ``special_tokens=[]`` (ids in ``[0, V)``,
    checked at the first call), ``exclude_padding=True``, ``padding_token=-100``, ``convention="torch"``.

    Standalone, ``modify_loss(logits, targets, loss, ...)`` equals a pipeline holding only this modifier: the token
    mean of the smoothed CE over ``m``.

    Metrics (detached 0-d tensors): ``original_loss`` (plain-CE token mean over ``m``), ``smoothed_loss`` (``ℓ``
    token mean over ``m``, before weights), ``smoothing_factor``, ``valid_positions`` (N).
    """

    needs = ("nll", "support_gap")
    requires_logits = True
    canonical_rank = 1
    PREFIX = "target_smoothing_"

    def __init__(self, config: SmoothingSettings | Mapping[str, Any] | None = None):
        s = self.bind_settings(SmoothingSettings, config)
        self.special_tokens = list(s.special_tokens)
        self._ids: dict[torch.device, torch.Tensor] = {}

    # ---- hooks ------------------------------------------------------------------------------------------------
    def check_num_classes(self, num_classes: int) -> None:
        bad = [i for i in self.special_tokens if not 0 <= i < num_classes]
        if bad:
            raise ConfigError(
                f"target_smoothing_special_tokens must hold ids in [0, V={num_classes}), got {bad} "
                f"(from {self.special_tokens})"
            )
        k = num_classes - len(self.special_tokens)
        need = 1 if self.convention == "torch" else 2
        if self.factor > 0 and k < need:
            raise ConfigError(
                f"target_smoothing_special_tokens leaves K={k} smoothing classes of V={num_classes}; the "
                f"{self.convention!r} convention needs K >= {need}"
            )

    def stats_options(self) -> dict[str, Any]:
        return {"smoothing_exclude": tuple(self.special_tokens)}

    def restrict_valid(self, targets: torch.Tensor) -> torch.Tensor | None:
        if self.exclude_padding:
            return targets != self.padding_token
        return None

    def _hard(self, targets: torch.Tensor) -> torch.Tensor:
        if not self.special_tokens:
            return torch.zeros(targets.shape, dtype=torch.bool, device=targets.device)
        ids = self._ids.get(targets.device)
        if ids is None:
            ids = self._ids[targets.device] = torch.tensor(self.special_tokens, dtype=targets.dtype,
                                                           device=targets.device)
        return torch.isin(targets, ids.to(targets.dtype))

    def smoothed_rows(self, ctx: ModifierContext) -> torch.Tensor:
        """bool ``(B, T)``: valid positions that receive smoothing (``ε_t > 0``)."""
        assert ctx.targets is not None
        if self.factor == 0:
            return torch.zeros_like(ctx.valid)
        return ctx.valid & ~self._hard(ctx.targets)

    def bad_rows(self, ctx: ModifierContext) -> torch.Tensor | None:
        """Smoothed rows whose support mean is not finite (a −inf column in the support)."""
        if self.factor == 0:
            return None
        assert ctx.stats is not None
        return self.smoothed_rows(ctx) & ~torch.isfinite(ctx.stats.support_mean_logit.detach())

    def explain_bad(self, logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> None:
        """Raise the precise ``LossInputError`` for −inf inside the smoothing support (one host read)."""
        if self.factor == 0:
            return
        v = logits.shape[-1]
        support = torch.ones(v, dtype=torch.bool, device=logits.device)
        if self.special_tokens:
            support[torch.tensor(self.special_tokens, device=logits.device)] = False
        check_finite_logits(logits, targets, valid & ~self._hard(targets), smoothing_support=support,
                            smoothing_key="target_smoothing_special_tokens")

    def per_token_loss(self, ctx: ModifierContext) -> torch.Tensor:
        stats = ctx.stats
        assert stats is not None and ctx.targets is not None
        assert ctx.num_classes is not None
        num_support = ctx.num_classes - len(self.special_tokens)
        ell = smoothed_token_loss(
            stats.nll, stats.support_gap, self.smoothed_rows(ctx),
            factor=self.factor, num_support=num_support, convention=self.convention,
        )
        zero = torch.zeros((), dtype=ell.dtype, device=ell.device)
        ell = torch.where(ctx.valid, ell, zero)
        with torch.no_grad():
            n = ctx.num_valid.clamp_min(1).to(ell.dtype)
            self._metrics = {
                "original_loss": torch.where(ctx.valid, stats.nll.detach(), zero).sum() / n,
                "smoothed_loss": ell.detach().sum() / n,
                # a fill, not torch.tensor(...): no host-to-device copy inside the step
                "smoothing_factor": torch.full((), self.factor, dtype=ell.dtype, device=ell.device),
                "valid_positions": ctx.num_valid.detach().to(ell.dtype),
            }
        return ell

    def modify_loss(self, logits: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor | None = None,
                    **kwargs: Any) -> torch.Tensor:
        """Standalone use: equals ``LossModifierPipeline([self]).modify_loss(...)``."""
        return run_standalone(self, logits, targets, loss, **kwargs)

    def get_metrics(self) -> dict[str, Any]:
        return dict(self._metrics)
