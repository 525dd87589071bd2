"""A built-in modifier used on its own: exactly a pipeline holding only that modifier."""

from __future__ import annotations

from typing import Any

import torch

from losskit.modifiers.base import BaseLossModifier
from losskit.modifiers.pipeline import LossModifierPipeline

__all__ = ["run_standalone", "standalone_pipeline"]


def standalone_pipeline(modifier: BaseLossModifier) -> LossModifierPipeline:
    """The pipeline holding only ``modifier``, built at the first standalone call and cached on the instance."""
    pipe = modifier.__dict__.get("_standalone_pipeline")
    if pipe is None:
        pipe = LossModifierPipeline()
        pipe.modifiers.append(modifier)  # keep the modifier's own name (no duplicate suffixing)
        modifier.__dict__["_standalone_pipeline"] = pipe
    return pipe


def run_standalone(modifier: BaseLossModifier, logits: torch.Tensor, targets: torch.Tensor,
                   loss: torch.Tensor | None, **kwargs: Any) -> torch.Tensor:
    """A built-in's own ``modify_loss``: exactly a pipeline holding only that modifier."""
    if not modifier.is_enabled():
        return loss
    return standalone_pipeline(modifier).modify_loss(logits, targets, loss, **kwargs)
