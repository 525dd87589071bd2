"""Config keys of the modifier system: coercion, validation, messages, the seed's examples (spec/modifiers.md §3.10,
acceptance 16)."""

from __future__ import annotations

import pathlib
import shlex
import subprocess
import sys
import types
import warnings

import pytest

from losskit.config import load_config, load_config_file, parse_overrides
from losskit.contract import ConfigError
from losskit.modifiers import (
    MODIFIER_CONFIG_KEYS,
    EntropyModifier,
    MaskRatioWeightModifier,
    TargetSmoothingModifier,
    coerce_value,
    create_loss_modifier_pipeline,
    validate_modifier_config,
)
from losskit.modifiers.config_keys import is_modifier_shaped, parse_modifier_config

ROOT = pathlib.Path(__file__).resolve().parents[2]

SEED_KEYS = {  # every key seed 000 documents, with its documented default
    "loss_modifiers_enabled": False,
    "entropy_modifier_enabled": False,
    "entropy_modifier_weight": 1.0,
    "entropy_modifier_threshold": 0.0,
    "entropy_modifier_eps": 1e-8,
    "entropy_modifier_use_for_weighting": True,
    "entropy_modifier_debug": False,
    "target_smoothing_enabled": False,
    "target_smoothing_factor": 0.1,
    "target_smoothing_special_tokens": [],
    "target_smoothing_exclude_padding": True,
    "target_smoothing_padding_token": -100,
    "mask_ratio_weight_enabled": False,
    "mask_ratio_weight_power": 0.5,
    "mask_ratio_weight_min": 0.1,
    "mask_ratio_weight_max": 10.0,
    "mask_ratio_weight_eps": 1e-8,
}


def test_table_holds_the_seed_keys_and_three_additions():
    for key, default in SEED_KEYS.items():
        assert MODIFIER_CONFIG_KEYS[key].default == default, key
    added = {"entropy_modifier_per_sample", "entropy_modifier_differentiable_weights", "target_smoothing_convention"}
    assert added <= set(MODIFIER_CONFIG_KEYS)
    lm_keys = {k for k, s in MODIFIER_CONFIG_KEYS.items() if s.owner != "SNRWeightModifier"}
    assert lm_keys == set(SEED_KEYS) | added
    for key, spec in MODIFIER_CONFIG_KEYS.items():
        assert coerce_value(key, spec.default) == spec.default  # every default passes its own check


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0,1,2", [0, 1, 2]), ("65", [65]), ("", []), ("[0, 1, 2]", [0, 1, 2]), ("(3, 4)", [3, 4]), ("[]", []),
     ([0, 1, 2], [0, 1, 2]), ((5,), [5]), (7, [7]), ("1,1,2", [1, 2]), ("0, 1,", [0, 1])],
)
def test_special_tokens_coercion(value, expected):
    assert coerce_value("target_smoothing_special_tokens", value) == expected
    _, over = parse_overrides([f"--target_smoothing_special_tokens={value}"] if isinstance(value, str) else [])
    if over:
        assert validate_modifier_config(over)["target_smoothing_special_tokens"] == expected


@pytest.mark.parametrize("value", ["0,a", "a", "[0, 1.5]", [0, "x"], [True], 1.5, "-1"])
def test_special_tokens_bad_values_name_the_key(value):
    with pytest.raises(ConfigError, match="target_smoothing_special_tokens") as info:
        coerce_value("target_smoothing_special_tokens", value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("loss_modifiers_enabled", "True", True), ("loss_modifiers_enabled", "false", False),
        ("loss_modifiers_enabled", "1", True), ("loss_modifiers_enabled", "0", False),
        ("loss_modifiers_enabled", 1, True), ("loss_modifiers_enabled", False, False),
        ("entropy_modifier_weight", 2, 2.0), ("entropy_modifier_weight", "1.5", 1.5),
        ("entropy_modifier_weight", "3", 3.0), ("target_smoothing_padding_token", "-100", -100),
        ("target_smoothing_padding_token", 0, 0), ("target_smoothing_convention", "fairseq", "fairseq"),
        ("snr_clamp_max", "None", None), ("snr_clamp_max", "5", 5.0),
        # the spellings the trainer's config files use too: one coercer for the library, files and the command line
        ("target_smoothing_padding_token", 7.0, 7), ("target_smoothing_padding_token", " 12 ", 12),
        ("snr_clamp_max", "none", None), ("snr_clamp_max", "null", None), ("snr_clamp_max", "", None),
        ("snr_clamp_max", None, None), ("snr_clamp_min", 2, 2.0), ("loss_modifiers_enabled", " TRUE ", True),
        ("target_smoothing_special_tokens", [3.0, 4], [3, 4]),
    ],
)
def test_declared_type_coercion(key, value, expected):
    out = coerce_value(key, value)
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"entropy_modifier_wieght": 1.0},
         "unknown config key 'entropy_modifier_wieght'; did you mean 'entropy_modifier_weight'?"),
        ({"mask_ratio_weight_min_weight": 0.2}, "did you mean 'mask_ratio_weight_min'?"),
        ({"mask_ratio_weight_max_weight": 2.0}, "did you mean 'mask_ratio_weight_max'?"),
        ({"entropy_modifier_verbose": True}, "did you mean 'entropy_modifier_debug'?"),
        ({"mask_ratio_weight_sequence_level": True}, "removed; weighting is always sequence-level"),
        ({"loss_modifiers_enabled": True, "entropy_modifier_enabled": True,
          "entropy_modifier_use_for_weighting": False},
         ("entropy weighting is always dynamic; remove "
         "entropy_modifier_use_for_weighting or set entropy_modifier_enabled=False")),
        ({"target_smoothing_factor": 1.0}, "target_smoothing_factor must be in [0, 1), got 1.0"),
        ({"target_smoothing_factor": -0.1}, "target_smoothing_factor must be in [0, 1), got -0.1"),
        ({"mask_ratio_weight_min": 2.0, "mask_ratio_weight_max": 1.0},
         "mask_ratio_weight_min must be <= mask_ratio_weight_max, got min=2.0 > max=1.0"),
        ({"entropy_modifier_weight": "abc"}, "entropy_modifier_weight must be a float, got 'abc'"),
        ({"entropy_modifier_weight": 0}, "entropy_modifier_weight must be > 0, got 0"),
        ({"loss_modifiers_enabled": "yes"}, "loss_modifiers_enabled must be a bool"),
        ({"target_smoothing_convention": "hf"}, "target_smoothing_convention must be one of 'torch', 'fairseq'"),
        ({"mask_ratio_weight_power": -1}, "mask_ratio_weight_power must be >= 0, got -1"),
        ({"min_snr_gama": 5}, "did you mean 'min_snr_gamma'?"),
        ({"xyz_modifier_abc": 1}, "unknown config key 'xyz_modifier_abc'"),
    ],
)
def test_error_messages(config, needle):
    with pytest.raises(ConfigError) as info:
        create_loss_modifier_pipeline(config, verbose=False)
    assert needle in str(info.value)
    assert isinstance(info.value, ValueError)


def test_cli_bad_float_value():
    with pytest.raises(ConfigError, match="entropy_modifier_weight must be a float, got 'abc'"):
        create_loss_modifier_pipeline(load_config(["--entropy_modifier_weight=abc"]), verbose=False)


def test_use_for_weighting_false_is_fine_when_entropy_is_off():
    assert validate_modifier_config({"entropy_modifier_use_for_weighting": False})[
        "entropy_modifier_use_for_weighting"] is False


def test_modifier_shaped_patterns():
    for key in ["entropy_modifier_x", "loss_modifiers_y", "target_smoothing_z", "mask_ratio_q", "min_snr_x",
                "snr_clamp_x", "p2_x", "edm_x", "loss_weighting", "loss_weighting_x", "weighting_x"]:
        assert is_modifier_shaped(key), key
    for key in ["learning_rate", "custom_param", "label_smoothing", "zero_terminal_snr", "dataset", "out_dir"]:
        assert not is_modifier_shaped(key), key


def test_attribute_objects_and_strings():
    ns = types.SimpleNamespace(loss_modifiers_enabled="True", mask_ratio_weight_enabled="1",
                               mask_ratio_weight_max="5", _private="ignored", learning_rate=1.0)
    pipe = create_loss_modifier_pipeline(ns, verbose=False)
    (mod,) = pipe.enabled_modifiers
    assert isinstance(mod, MaskRatioWeightModifier) and mod.max == 5.0 and mod.min == 0.1


def test_master_switch_warning(recwarn):
    pipe = create_loss_modifier_pipeline({"entropy_modifier_enabled": True, "target_smoothing_enabled": True},
                                         verbose=False)
    assert pipe.is_empty()
    msgs = [str(w.message) for w in recwarn.list if "no effect" in str(w.message)]
    assert len(msgs) == 1
    assert "has no effect because loss_modifiers_enabled=False" in msgs[0]
    assert "entropy_modifier_enabled" in msgs[0] and "target_smoothing_enabled" in msgs[0]


def test_builtin_short_keys_are_validated():
    mod = EntropyModifier({"enabled": True, "weight": 1.2, "threshold": 0.1})
    assert (mod.enabled, mod.weight, mod.threshold, mod.eps) == (True, 1.2, 0.1, 1e-8)
    assert TargetSmoothingModifier({"enabled": "true", "special_tokens": "0,1"}).special_tokens == [0, 1]
    with pytest.raises(ConfigError, match="did you mean 'entropy_modifier_weight'"):
        EntropyModifier({"wieght": 2.0})
    with pytest.raises(ConfigError, match="mask_ratio_weight_min must be <= mask_ratio_weight_max"):
        MaskRatioWeightModifier({"min": 3.0, "max": 2.0})


# ---- the seed's examples ---------------------------------------------------------------------------------------

E, S, M = "EntropyModifier", "TargetSmoothingModifier", "MaskRatioWeightModifier"

SEED_COMMANDS = [  # verbatim from 000_8dbc047495973b7b.txt (continuations joined)
    ("python train.py", [], {}),
    ("python train.py --loss_modifiers_enabled=True --target_smoothing_enabled=True --target_smoothing_factor=0.1",
     [S], {S: {"factor": 0.1}}),
    ("python train.py --loss_modifiers_enabled=True --entropy_modifier_enabled=True", [E], {E: {"weight": 1.0}}),
    (("python train.py --loss_modifiers_enabled=True \\\n  --target_smoothing_enabled=True "
     "--target_smoothing_factor=0.1 \\\n  --entropy_modifier_enabled=True --entropy_modifier_weight=1.2 \\\n"
     "  --mask_ratio_weight_enabled=True"), [E, S, M], {E: {"weight": 1.2}, S: {"factor": 0.1}}),
    (("python train.py \\\n  --loss_modifiers_enabled=True \\\n  --entropy_modifier_enabled=True \\\n"
     "  --entropy_modifier_weight=1.5 \\\n  --target_smoothing_enabled=True \\\n  --target_smoothing_factor=0.15"),
     [E, S], {E: {"weight": 1.5}, S: {"factor": 0.15}}),
    (("python train.py \\\n  --dataset=custom_text \\\n  --loss_modifiers_enabled=True \\\n"
     "  --target_smoothing_enabled=True \\\n  --target_smoothing_factor=0.1"), [S], {S: {"factor": 0.1}}),
    (("python train.py \\\n  --loss_modifiers_enabled=True \\\n  --entropy_modifier_enabled=True \\\n"
     "  --entropy_modifier_use_for_weighting=True \\\n  --entropy_modifier_threshold=0.2"),
     [E], {E: {"threshold": 0.2}}),
    (("python train.py \\\n  --loss_modifiers_enabled=True \\\n  --mask_ratio_weight_enabled=True \\\n"
     "  --mask_ratio_weight_power=0.5 \\\n  --mask_ratio_weight_max=5.0"), [M], {M: {"power": 0.5, "max": 5.0}}),
]


def _check(pipe, names, attrs):
    assert [m.name for m in pipe.enabled_modifiers] == names
    for m in pipe.enabled_modifiers:
        for attr, value in attrs.get(m.name, {}).items():
            assert getattr(m, attr) == value, (m.name, attr)


@pytest.mark.parametrize(("command", "names", "attrs"), SEED_COMMANDS)
def test_seed_command_lines(command, names, attrs):
    argv = shlex.split(command.replace("\\\n", " "))[2:]
    pipe = create_loss_modifier_pipeline(load_config(argv), verbose=False)
    _check(pipe, names, attrs)


SEED_CONFIG_BLOCKS = [  # the seed's python config examples, verbatim
    (("loss_modifiers_enabled = True\nentropy_modifier_enabled = True\nentropy_modifier_weight = 1.0\n"
     "entropy_modifier_threshold = 0.1\nentropy_modifier_eps = 1e-8\n"),
     [E], {E: {"weight": 1.0, "threshold": 0.1, "eps": 1e-8}}),
    (("loss_modifiers_enabled = True\ntarget_smoothing_enabled = True\n"
     "target_smoothing_factor = 0.1                    # Smoothing strength (0.0 = no smoothing)\n"
     "target_smoothing_special_tokens = []             # Token IDs to exclude from smoothing\n"
     "target_smoothing_exclude_padding = True          # Exclude padding from loss\n"
     "target_smoothing_padding_token = -100            # Padding token ID\n"),
     [S], {S: {"factor": 0.1, "special_tokens": [], "exclude_padding": True, "padding_token": -100}}),
    (("loss_modifiers_enabled = True\ntarget_smoothing_enabled = True\n"
     "target_smoothing_factor = 0.1  # Conservative smoothing\n"), [S], {S: {"factor": 0.1}}),
    ("# In your config\nentropy_modifier_debug = True  # Custom parameter for debugging\n", [], {}),
]


@pytest.mark.parametrize(("text", "names", "attrs"), SEED_CONFIG_BLOCKS)
def test_seed_config_blocks(tmp_path, text, names, attrs):
    f = tmp_path / "cfg.py"
    f.write_text(text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these examples may warn
        pipe = create_loss_modifier_pipeline(load_config_file(f), verbose=False)
    _check(pipe, names, attrs)


def test_seed_config_file_builds_entropy_and_smoothing(capsys):
    pipe = create_loss_modifier_pipeline(load_config([str(ROOT / "config" / "loss_modifiers.py")]))
    assert capsys.readouterr().out == "Enabled loss modifiers: EntropyModifier, TargetSmoothingModifier\n"
    _check(pipe, [E, S], {E: {"weight": 1.2, "threshold": 0.1}, S: {"factor": 0.1, "special_tokens": [0, 1, 2]}})


def test_config_file_then_cli_override():
    argv = [str(ROOT / "config" / "loss_modifiers.py"), "--target_smoothing_special_tokens=0,1,2,3",
            "--mask_ratio_weight_enabled=True"]
    pipe = create_loss_modifier_pipeline(load_config(argv), verbose=False)
    _check(pipe, [E, S, M], {S: {"special_tokens": [0, 1, 2, 3]}})


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("*")), ids=lambda p: p.name)
def test_every_config_file_validates(path):
    if path.suffix not in (".py", ".yaml", ".yml"):
        pytest.skip("not a config file")
    values = load_config_file(path)
    validated = validate_modifier_config(values, warn_master_switch=False)
    for key in set(values) & set(MODIFIER_CONFIG_KEYS):  # the file's settings survive validation
        assert validated[key] == coerce_value(key, values[key]), key


def test_losskit_modifiers_lists_every_key():
    out = subprocess.run([sys.executable, "-m", "losskit", "modifiers"], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    for key, spec in MODIFIER_CONFIG_KEYS.items():
        assert key in rows, key
        assert spec.type in rows[key] and repr(spec.default) in rows[key] and spec.help in rows[key]


# ---- settings parsed once, at the edge ----------------------------------------------------------------------------

def test_parse_modifier_config_builds_one_frozen_settings_object_per_builtin():
    import dataclasses

    from losskit.modifiers.config_keys import (
        EntropySettings,
        MaskRatioSettings,
        ModifierSettings,
        SmoothingSettings,
        SNRSettings,
        parse_modifier_config,
    )

    s = parse_modifier_config({
        "loss_modifiers_enabled": "true", "entropy_modifier_enabled": "1", "entropy_modifier_weight": "2",
        "target_smoothing_special_tokens": "0,1,1", "mask_ratio_weight_min": 0.2, "loss_weighting": "min_snr",
        "min_snr_gamma": "3", "some_trainer_key": 7,
    })
    assert isinstance(s, ModifierSettings) and s.enabled
    assert isinstance(s.entropy, EntropySettings) and s.entropy.enabled and s.entropy.weight == 2.0
    assert isinstance(s.smoothing, SmoothingSettings) and s.smoothing.special_tokens == (0, 1)
    assert isinstance(s.mask_ratio, MaskRatioSettings) and s.mask_ratio.min == 0.2
    assert isinstance(s.snr, SNRSettings) and s.snr.enabled and s.snr.min_snr_gamma == 3.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.entropy.weight = 3.0
    flat = s.flat()
    assert list(flat) == list(MODIFIER_CONFIG_KEYS) and flat["target_smoothing_special_tokens"] == [0, 1]
    assert validate_modifier_config(flat) == flat  # the flat view parses back to itself
    # every field of every settings class is a key of the table, with the table's default
    defaults = parse_modifier_config({})
    for b in defaults.builtins:
        for f in dataclasses.fields(b):
            spec = MODIFIER_CONFIG_KEYS[b.PREFIX + f.name]
            assert spec.owner == b.OWNER
            assert getattr(b, f.name) == (tuple(spec.default) if isinstance(spec.default, list) else spec.default)


def test_modifiers_take_settings_or_the_seed_dict_and_agree():
    from losskit.modifiers import (
        EntropyModifier,
        MaskRatioWeightModifier,
        SNRWeightModifier,
        TargetSmoothingModifier,
    )
    from losskit.modifiers.config_keys import parse_modifier_config

    s = parse_modifier_config({
        "loss_modifiers_enabled": True, "entropy_modifier_enabled": True, "entropy_modifier_threshold": 0.3,
        "target_smoothing_enabled": True, "target_smoothing_factor": 0.2, "mask_ratio_weight_enabled": True,
        "mask_ratio_weight_power": 1.0, "loss_weighting": "p2", "p2_k": 2.0,
    })
    pairs = [
        (EntropyModifier(s.entropy), EntropyModifier({"enabled": True, "threshold": "0.3"})),
        (TargetSmoothingModifier(s.smoothing), TargetSmoothingModifier({"enabled": True, "factor": 0.2})),
        (MaskRatioWeightModifier(s.mask_ratio), MaskRatioWeightModifier({"enabled": True, "power": 1})),
        (SNRWeightModifier(s.snr), SNRWeightModifier({"loss_weighting": "p2", "p2_k": 2.0})),
    ]
    for from_settings, from_dict in pairs:
        assert from_settings.settings == from_dict.settings
        assert from_settings.is_enabled() and from_dict.is_enabled()
    with pytest.raises(ConfigError, match="entropy_modifier_threshold"):
        EntropyModifier({"enabled": True, "treshold": 0.3})
    with pytest.raises(ConfigError, match="did you mean 'min_snr_gamma'"):
        SNRWeightModifier({"loss_weighting": "min_snr", "min_snr_gama": 2})


def test_snr_domain_checks_happen_at_parse_time():
    from losskit.modifiers.config_keys import parse_modifier_config

    with pytest.raises(ConfigError, match="applies to loss_weighting='sangoi' only"):
        parse_modifier_config({"loss_weighting": "min_snr", "loss_weighting_differentiable_weights": True})
    with pytest.raises(ConfigError, match="snr_clamp_min must be <= snr_clamp_max"):
        parse_modifier_config({"snr_clamp_min": 2.0, "snr_clamp_max": 1.0})


@pytest.mark.parametrize(("key", "value"), [("target_smoothing_padding_token", 7.5),
                                            ("target_smoothing_padding_token", "7.0"),
                                            ("snr_clamp_max", "nan"), ("entropy_modifier_weight", "null"),
                                            ("loss_modifiers_enabled", 2)])
def test_spellings_that_stay_errors(key, value):
    with pytest.raises(ConfigError, match=key):
        coerce_value(key, value)


def test_the_dict_api_and_the_command_line_parse_a_value_alike():
    from losskit.config import coerce

    for key, spellings in {"target_smoothing_padding_token": (5, 5.0, "5"), "snr_clamp_max": (None, "null", "None"),
                           "entropy_modifier_weight": (2, 2.0, "2", "2.0")}.items():
        spec = MODIFIER_CONFIG_KEYS[key]
        typed = {repr(coerce(key, v, spec.type)) for v in spellings}
        parsed = {repr(parse_modifier_config({key: v}, warn=False).flat()[key]) for v in spellings}
        assert len(typed) == 1 and typed == parsed, (key, typed, parsed)
