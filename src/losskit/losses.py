"""Loss modules: ``nn.Module`` s that hold settings and call ``losskit.kernels`` (no math of their own)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from losskit import kernels
from losskit.contract import REDUCTIONS, SMOOTHING_CONVENTIONS, LossInputError, check_choice


class LabelSmoothedCrossEntropy(nn.Module):
    """Label-smoothed cross-entropy (seed 004, corrected), in closed form.

    Per valid token, with ε = ``epsilon``, support A = [0, V) minus ``smoothing_exclude`` (K = |A|) and the
    ``"torch"`` convention (the notebook's intended ``q = (1-ε)·onehot + ε/V`` when nothing is excluded)::

        ℓ = (1 - ε)·CE + ε·(lse - mean_{c∈A} z_c)

    averaged over the tokens whose target is not ``ignore_index`` (``ignore_index=None``: over all tokens).
    ``smoothing_convention="fairseq"`` spreads ε over A without the target (ε/(K-1) each). The dense target
    distribution is never built. Equivalent plain torch (``smoothing_exclude=()``, ``"torch"``)::

        F.cross_entropy(logits.flatten(0, -2), target.flatten(), ignore_index=ignore_index,
                        label_smoothing=epsilon, reduction=reduction)

    except that an all-ignored batch gives an exact, graph-connected 0 and an ``EmptyBatchWarning`` (torch: NaN).

    Fixed relative to the notebook: ``forward`` was nested in ``__init__`` (the cell never compiled), the typo
    ``oss = loss.sum(-1)`` left a (B, T, V) loss, ``scatter_`` crashed on -100 targets, an all-padding batch gave
    NaN, and the one-hot target was materialised densely.

    Args:
        epsilon: smoothing factor ε in [0, 1).
        ignore_index: target value without supervision (seed 004 used 0 for padding); None ignores nothing.
            The ignored id's column still receives smoothing mass, as in torch; add it to ``smoothing_exclude``
            to keep mass off it.
        reduction: "mean" (over valid tokens), "sum" or "none" (per token, zeros where ignored).
        smoothing_convention: "torch" or "fairseq".
        smoothing_exclude: class ids that receive no smoothing mass; tokens whose target is one of them keep a
            hard target.
    """

    def __init__(
        self,
        epsilon: float = 0.1,
        ignore_index: int | None = -100,
        reduction: str = "mean",
        smoothing_convention: str = "torch",
        smoothing_exclude: Iterable[int] = (),
    ) -> None:
        super().__init__()
        if not 0.0 <= float(epsilon) < 1.0:
            raise LossInputError(f"epsilon must be in [0, 1), got {epsilon}")
        check_choice("reduction", reduction, REDUCTIONS)
        check_choice("smoothing_convention", smoothing_convention, SMOOTHING_CONVENTIONS)
        self.epsilon = float(epsilon)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.smoothing_convention = smoothing_convention
        self.smoothing_exclude = tuple(int(i) for i in smoothing_exclude)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of ``logits`` (N, V) or (B, T, V) against ``target`` (N,) or (B, T)."""
        return kernels.cross_entropy(
            logits,
            target,
            ignore_index=self.ignore_index,
            label_smoothing=self.epsilon,
            smoothing_convention=self.smoothing_convention,
            smoothing_exclude=self.smoothing_exclude,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return (
            f"epsilon={self.epsilon}, ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"smoothing_convention={self.smoothing_convention!r}, smoothing_exclude={self.smoothing_exclude}"
        )
