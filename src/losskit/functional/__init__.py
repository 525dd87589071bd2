"""Pure, differentiable reference functions: the oracle every fast path in losskit is tested against.

``functional`` never takes an ``impl`` argument and never imports ``losskit.kernels``. Reductions live in
``functional.reduce`` (the only place a mean is taken); the cross-entropy family in
``functional.cross_entropy``. Other submodules (policy, diffusion, temporal) are imported by name.
"""

from losskit.functional.cross_entropy import (
    check_label_smoothing,
    check_z_loss,
    cross_entropy,
    entropy,
    exclude_ids,
    smoothing_support,
    wrong_answer_entropy,
)
from losskit.functional.reduce import (
    masked_mean,
    masked_sum,
    normalizer,
    sequence_mean,
    step_counts,
    warn_empty,
)

__all__ = [
    "check_label_smoothing",
    "check_z_loss",
    "cross_entropy",
    "entropy",
    "exclude_ids",
    "masked_mean",
    "masked_sum",
    "normalizer",
    "sequence_mean",
    "smoothing_support",
    "step_counts",
    "warn_empty",
    "wrong_answer_entropy",
]
