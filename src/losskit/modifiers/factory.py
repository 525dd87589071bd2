"""``create_loss_modifier_pipeline(config)`` and ``register_modifier`` (seed 000).

The factory takes the settings parsed once at the edge (``config_keys.parse_modifier_config``; a raw config is parsed
here), builds the enabled built-ins in canonical order (Entropy, TargetSmoothing, MaskRatioWeight, SNRWeight), then
the enabled registered user classes, then appends ``extra_modifiers``. Keys that are not modifier-shaped (trainer keys, the seed's ``custom_param``) are
ignored here.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from losskit.contract import ConfigError
from losskit.modifiers.base import BaseLossModifier, is_rank0
from losskit.modifiers.config_keys import (
    MODIFIER_CONFIG_KEYS,
    EntropySettings,
    MaskRatioSettings,
    ModifierSettings,
    SmoothingSettings,
    SNRSettings,
    parse_modifier_config,
)
from losskit.modifiers.entropy import EntropyModifier
from losskit.modifiers.mask_ratio import MaskRatioWeightModifier
from losskit.modifiers.pipeline import LossModifierPipeline
from losskit.modifiers.smoothing import TargetSmoothingModifier
from losskit.modifiers.snr import SNRWeightModifier

__all__ = ["create_loss_modifier_pipeline", "register_modifier", "registered_modifiers", "unregister_modifier"]

_REGISTRY: dict[str, type[BaseLossModifier]] = {}


def register_modifier(cls: type[BaseLossModifier], prefix: str) -> type[BaseLossModifier]:
    """Let the factory build ``cls`` from flat keys ``<prefix>*`` (prefix stripped); those keys become valid.

    ``register_modifier(MyModifier, "my_mod_")`` then ``--my_mod_enabled=True --my_mod_scale=2`` builds
    ``MyModifier({"enabled": True, "scale": 2})``. String values from the command line are parsed as Python
    literals when they are one (``"2"`` -> 2). Returns ``cls``.
    """
    if not (isinstance(cls, type) and issubclass(cls, BaseLossModifier)):
        raise TypeError(f"register_modifier needs a subclass of BaseLossModifier, got {cls!r}")
    if not isinstance(prefix, str) or not prefix.isidentifier():
        raise ConfigError(f"register_modifier prefix must be an identifier such as 'my_mod_', got {prefix!r}")
    clash = [k for k in MODIFIER_CONFIG_KEYS if k.startswith(prefix)] + [p for p in _REGISTRY if p != prefix and (
        p.startswith(prefix) or prefix.startswith(p))]
    if clash:
        raise ConfigError(f"register_modifier prefix {prefix!r} overlaps existing keys or prefixes: {clash[:3]}")
    _REGISTRY[prefix] = cls
    return cls


def unregister_modifier(prefix: str) -> None:
    """Remove a registration (tests, notebooks)."""
    _REGISTRY.pop(prefix, None)


def registered_modifiers() -> dict[str, type[BaseLossModifier]]:
    """``{prefix: class}`` of every registered user modifier."""
    return dict(_REGISTRY)


#: The built-in modifier of each settings class, in canonical order.
_BUILTINS: tuple[tuple[type, type[BaseLossModifier]], ...] = (
    (EntropySettings, EntropyModifier),
    (SmoothingSettings, TargetSmoothingModifier),
    (MaskRatioSettings, MaskRatioWeightModifier),
    (SNRSettings, SNRWeightModifier),
)


def create_loss_modifier_pipeline(
    config: ModifierSettings | Mapping[str, Any] | Any,
    *,
    extra_modifiers: Iterable[BaseLossModifier] = (),
    verbose: bool = True,
    input_checks: str = "immediate",
) -> LossModifierPipeline:
    """Build the pipeline a flat config describes.

    Args:
        config: ``ModifierSettings`` already parsed at the edge (``parse_modifier_config``: no second parse, no
            second warning), or a dict / attribute object with the flat keys (``loss_modifiers_enabled``,
            ``entropy_modifier_*``, ``target_smoothing_*``, ``mask_ratio_weight_*``, the SNR keys and registered
            prefixes), parsed here. Values may be strings (``"0,1,2"``); other keys are ignored.
        extra_modifiers: modifier instances appended after the built-ins (the seed's ``CustomModifier``).
        verbose: print ``describe()`` once on rank 0 when any modifier is enabled.
        input_checks: ``"immediate"`` or ``"deferred"`` (see ``LossModifierPipeline``).

    Raises:
        ConfigError: unknown modifier-shaped key, bad value, or a conflict.
    """
    if isinstance(config, ModifierSettings):
        settings = config
    else:
        settings = parse_modifier_config(config, prefixes=tuple(_REGISTRY))
    pipe = LossModifierPipeline(input_checks=input_checks)
    if settings.enabled:
        by_type = {type(b): b for b in settings.builtins}
        for settings_cls, cls in _BUILTINS:
            if by_type[settings_cls].enabled:
                pipe.add_modifier(cls(by_type[settings_cls]))
        registered = dict(settings.registered)
        for prefix, cls in _REGISTRY.items():
            sub = registered.get(prefix)
            if sub:
                mod = cls(dict(sub))
                if mod.is_enabled():
                    pipe.add_modifier(mod)
    for mod in extra_modifiers:
        pipe.add_modifier(mod)
    if not pipe.is_empty():
        if verbose and is_rank0():
            print(pipe.describe())
    elif settings.enabled:
        warnings.warn("loss_modifiers_enabled=True but no loss modifier is enabled; the loss is unchanged",
                      UserWarning, stacklevel=2)
    return pipe
