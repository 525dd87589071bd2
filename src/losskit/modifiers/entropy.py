"""``EntropyModifier``: weight the loss by the model's wrong-answer entropy (seed 000).

Per valid position the wrong-answer entropy ``H(q)`` (``q`` = softmax over the non-target logits) comes from the
one ``token_stats`` pass; this module never computes a softmax. Then::

    Ĥ_it = 0 where 1 - p_y <= eps (tested as log1m_target_prob <= ln eps), else H(q)_it     (eps = 0: no rule)
    H̄_i  = Σ_t m_it Ĥ_it / n_i                        for non-empty samples i ∈ S
    H*_i = max(H̄_i, threshold)
    β    = weight · mean_{i∈S} H*_i                    (default: one scalar for the micro-batch)
    e_i  = weight · H*_i                               (per_sample=True: sample weights)

Seed worked example: logits ``[2.0, 1.0, 4.0, 0.5]``, target 2 give ``H(q) = 0.905959`` nats; per-sample entropies
``[0.2, 0.6, 1.0, 0.4]`` with threshold 0.5 give ``β = 0.65``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from losskit.modifiers.base import BaseLossModifier, ModifierContext, Weights, is_rank0, masked_summary
from losskit.modifiers.config_keys import EntropySettings
from losskit.modifiers.standalone import run_standalone

__all__ = ["EntropyModifier", "entropy_batch_weight", "position_entropy", "sample_entropy"]

logger = logging.getLogger("losskit.modifiers")


def position_entropy(
    wrong_entropy: torch.Tensor, log1m_target_prob: torch.Tensor, valid: torch.Tensor, *, eps: float = 1e-8
) -> torch.Tensor:
    """``Ĥ``: H(q) at valid positions, with the seed's "no wrong mass -> 0" rule; 0 elsewhere.

    Plain torch: ``torch.where(valid & (log1m_target_prob > math.log(eps)), wrong_entropy, 0)`` (``eps = 0``
    drops the second condition). Testing ``ln(1 - p_y) <= ln(eps)`` instead of ``1 - p_y <= eps`` stays exact when
    ``1 - p_y`` underflows.
    """
    keep = valid
    if eps > 0:
        keep = keep & (log1m_target_prob > math.log(eps))
    return torch.where(keep, wrong_entropy, torch.zeros((), dtype=wrong_entropy.dtype, device=wrong_entropy.device))


def sample_entropy(h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``H̄_i = Σ_t m_it h_it / max(n_i, 1)`` for ``(B, T)`` inputs (0 for empty samples)."""
    n = valid.sum(-1).clamp_min(1).to(h.dtype)
    return torch.where(valid, h, torch.zeros((), dtype=h.dtype, device=h.device)).sum(-1) / n


def entropy_batch_weight(
    sample_entropy: torch.Tensor | Sequence[float],
    threshold: float = 0.0,
    weight: float = 1.0,
    *,
    sample_valid: torch.Tensor | None = None,
    per_sample: bool = False,
) -> torch.Tensor:
    """The entropy weight from per-sample mean entropies (steps 3–5 of the entropy weighting in docs/modifiers.md).

    ``H* = max(H̄, threshold)``; default: ``β = weight · mean_{i∈S} H*_i`` (0-d); ``per_sample=True``:
    ``e_i = weight · H*_i`` (``(B,)``, 0 outside S). Plain torch::

        h = sample_entropy.clamp_min(threshold)
        beta = weight * h[sample_valid].mean()            # the seed: batch_weight = mean(H*) * weight

    Args:
        sample_entropy: ``(B,)`` per-sample mean entropies ``H̄_i`` (tensor or sequence of floats).
        threshold: the floor τ >= 0.
        weight: the multiplier (``entropy_modifier_weight``).
        sample_valid: ``(B,)`` bool, the non-empty samples S (default: all).
        per_sample: return ``e_i`` instead of ``β``.

    Example (seed 000): ``entropy_batch_weight([0.2, 0.6, 1.0, 0.4], threshold=0.5, weight=1)`` is 0.65, and
    ``per_sample=True`` gives ``[0.5, 0.6, 1.0, 0.5]``.
    """
    h = torch.as_tensor(sample_entropy)
    if not h.is_floating_point():
        h = h.to(torch.get_default_dtype())
    clamped = h.clamp_min(threshold)
    zero = torch.zeros((), dtype=h.dtype, device=h.device)
    if sample_valid is None:
        sample_valid = torch.ones(h.shape, dtype=torch.bool, device=h.device)
    if per_sample:
        return torch.where(sample_valid, weight * clamped, zero)
    count = sample_valid.sum().clamp_min(1).to(h.dtype)
    return weight * torch.where(sample_valid, clamped, zero).sum() / count


class EntropyModifier(BaseLossModifier):
    """Phase-2 weight producer: the batch scalar β (or per-sample ``e_i``) from the wrong-answer entropy.

    Config: ``EntropySettings`` (parsed once, e.g. by the factory), or seed 000's dict of short keys (the flat keys
    carry the prefix ``entropy_modifier_``): ``enabled=False``, ``weight=1.0``, ``threshold=0.0``, ``eps=1e-8``,
    ``use_for_weighting=True`` (True only), ``debug=False``, ``per_sample=False``, ``differentiable_weights=False``.

    Used standalone, ``modify_loss(logits, targets, loss, mask=..., ignore_index=-100)`` equals a pipeline holding
    only this modifier: ``β · (token-mean CE)``. β is detached unless ``differentiable_weights=True``.

    Metrics (detached 0-d tensors, over valid positions, population std): ``mean_entropy``, ``max_entropy``,
    ``min_entropy``, ``entropy_std``, ``entropy_weight`` (β, or ``mean_{i∈S} e_i`` in per-sample mode).
    """

    needs = ("wrong_entropy", "log1m_target_prob")
    requires_logits = True
    canonical_rank = 0
    PREFIX = "entropy_modifier_"

    def __init__(self, config: EntropySettings | Mapping[str, Any] | None = None):
        self.bind_settings(EntropySettings, config)

    def weights(self, ctx: ModifierContext) -> Weights:
        stats = ctx.stats
        assert stats is not None, "EntropyModifier needs the token statistics of class logits"
        h_pos = position_entropy(stats.wrong_entropy, stats.log1m_target_prob, ctx.valid, eps=self.eps)
        h_bar = sample_entropy(h_pos, ctx.valid)
        w = entropy_batch_weight(h_bar, self.threshold, self.weight, sample_valid=ctx.nonempty,
                                 per_sample=self.per_sample)
        with torch.no_grad():
            ext = masked_summary(h_pos.detach(), ctx.valid, ctx.num_valid)
            if self.per_sample:
                shown = w.detach().sum() / ctx.nonempty.sum().clamp_min(1).to(w.dtype)
            else:
                shown = w.detach()
        self._metrics = {
            "mean_entropy": ext.mean,
            "max_entropy": ext.max,
            "min_entropy": ext.min,
            "entropy_std": ext.std,
            "entropy_weight": shown,
        }
        if self.debug:
            self._log_debug(ctx, h_pos, h_bar, shown)
        return Weights(sample=w) if self.per_sample else Weights(batch=w)

    def _log_debug(self, ctx: ModifierContext, h_pos: torch.Tensor, h_bar: torch.Tensor, shown: torch.Tensor
                   ) -> None:
        """One diagnostic line on rank 0. It reads values to the host (syncs): diagnosis only."""
        if not is_rank0():
            return
        m = self._metrics
        clamped = int(((h_bar.detach() < self.threshold) & ctx.nonempty).sum())
        logger.info(
            "EntropyModifier iter=%s valid=%d H mean=%.6f min=%.6f max=%.6f H_bar[:8]=%s clamped=%d weight=%.6f",
            ctx.iter_num, int(ctx.num_valid), float(m["mean_entropy"]), float(m["min_entropy"]),
            float(m["max_entropy"]), [round(v, 6) for v in h_bar.detach()[:8].tolist()], clamped, float(shown),
        )

    def modify_loss(self, logits: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor | None = None,
                    **kwargs: Any) -> torch.Tensor:
        """Standalone use: equals ``LossModifierPipeline([self]).modify_loss(...)``."""
        return run_standalone(self, logits, targets, loss, **kwargs)

    def get_metrics(self) -> dict[str, Any]:
        return dict(self._metrics)
