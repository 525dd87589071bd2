"""Loss modifiers (seed 000): a pipeline of fixed phases over one statistics pass.

Quick start::

    from losskit.modifiers import create_loss_modifier_pipeline
    pipe = create_loss_modifier_pipeline({"loss_modifiers_enabled": True, "target_smoothing_enabled": True})
    loss = pipe.modify_loss(logits, targets, loss)          # the seed's entry point
    out = pipe.compute(logits, targets, mask=mask)          # trainer path: out.loss, out.loss_raw, out.bad
"""

from losskit.modifiers.base import BaseLossModifier, ModifiedLoss, ModifierContext, Weights, phase_of
from losskit.modifiers.config_keys import (
    MODIFIER_CONFIG_KEYS,
    KeySpec,
    ModifierSettings,
    coerce_value,
    parse_modifier_config,
    validate_modifier_config,
)
from losskit.modifiers.entropy import EntropyModifier, entropy_batch_weight
from losskit.modifiers.factory import (
    create_loss_modifier_pipeline,
    register_modifier,
    registered_modifiers,
    unregister_modifier,
)
from losskit.modifiers.mask_ratio import MaskRatioWeightModifier, mask_ratio_weights
from losskit.modifiers.pipeline import LossModifierPipeline
from losskit.modifiers.smoothing import TargetSmoothingModifier, smoothed_token_loss
from losskit.modifiers.snr import SNRWeightModifier

__all__ = [
    "MODIFIER_CONFIG_KEYS",
    "BaseLossModifier",
    "EntropyModifier",
    "KeySpec",
    "LossModifierPipeline",
    "MaskRatioWeightModifier",
    "ModifiedLoss",
    "ModifierContext",
    "ModifierSettings",
    "SNRWeightModifier",
    "TargetSmoothingModifier",
    "Weights",
    "coerce_value",
    "create_loss_modifier_pipeline",
    "entropy_batch_weight",
    "mask_ratio_weights",
    "parse_modifier_config",
    "phase_of",
    "register_modifier",
    "registered_modifiers",
    "smoothed_token_loss",
    "unregister_modifier",
    "validate_modifier_config",
]
