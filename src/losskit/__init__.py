"""losskit: loss functions and loss modifiers for PyTorch.

One fused pass over the logits yields every per-token statistic the cross-entropy family and the loss
modifiers need; losses are cheap functions of those statistics. See DESIGN.md for the layers.
"""

from losskit.contract import (
    ConfigError,
    CrossEntropyParts,
    EmptyBatchWarning,
    LossFnOutput,
    LossInputError,
    StepCounts,
    TokenStats,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "CrossEntropyParts",
    "EmptyBatchWarning",
    "LossFnOutput",
    "LossInputError",
    "StepCounts",
    "TokenStats",
    "__version__",
]
