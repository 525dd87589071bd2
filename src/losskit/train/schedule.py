"""The learning-rate schedule shared by the training tasks: nanoGPT's linear warm-up, then cosine decay.

With ``w = warmup_iters``, ``D = lr_decay_iters`` (``max_iters`` when None), ``lr = learning_rate`` and
``lr_min = min_lr``::

    it <  w        : lr · (it + 1) / (w + 1)
    w <= it < D    : lr_min + ½ (1 + cos(π (it − w) / (D − w))) · (lr − lr_min)
    it >= max(w, D): lr_min

``decay_lr=False`` keeps ``lr`` throughout. The schedule is a host-side Python float per step (no device work).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["get_lr"]


def get_lr(it: int, cfg: Any) -> float:
    """The learning rate of iteration ``it`` (0-based) for a trainer config (``losskit.train.config.StepScheduleConfig``).

    Reads ``decay_lr``, ``learning_rate``, ``min_lr``, ``warmup_iters``, ``lr_decay_iters`` and ``max_iters``.
    Source: nanoGPT's ``get_lr`` (warm-up reaches ``learning_rate`` at ``it = warmup_iters``).
    """
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    decay_iters = cfg.lr_decay_iters if cfg.lr_decay_iters is not None else cfg.max_iters
    # it >= warmup_iters here, so decay_iters <= warmup_iters (an empty decay window) also lands on min_lr
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / (decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)
