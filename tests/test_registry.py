"""The loss registry and `losskit losses`."""

import pytest

from losskit import registry
from losskit.cli import main
from losskit.contract import ConfigError


def test_cross_entropy_family_is_registered():
    for name in ("cross_entropy", "label_smoothed_cross_entropy", "entropy", "wrong_answer_entropy"):
        spec = registry.get(name)
        assert spec.name == name and spec.description and spec.required_inputs


def test_dpo_has_no_entry_so_users_can_register_it():
    assert "dpo" not in registry.REGISTRY


def test_lookup_ignores_case_and_separators():
    assert registry.get("Label-Smoothed-Cross-Entropy") is registry.REGISTRY["label_smoothed_cross_entropy"]
    assert registry.get("labelsmoothedcrossentropy").module is not None


def test_unknown_name_names_the_closest_and_lists_valid():
    with pytest.raises(ConfigError, match="did you mean 'cross_entropy'") as info:
        registry.get("cross_entrpy")
    assert "wrong_answer_entropy" in str(info.value)


def test_duplicate_registration_is_an_error():
    with pytest.raises(ConfigError, match="already registered"):
        registry.register(registry.REGISTRY["entropy"])


def test_losskit_losses_prints_the_table(capsys):
    assert main(["losses"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["name", "required", "inputs", "description"]
    for spec in registry.REGISTRY.values():
        assert spec.name in out and spec.description in out


def test_top_level_help_lists_subcommands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "losses" in out and "bench" in out


def test_unknown_subcommand_is_exit_2(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
