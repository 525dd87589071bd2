"""``MaskRatioWeightModifier``: up-weight sequences with few valid tokens (seed 000).

Phase-2 weight producer that also selects the sequence mean for phase 3::

    r_i = n_i / (T + eps)                       T = targets.shape[-1], the padded length
    w_i = clamp((r_i + eps) ** (-power), min, max)
    L   = (1/|S|) Σ_{i∈S} w_i · (Σ_t m_it ℓ_it / n_i)

No renormalisation (the seed's example requires it). Seed example: T = 4, targets ``[5,−100,−100,−100]`` and
``[3,4,1,2]`` give ``r = [0.25, 1.0]``, ``w = [2.0, 1.0]``; with ``L = [2.0, 1.0]`` the loss is 2.5 (plain token
mean 1.2). The weights come from a bool mask, so they carry no gradient.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from losskit.modifiers.base import BaseLossModifier, ModifierContext, Weights, masked_summary
from losskit.modifiers.config_keys import MaskRatioSettings
from losskit.modifiers.standalone import run_standalone

__all__ = ["MaskRatioWeightModifier", "mask_ratio_weights"]


def mask_ratio_weights(
    seq_valid: torch.Tensor,
    seq_len: int,
    *,
    power: float = 0.5,
    min_weight: float = 0.1,
    max_weight: float = 10.0,
    eps: float = 1e-8,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence mask ratios and weights ``(r, w)`` from valid counts ``n_i``.

    Plain torch: ``r = n / (T + eps); w = ((r + eps) ** -power).clamp(min_weight, max_weight)``.

    Args:
        seq_valid: ``(B,)`` integer valid counts ``n_i``.
        seq_len: the padded length ``T``.
        dtype: float dtype of the result (default: the default float dtype).
    """
    r = seq_valid.to(dtype or torch.get_default_dtype()) / (seq_len + eps)
    w = (r + eps).pow(-power).clamp(min_weight, max_weight)
    return r, w


class MaskRatioWeightModifier(BaseLossModifier):
    """Phase-2 weight producer: sequence weights ``w_i`` from the mask ratio, and the sequence-mean reduction.

    Config: ``MaskRatioSettings``, or seed 000's dict of short keys (flat keys carry the prefix
    ``mask_ratio_weight_``): ``enabled=False``, ``power=0.5`` (>= 0), ``min=0.1``, ``max=10.0``
    (``0 < min <= max``), ``eps=1e-8`` (>= 0).

    Standalone, ``modify_loss(logits, targets, loss, ...)`` equals a pipeline holding only this modifier.

    Metrics over non-empty sequences (detached 0-d tensors, population std): ``mean_mask_ratio``,
    ``min_mask_ratio``, ``max_mask_ratio``, ``mean_weight``, ``min_weight``, ``max_weight``, ``weight_std``.
    """

    needs = ()
    requires_logits = True
    canonical_rank = 2
    PREFIX = "mask_ratio_weight_"

    def __init__(self, config: MaskRatioSettings | Mapping[str, Any] | None = None):
        self.bind_settings(MaskRatioSettings, config)

    def weights(self, ctx: ModifierContext) -> Weights:
        dtype = ctx.per_token_loss.dtype if ctx.per_token_loss is not None else None
        r, w = mask_ratio_weights(ctx.seq_valid, ctx.T, power=self.power, min_weight=self.min,
                                  max_weight=self.max, eps=self.eps, dtype=dtype)
        count = ctx.nonempty.sum()
        rs = masked_summary(r, ctx.nonempty, count)
        ws = masked_summary(w, ctx.nonempty, count)
        self._metrics = {
            "mean_mask_ratio": rs.mean,
            "min_mask_ratio": rs.min,
            "max_mask_ratio": rs.max,
            "mean_weight": ws.mean,
            "min_weight": ws.min,
            "max_weight": ws.max,
            "weight_std": ws.std,
        }
        return Weights(sample=w, sequence_mean=True)

    def modify_loss(self, logits: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor | None = None,
                    **kwargs: Any) -> torch.Tensor:
        """Standalone use: equals ``LossModifierPipeline([self]).modify_loss(...)``."""
        return run_standalone(self, logits, targets, loss, **kwargs)

    def get_metrics(self) -> dict[str, Any]:
        return dict(self._metrics)
