"""The flat loss-modifier config keys: the single source of truth for names, types, defaults and ranges.

Source: seed 000 ("Loss Modifiers System") and docs/modifiers.md, plus the
SNR-weighting keys of docs/diffusion.md. Every key the seed documents is here, with three justified additions
(``entropy_modifier_per_sample``, ``entropy_modifier_differentiable_weights``, ``target_smoothing_convention``).

Values arrive as Python objects (from a ``config/*.py`` file or a dict) or as strings (``--key=value`` on the
command line). :func:`coerce_value` converts both by the key's *declared* type, not by the type of its default, so
``--target_smoothing_special_tokens=0,1,2`` gives ``[0, 1, 2]`` and ``--entropy_modifier_weight=2`` gives ``2.0``.
:func:`parse_modifier_config` applies the coercion, the range checks, the cross-key checks and the unknown-key
check (difflib's closest key, curated hints for the reference implementation's legacy names) to a whole config,
once, at the edge, and returns frozen settings: one dataclass per built-in modifier (``EntropySettings``,
``SmoothingSettings``, ``MaskRatioSettings``, ``SNRSettings``) inside one ``ModifierSettings``. The factory and the
modifiers take those; nothing below parses again.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import fnmatch
import math
import types
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from losskit.contract import ConfigError, LossInputError
from losskit.functional.diffusion import check_convention

__all__ = [
    "LEGACY_HINTS",
    "MASTER_SWITCH",
    "MODIFIER_CONFIG_KEYS",
    "MODIFIER_KEY_PATTERNS",
    "SUB_SWITCHES",
    "EntropySettings",
    "KeySpec",
    "MaskRatioSettings",
    "ModifierSettings",
    "SNRSettings",
    "SmoothingSettings",
    "coerce_bool",
    "coerce_value",
    "config_to_dict",
    "is_modifier_shaped",
    "literal_value",
    "parse_modifier_config",
    "section",
    "switch_on",
    "unknown_key_message",
    "validate_modifier_config",
]


@dataclasses.dataclass(frozen=True)
class KeySpec:
    """One flat config key.

    Attributes:
        name: the flat key, e.g. ``"entropy_modifier_weight"``.
        type: ``"bool"``, ``"float"``, ``"int"``, ``"str"``, ``"list[int]"`` or ``"list"`` (YAML), optionally
            ending in ``"|None"``.
        default: the value used when the key is absent.
        help: one line: what the key means (shown by ``losskit modifiers``).
        constraint: human-readable range, used in error messages (``"> 0"``, ``"in [0, 1)"``), or ``""``.
        check: predicate on the coerced value; ``False`` raises ``ConfigError`` quoting ``constraint``.
        choices: allowed values of a ``"str"`` key (empty: any string).
        owner: the built-in modifier the key configures (for the table and the canonical order).
    """

    name: str
    type: str
    default: Any
    help: str
    constraint: str = ""
    check: Callable[[Any], bool] | None = None
    choices: tuple[str, ...] = ()
    owner: str = ""


_TRUE = {"true": True, "1": True, "false": False, "0": False}

_ENTROPY = "EntropyModifier"
_SMOOTHING = "TargetSmoothingModifier"
_MASK_RATIO = "MaskRatioWeightModifier"
_SNR = "SNRWeightModifier"


def _finite(x: float) -> bool:
    return not math.isnan(x)


_SPECS: tuple[KeySpec, ...] = (
    KeySpec("loss_modifiers_enabled", "bool", False, "master switch: no modifier runs unless this is True"),
    # --- EntropyModifier ---
    KeySpec("entropy_modifier_enabled", "bool", False, "weight the loss by the wrong-answer entropy H(q)",
            owner=_ENTROPY),
    KeySpec("entropy_modifier_weight", "float", 1.0, "multiplier of the entropy weight (1/ln(V-1) maps it to [0,1])",
            "> 0", lambda v: v > 0, owner=_ENTROPY),
    KeySpec("entropy_modifier_threshold", "float", 0.0, "floor tau on each per-sample mean entropy", ">= 0",
            lambda v: v >= 0, owner=_ENTROPY),
    KeySpec("entropy_modifier_eps", "float", 1e-8, "positions with 1-p_y <= eps count as entropy 0 (0 disables)",
            ">= 0", lambda v: v >= 0, owner=_ENTROPY),
    KeySpec("entropy_modifier_use_for_weighting", "bool", True, "kept from the seed; weighting is always dynamic",
            "True only", owner=_ENTROPY),
    KeySpec("entropy_modifier_debug", "bool", False, "log one debug line per call on rank 0 (syncs)",
            owner=_ENTROPY),
    KeySpec("entropy_modifier_per_sample", "bool", False, "per-sample weights e_i instead of one batch scalar",
            owner=_ENTROPY),
    KeySpec("entropy_modifier_differentiable_weights", "bool", False, "back-propagate through the entropy weight",
            owner=_ENTROPY),
    # --- TargetSmoothingModifier ---
    KeySpec("target_smoothing_enabled", "bool", False, "replace CE by label-smoothed CE", owner=_SMOOTHING),
    KeySpec("target_smoothing_factor", "float", 0.1, "smoothing strength epsilon (0 = plain CE)", "in [0, 1)",
            lambda v: 0 <= v < 1, owner=_SMOOTHING),
    KeySpec("target_smoothing_special_tokens", "list[int]", [], "ids that keep hard targets and get no mass",
            "ids >= 0 (and < V, checked at the first call)", lambda v: all(i >= 0 for i in v), owner=_SMOOTHING),
    KeySpec("target_smoothing_exclude_padding", "bool", True, "drop positions whose target is the padding token",
            owner=_SMOOTHING),
    KeySpec("target_smoothing_padding_token", "int", -100, "padding token id for exclude_padding",
            owner=_SMOOTHING),
    KeySpec("target_smoothing_convention", "str", "torch", "'torch' (eps/K on every class) or 'fairseq'",
            choices=("torch", "fairseq"), owner=_SMOOTHING),
    # --- MaskRatioWeightModifier ---
    KeySpec("mask_ratio_weight_enabled", "bool", False, "weight sequences by (valid/T)^-power, sequence mean",
            owner=_MASK_RATIO),
    KeySpec("mask_ratio_weight_power", "float", 0.5, "exponent of the inverse mask ratio", ">= 0",
            lambda v: v >= 0, owner=_MASK_RATIO),
    KeySpec("mask_ratio_weight_min", "float", 0.1, "lower clamp of the sequence weight", "> 0",
            lambda v: v > 0, owner=_MASK_RATIO),
    KeySpec("mask_ratio_weight_max", "float", 10.0, "upper clamp of the sequence weight", "> 0",
            lambda v: v > 0, owner=_MASK_RATIO),
    KeySpec("mask_ratio_weight_eps", "float", 1e-8, "stabiliser of the ratio and its power", ">= 0",
            lambda v: v >= 0, owner=_MASK_RATIO),
    # --- SNRWeightModifier; the keys share no prefix ---
    KeySpec("loss_weighting", "str", "constant", "diffusion loss weighting scheme ('constant' = off)",
            choices=("constant", "sangoi", "min_snr", "debiased", "p2", "sd3_sigma_sqrt", "sd3_cosmap", "edm"),
            owner=_SNR),
    KeySpec("min_snr_gamma", "float", 5.0, "gamma of min-SNR-gamma", "> 0", lambda v: v > 0, owner=_SNR),
    KeySpec("p2_gamma", "float", 1.0, "gamma of P2 weighting (warns above 2)", ">= 0", lambda v: v >= 0,
            owner=_SNR),
    KeySpec("p2_k", "float", 1.0, "k of P2 weighting", "> 0", lambda v: v > 0, owner=_SNR),
    KeySpec("snr_clamp_max", "float|None", None, "upper SNR clamp (None = the scheme's default)", ">= 0",
            lambda v: v is None or v >= 0, owner=_SNR),
    KeySpec("snr_clamp_min", "float|None", None, "lower SNR clamp (None = the scheme's default)", ">= 0",
            lambda v: v is None or v >= 0, owner=_SNR),
    KeySpec("prediction_type", "str", "epsilon", "what the denoiser predicts (shared with the diffusion task)",
            choices=("epsilon", "v_prediction", "sample", "x0", "flow"), owner=_SNR),
    KeySpec("weighting_convention", "str", "reference", "whose formula variant the weighting follows",
            choices=("reference", "onetrainer", "kohya", "diffusers"), owner=_SNR),
    KeySpec("edm_sigma_data", "float", 0.5, "sigma_data of EDM weighting", "> 0", lambda v: v > 0, owner=_SNR),
    KeySpec("loss_weighting_differentiable_weights", "bool", False, "keep the Sangoi weight's graph",
            owner=_SNR),
)

#: Every modifier config key, in canonical order (Entropy, TargetSmoothing, MaskRatioWeight, SNRWeight).
MODIFIER_CONFIG_KEYS: dict[str, KeySpec] = {s.name: s for s in _SPECS}

#: Keys of these shapes must be known; others pass through.
MODIFIER_KEY_PATTERNS: tuple[str, ...] = (
    "*_modifier_*",
    "*_modifiers_*",
    "*_smoothing_*",
    "mask_ratio_*",
    "min_snr_*",
    "snr_clamp_*",
    "p2_*",
    "edm_*",
    "loss_weighting*",
    "weighting_*",
)

MASTER_SWITCH = "loss_modifiers_enabled"
#: Built-in modifier -> the key that switches it on.
SUB_SWITCHES: dict[str, str] = {
    _ENTROPY: "entropy_modifier_enabled",
    _SMOOTHING: "target_smoothing_enabled",
    _MASK_RATIO: "mask_ratio_weight_enabled",
    _SNR: "loss_weighting",
}

#: Legacy names of the reference implementation -> the hint shown instead of difflib's guess.
LEGACY_HINTS: dict[str, str] = {
    "entropy_modifier_verbose": "did you mean 'entropy_modifier_debug'? (renamed)",
    "mask_ratio_weight_min_weight": "did you mean 'mask_ratio_weight_min'? (renamed)",
    "mask_ratio_weight_max_weight": "did you mean 'mask_ratio_weight_max'? (renamed)",
    "mask_ratio_weight_sequence_level": "removed; weighting is always sequence-level",
}

USE_FOR_WEIGHTING_MESSAGE = (
    "entropy_modifier_use_for_weighting=False is not supported: entropy weighting is always dynamic; "
    "remove entropy_modifier_use_for_weighting or set entropy_modifier_enabled=False"
)


def section(owner: str) -> dict[str, KeySpec]:
    """The keys that configure one built-in modifier (``owner`` is its class name), in table order."""
    return {k: s for k, s in MODIFIER_CONFIG_KEYS.items() if s.owner == owner}


def _type_error(key: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{key} must be {expected}, got {value!r}")


#: How a missing value is spelled on the command line (and in a file) for a type ending in ``|None``.
_NONE_SPELLINGS = ("None", "none", "null", "")


def coerce_bool(key: str, value: Any) -> bool:
    """``True``/``False``, the ints 1/0, or the strings ``true/false/1/0`` (any case, surrounding spaces ignored).

    Shared with the trainer keys of ``losskit.config``, so both spell booleans the same way.

    Raises:
        ConfigError: ``"<key> must be a bool (True/False/true/false/1/0), got <value>"``.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE:
        return _TRUE[value.strip().lower()]
    raise _type_error(key, "a bool (True/False/true/false/1/0)", value)


def _yaml_list(key: str, value: Any) -> list:
    if isinstance(value, str):
        import yaml

        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key} must be a list (YAML/JSON syntax), got {value!r}: {exc}") from None
    if not isinstance(value, list):
        raise _type_error(key, "a list", value)
    return value


def _to_int(key: str, item: Any, expected: str, whole: Any) -> int:
    if isinstance(item, bool):
        raise _type_error(key, expected, whole)
    if isinstance(item, int):
        return int(item)
    if isinstance(item, float) and item.is_integer():  # 3.0 written in a config file
        return int(item)
    if isinstance(item, str):
        try:
            return int(item.strip())
        except ValueError:
            raise _type_error(key, expected, whole) from None
    raise _type_error(key, expected, whole)


def coerce_value(key: str, value: Any, spec: KeySpec | None = None) -> Any:
    """Convert ``value`` to the declared type of ``key`` and check its range.

    The one set of spellings for config files (Python/YAML objects) and the command line (strings): bool accepts
    ``True/False``, the ints 1/0 and ``true/false/1/0`` in any case; int accepts ints, integral floats (``3.0``)
    and integer strings; float accepts ints, floats and numeric strings (not NaN); list[int] accepts a list or
    tuple of ints, a single int, or a string ``"0,1,2"``, ``"[0, 1, 2]"``, ``"65"`` or ``""``; a type ending in
    ``|None`` also accepts ``None`` and the strings ``None``, ``none``, ``null`` and ``""``.

    Raises:
        ConfigError: naming the key, the expected type or range, and the value, e.g.
            ``"target_smoothing_factor must be in [0, 1), got 1.0"``.
    """
    spec = spec or MODIFIER_CONFIG_KEYS[key]
    t, optional = (spec.type[: -len("|None")], True) if spec.type.endswith("|None") else (spec.type, False)
    if optional and (value is None or (isinstance(value, str) and value.strip() in _NONE_SPELLINGS)):
        return None
    out: Any
    if t == "bool":
        out = coerce_bool(key, value)
    elif t == "float":
        or_none = " or None" if optional else ""
        if isinstance(value, bool):
            raise _type_error(key, "a float" + or_none, value)
        elif isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value.strip())
            except ValueError:
                raise _type_error(key, "a float" + or_none, value) from None
        else:
            raise _type_error(key, "a float" + or_none, value)
        if not _finite(out):
            raise _type_error(key, "a number (not NaN)", value)
    elif t == "int":
        out = _to_int(key, value, "an int", value)
    elif t == "str":
        if not isinstance(value, str):
            raise _type_error(key, "a string", value)
        out = value.strip()
        if spec.choices and out not in spec.choices:
            raise ConfigError(f"{key} must be one of {', '.join(repr(c) for c in spec.choices)}, got {value!r}")
    elif t == "list[int]":
        expected = "a list of ints (e.g. 0,1,2 or [0, 1, 2])"
        if isinstance(value, str):
            text = value.strip()
            if text[:1] in "[(" and text[-1:] in ")]":
                text = text[1:-1]
            items = [p.strip() for p in text.split(",")]
            if items and items[-1] == "":  # "", "[]" and a trailing comma
                items = items[:-1]
            out = [_to_int(key, p, expected, value) for p in items]
        elif isinstance(value, (list, tuple)):
            out = [_to_int(key, p, expected, value) for p in value]
        elif isinstance(value, int) and not isinstance(value, bool):
            out = [int(value)]
        else:
            raise _type_error(key, expected, value)
        out = list(dict.fromkeys(out))  # duplicate ids are dropped
    elif t == "list":  # any YAML/JSON list (a trainer key such as the temporal task's criterion)
        out = _yaml_list(key, value)
    else:  # a programming error in the table itself
        raise TypeError(f"KeySpec {key!r} has unknown type {t!r}")
    if spec.check is not None and not spec.check(out):
        raise ConfigError(f"{key} must be {spec.constraint}, got {value!r}")
    return out


def literal_value(value: Any) -> Any:
    """Best-effort typing of an undeclared value: a string is parsed as a Python literal when it is one.

    Used for keys under a ``register_modifier`` prefix, whose types the table does not know (nanoGPT's
    configurator does the same): ``"2.0"`` -> 2.0, ``"True"`` -> True, ``"abc"`` -> ``"abc"``.
    """
    if not isinstance(value, str):
        return value
    try:
        return ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        return value


def is_modifier_shaped(key: str) -> bool:
    """Whether ``key`` looks like a modifier key, so that an unknown one is an error rather than ignored."""
    return any(fnmatch.fnmatchcase(key, p) for p in MODIFIER_KEY_PATTERNS)


def unknown_key_message(key: str, valid_keys: Iterable[str], *,
                        fallback: str = "`losskit modifiers` lists the valid keys") -> str:
    """The error for an unknown key: curated legacy hint, else difflib's closest valid key (cutoff 0.6), else
    ``fallback`` (where the user can look the keys up)."""
    if key in LEGACY_HINTS:
        return f"unknown config key {key!r}; {LEGACY_HINTS[key]}"
    close = difflib.get_close_matches(key, list(valid_keys), n=1, cutoff=0.6)
    if close:
        return f"unknown config key {key!r}; did you mean {close[0]!r}?"
    return f"unknown config key {key!r}; {fallback}"


def config_to_dict(config: Any) -> dict[str, Any]:
    """A plain dict from a mapping, a dataclass instance or an attribute object (module, namespace, class).

    Private names (leading ``_``) are skipped for attribute objects, as they are in config files.
    """
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    names = getattr(config, "__dict__", None)
    if names is None:
        raise ConfigError(f"config must be a mapping or an object with attributes, got {type(config).__name__}")
    return {k: v for k, v in dict(names).items() if not k.startswith("_")}


def _check_cross_keys(values: Mapping[str, Any]) -> None:
    """The checks that involve more than one key (or a key and a scheme's domain)."""
    if values["mask_ratio_weight_min"] > values["mask_ratio_weight_max"]:
        raise ConfigError(
            "mask_ratio_weight_min must be <= mask_ratio_weight_max, got "
            f"min={values['mask_ratio_weight_min']!r} > max={values['mask_ratio_weight_max']!r}"
        )
    lo, hi = values["snr_clamp_min"], values["snr_clamp_max"]
    if lo is not None and hi is not None and lo > hi:
        raise ConfigError(f"snr_clamp_min must be <= snr_clamp_max, got min={lo!r} > max={hi!r}")
    if values["entropy_modifier_enabled"] and not values["entropy_modifier_use_for_weighting"]:
        raise ConfigError(USE_FOR_WEIGHTING_MESSAGE)
    scheme = values["loss_weighting"]
    if values["loss_weighting_differentiable_weights"] and scheme != "sangoi":
        raise ConfigError(
            "loss_weighting_differentiable_weights=True applies to loss_weighting='sangoi' only (the other "
            f"schemes depend only on the SNR), got loss_weighting={scheme!r}"
        )
    try:
        check_convention(scheme, values["prediction_type"], values["weighting_convention"], p2_k=values["p2_k"])
    except LossInputError as exc:
        raise ConfigError(
            f"weighting_convention={values['weighting_convention']!r} does not define loss_weighting={scheme!r} "
            f"with prediction_type={values['prediction_type']!r}: {exc}"
        ) from None


def _validate(raw: Mapping[str, Any], prefixes: tuple[str, ...]) -> dict[str, Any]:
    """Every modifier key of ``raw`` coerced and range-checked, defaults filled in, cross-key checks done."""
    values = {k: s.default for k, s in MODIFIER_CONFIG_KEYS.items()}
    for key, value in raw.items():
        if key in MODIFIER_CONFIG_KEYS:
            values[key] = coerce_value(key, value)
        elif any(key.startswith(p) for p in prefixes):
            continue
        elif is_modifier_shaped(key):
            raise ConfigError(unknown_key_message(key, MODIFIER_CONFIG_KEYS))
    _check_cross_keys(values)
    return values


class _Settings:
    """Shared behaviour of the settings dataclasses: mapping-style reads and the flat keys they came from."""

    OWNER: str = ""
    PREFIX: str = ""

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]):
        """The settings from validated flat values (``parse_modifier_config`` builds them this way)."""
        return cls(**{k[len(cls.PREFIX):]: _frozen(values[k]) for k in section(cls.OWNER)})

    @classmethod
    def from_short(cls, config: Mapping[str, Any] | None):
        """Seed 000's dict constructor: short keys (the flat key minus ``PREFIX``), validated like the flat keys;
        an unknown short key raises with the closest flat key. ``name`` is not a setting and is ignored here."""
        flat = {cls.PREFIX + k: v for k, v in dict(config or {}).items() if k != "name"}
        keys = section(cls.OWNER)
        for key in flat:
            if key not in keys:
                raise ConfigError(unknown_key_message(key, keys))
        return cls.from_flat(_validate(flat, ()))

    def short(self) -> dict[str, Any]:
        """``{short key: value}``: the dict the seed-000 constructor takes."""
        return {f.name: _thawed(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def flat(self) -> dict[str, Any]:
        """``{flat key: value}`` (lists as lists, as the config files spell them)."""
        return {self.PREFIX + f.name: _thawed(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _frozen(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _thawed(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@dataclasses.dataclass(frozen=True)
class EntropySettings(_Settings):
    """``EntropyModifier``: the ``entropy_modifier_*`` keys (see ``MODIFIER_CONFIG_KEYS`` for meaning and range)."""

    OWNER = _ENTROPY
    PREFIX = "entropy_modifier_"
    enabled: bool
    weight: float
    threshold: float
    eps: float
    use_for_weighting: bool
    debug: bool
    per_sample: bool
    differentiable_weights: bool


@dataclasses.dataclass(frozen=True)
class SmoothingSettings(_Settings):
    """``TargetSmoothingModifier``: the ``target_smoothing_*`` keys."""

    OWNER = _SMOOTHING
    PREFIX = "target_smoothing_"
    enabled: bool
    factor: float
    special_tokens: tuple[int, ...]
    exclude_padding: bool
    padding_token: int
    convention: str


@dataclasses.dataclass(frozen=True)
class MaskRatioSettings(_Settings):
    """``MaskRatioWeightModifier``: the ``mask_ratio_weight_*`` keys."""

    OWNER = _MASK_RATIO
    PREFIX = "mask_ratio_weight_"
    enabled: bool
    power: float
    min: float
    max: float
    eps: float


@dataclasses.dataclass(frozen=True)
class SNRSettings(_Settings):
    """``SNRWeightModifier``: the diffusion weighting keys, which share no prefix (field names are the flat keys);
    on unless ``loss_weighting == "constant"``."""

    OWNER = _SNR
    PREFIX = ""
    loss_weighting: str
    min_snr_gamma: float
    p2_gamma: float
    p2_k: float
    snr_clamp_max: float | None
    snr_clamp_min: float | None
    prediction_type: str
    weighting_convention: str
    edm_sigma_data: float
    loss_weighting_differentiable_weights: bool

    @property
    def enabled(self) -> bool:
        return self.loss_weighting != "constant"


@dataclasses.dataclass(frozen=True)
class ModifierSettings:
    """A whole modifier config, parsed once: the master switch, one settings object per built-in, and the raw
    short-key values of each ``register_modifier`` prefix (``(prefix, {short key: value})`` pairs)."""

    enabled: bool
    entropy: EntropySettings
    smoothing: SmoothingSettings
    mask_ratio: MaskRatioSettings
    snr: SNRSettings
    registered: tuple[tuple[str, Mapping[str, Any]], ...] = ()

    @property
    def builtins(self) -> tuple[_Settings, ...]:
        """The built-ins' settings in canonical order (Entropy, TargetSmoothing, MaskRatioWeight, SNRWeight)."""
        return self.entropy, self.smoothing, self.mask_ratio, self.snr

    def flat(self) -> dict[str, Any]:
        """Every key of ``MODIFIER_CONFIG_KEYS`` with its value, in table order."""
        out: dict[str, Any] = {MASTER_SWITCH: self.enabled}
        for b in self.builtins:
            out.update(b.flat())
        return {k: out[k] for k in MODIFIER_CONFIG_KEYS}


def parse_modifier_config(
    config: Mapping[str, Any] | Any,
    *,
    prefixes: Iterable[str] = (),
    warn: bool = True,
) -> ModifierSettings:
    """Validate the modifier keys of a merged config once and return its ``ModifierSettings``.

    Args:
        config: a dict or attribute object. Keys that are not modifier-shaped (trainer keys, the seed's
            ``custom_param``) are ignored here; modifier-shaped keys must be in ``MODIFIER_CONFIG_KEYS`` or
            start with one of ``prefixes`` (the ``register_modifier`` prefixes, whose values are kept raw, parsed
            as Python literals when they are strings).
        prefixes: registered user-modifier prefixes.
        warn: warn once for settings that do nothing or do little (a sub-switch on while
            ``loss_modifiers_enabled`` is False; ``p2_gamma`` above 2). The edge that parses a config warns;
            every later consumer takes the parsed settings and stays silent.

    Raises:
        ConfigError: unknown modifier-shaped key (with the closest valid key), bad type or range, min > max,
            ``entropy_modifier_use_for_weighting=False`` with the entropy modifier on, an SNR scheme the chosen
            convention does not define.
    """
    raw = config_to_dict(config)
    prefixes = tuple(prefixes)
    values = _validate(raw, prefixes)
    if warn:
        _warn(values)
    registered = tuple(
        (p, types.MappingProxyType({k[len(p):]: literal_value(v) for k, v in raw.items() if k.startswith(p)}))
        for p in prefixes
    )
    return ModifierSettings(
        enabled=values[MASTER_SWITCH],
        entropy=EntropySettings.from_flat(values),
        smoothing=SmoothingSettings.from_flat(values),
        mask_ratio=MaskRatioSettings.from_flat(values),
        snr=SNRSettings.from_flat(values),
        registered=tuple((p, sub) for p, sub in registered if sub),
    )


def _warn(values: Mapping[str, Any]) -> None:
    # stacklevel 3: the warning names the caller of parse_modifier_config (the config edge)
    if values["loss_weighting"] == "p2" and values["p2_gamma"] > 2:
        warnings.warn(f"p2_gamma={values['p2_gamma']} is above 2; P2 weighting then nearly ignores low-SNR steps",
                      UserWarning, stacklevel=3)
    if not values[MASTER_SWITCH]:
        on = [sw for sw in SUB_SWITCHES.values() if switch_on(sw, values[sw])]
        if on:
            shown = ", ".join(f"{sw}={values[sw]!r}" for sw in on)
            warnings.warn(f"{shown} has no effect because loss_modifiers_enabled=False", UserWarning,
                          stacklevel=3)


def validate_modifier_config(
    config: Mapping[str, Any] | Any,
    *,
    prefixes: Iterable[str] = (),
    warn_master_switch: bool = True,
) -> dict[str, Any]:
    """``parse_modifier_config(...).flat()``: every modifier key with its coerced value (defaults filled in).

    For callers that want the flat ``{key: value}`` view (``losskit modifiers``, config dumps); the checks and
    warnings are those of ``parse_modifier_config``.
    """
    return parse_modifier_config(config, prefixes=prefixes, warn=warn_master_switch).flat()


def switch_on(key: str, value: Any) -> bool:
    """Whether a sub-switch value turns its modifier on (``loss_weighting`` is on unless ``"constant"``)."""
    return value != "constant" if key == "loss_weighting" else bool(value)
