"""losskit.config: python/YAML config files and --key=value overrides (spec/modifiers.md §3.10)."""

from __future__ import annotations

import pathlib

import pytest

from losskit.config import load_config, load_config_file, merge_config, parse_overrides
from losskit.contract import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_python_file_names_modules_callables_and_private_names(tmp_path):
    f = tmp_path / "cfg.py"
    f.write_text(
        "import math\n"
        "_hidden = 3\n"
        "lr = 1e-3\n"
        "tokens = [0, 1, 2]\n"
        "def helper():\n    return 1\n"
        "class Thing:\n    pass\n"
        "derived = math.sqrt(4.0)\n"
    )
    assert load_config_file(f) == {"lr": 1e-3, "tokens": [0, 1, 2], "derived": 2.0}


def test_yaml_flat_mapping(tmp_path):
    f = tmp_path / "cfg.yaml"
    f.write_text("loss_modifiers_enabled: true\ntarget_smoothing_special_tokens: [0, 1, 2]\nfactor: 0.1\n")
    assert load_config_file(f) == {
        "loss_modifiers_enabled": True,
        "target_smoothing_special_tokens": [0, 1, 2],
        "factor": 0.1,
    }
    empty = tmp_path / "empty.yml"
    empty.write_text("")
    assert load_config_file(empty) == {}


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("nested.yaml", "a:\n  b: 1\n", "nested mapping"),
        ("list.yaml", "- 1\n- 2\n", "flat mapping"),
        ("broken.yaml", "a: [1, 2\n", "not valid YAML"),
        ("broken.py", "x = (\n", "not valid Python"),
        ("raises.py", "x = 1 / 0\n", "ZeroDivisionError"),
        ("cfg.toml", "x = 1\n", "must end in .py, .yaml or .yml"),
    ],
)
def test_malformed_files(tmp_path, name, text, needle):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(ConfigError, match=needle) as info:
        load_config_file(f)
    assert name in str(info.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="not found") as info:
        load_config_file("/nonexistent/cfg.py")
    assert "/nonexistent/cfg.py" in str(info.value)


def test_parse_overrides_files_and_keys():
    files, overrides = parse_overrides(
        ["config/a.py", "--x=1", "--target_smoothing_special_tokens=0,1,2", "--empty=", "--x=2", "b.yaml"]
    )
    assert files == ["config/a.py", "b.yaml"]
    assert overrides == {"x": "2", "target_smoothing_special_tokens": "0,1,2", "empty": ""}


@pytest.mark.parametrize("arg", ["--flag", "-x=1", "--1bad=3", "--=3"])
def test_parse_overrides_rejects(arg):
    with pytest.raises(ConfigError, match="--key=value|not a valid config key") as info:
        parse_overrides([arg])
    assert arg in str(info.value)


def test_merge_file_then_cli(tmp_path):
    a = tmp_path / "a.py"
    a.write_text("x = 1\ny = 2\n")
    b = tmp_path / "b.yaml"
    b.write_text("y: 3\nz: 4\n")
    merged = load_config([str(a), str(b), "--z=5"], base={"w": 0, "x": -1})
    assert merged == {"w": 0, "x": 1, "y": 3, "z": "5"}
    assert merge_config([], {"k": "v"}) == {"k": "v"}


def test_seed_config_file_ships_verbatim():
    values = load_config_file(ROOT / "config" / "loss_modifiers.py")
    assert values == {
        "loss_modifiers_enabled": True,
        "entropy_modifier_enabled": True,
        "entropy_modifier_weight": 1.2,
        "entropy_modifier_use_for_weighting": True,
        "entropy_modifier_threshold": 0.1,
        "target_smoothing_enabled": True,
        "target_smoothing_factor": 0.1,
        "target_smoothing_special_tokens": [0, 1, 2],
        "mask_ratio_weight_enabled": False,
    }
