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


# ---- service built-ins (the training service serves every entry whose service_fn is set) ----


def test_service_builtins_are_the_tinker_five_plus_losskits_two():
    served = {n for n, s in registry.REGISTRY.items() if s.service_fn is not None}
    assert served == {"cross_entropy", "importance_sampling", "ppo", "cispo", "dro",
                      "label_smoothed_cross_entropy", "loss_modifiers"}
    from losskit.functional import policy

    assert registry.REGISTRY["cross_entropy"].service_fn is policy.token_cross_entropy
    assert "dpo" not in served


def test_serve_label_smoothed_cross_entropy_is_kernels_cross_entropy_mean():
    import torch

    from losskit import kernels

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    target = torch.randint(0, 11, (2, 5), generator=g)
    target[0, :2] = -100
    out = registry.serve_label_smoothed_cross_entropy(logits, target, label_smoothing=0.2, z_loss=1e-3,
                                                      smoothing_exclude=[3], smoothing_convention="fairseq")
    ref = kernels.cross_entropy(logits, target, label_smoothing=0.2, z_loss=1e-3, smoothing_exclude=[3],
                                smoothing_convention="fairseq")
    torch.testing.assert_close(out.loss, ref, rtol=0, atol=0)
    assert float(out.diagnostics["loss:mean"]) == float(ref)


def test_serve_loss_modifiers_is_the_pipeline_with_the_master_switch_implied():
    import torch

    from losskit.modifiers import create_loss_modifier_pipeline

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 9, generator=g)
    target = torch.randint(0, 9, (3, 4), generator=g)
    target[2, 1:] = -100
    config = {"target_smoothing_enabled": True, "target_smoothing_factor": 0.15, "entropy_modifier_enabled": True,
              "mask_ratio_weight_enabled": True}
    out = registry.serve_loss_modifiers(logits, target, **config)
    pipe = create_loss_modifier_pipeline({"loss_modifiers_enabled": True, **config}, verbose=False)
    ref = pipe.compute(logits, target)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    metrics = pipe.get_all_metrics()
    assert metrics and all(k.startswith("loss_modifiers/") for k in metrics)
    for key, value in metrics.items():
        assert float(out.diagnostics[key]) == float(value)
    with pytest.raises(ConfigError, match="did you mean 'target_smoothing_factor'"):
        registry.serve_loss_modifiers(logits, target, target_smoothing_factr=0.1)
    with pytest.raises(ConfigError, match="implied"):
        registry.serve_loss_modifiers(logits, target, loss_modifiers_enabled=False)
