"""``create_loss_modifier_pipeline`` and ``register_modifier`` (spec/modifiers.md §3.1, §3.10, acceptance 20): extra
modifiers after the built-ins, registered prefixes."""

from __future__ import annotations

import pytest

from losskit.contract import ConfigError
from losskit.modifiers import (
    BaseLossModifier,
    TargetSmoothingModifier,
    create_loss_modifier_pipeline,
    register_modifier,
    unregister_modifier,
)

from .conftest import MR, CustomModifier, mask_ratio_example


def test_seed_custom_modifier_after_mask_ratio(capsys):
    logits, targets = mask_ratio_example()
    custom = CustomModifier({"enabled": True, "custom_param": 2.0})
    pipe = create_loss_modifier_pipeline({"loss_modifiers_enabled": True, "mask_ratio_weight_enabled": True,
                                          "mask_ratio_weight_eps": 0.0, "custom_param": 2.0},
                                         extra_modifiers=[custom])
    assert capsys.readouterr().out == "Enabled loss modifiers: MaskRatioWeightModifier, CustomModifier\n"
    loss = pipe.modify_loss(logits, targets, None)
    assert loss.item() == pytest.approx(5.0, rel=1e-12)
    metrics = pipe.get_all_metrics()
    assert metrics["loss_modifiers/CustomModifier.custom_metric"] == pytest.approx(5.0, rel=1e-12)
    assert "loss_modifiers/MaskRatioWeightModifier.mean_weight" in metrics


def test_register_modifier_builds_from_prefixed_keys():
    class Scale(BaseLossModifier):
        def __init__(self, config):
            super().__init__(config)
            self.factor = config.get("factor", 1.0)

        def modify_loss(self, logits, targets, loss, **kwargs):
            return loss * self.factor

        def get_metrics(self):
            return {}

    register_modifier(Scale, "scale_modifier_")
    try:
        pipe = create_loss_modifier_pipeline({"loss_modifiers_enabled": True, "scale_modifier_enabled": "True",
                                              "scale_modifier_factor": "3.0", **MR}, verbose=False)
        assert [m.name for m in pipe.enabled_modifiers] == ["MaskRatioWeightModifier", "Scale"]
        logits, targets = mask_ratio_example()
        assert pipe.modify_loss(logits, targets, None).item() == pytest.approx(3 * 2.49999996, abs=1e-6)
        with pytest.raises(ConfigError, match="overlaps"):
            register_modifier(Scale, "entropy_modifier_")
    finally:
        unregister_modifier("scale_modifier_")
    with pytest.raises(ConfigError, match="unknown config key 'scale_modifier_factor'"):
        create_loss_modifier_pipeline({"scale_modifier_factor": 3.0}, verbose=False)


def test_foreign_keys_are_ignored_by_the_factory():
    pipe = create_loss_modifier_pipeline(
        {"learning_rate": 3e-4, "custom_param": 2.0, "dataset": "x", "loss_modifiers_enabled": True,
         "target_smoothing_enabled": True}, verbose=False)
    assert [type(m) for m in pipe.enabled_modifiers] == [TargetSmoothingModifier]


def test_master_on_but_nothing_enabled_warns(capsys):
    with pytest.warns(UserWarning, match="no loss modifier is enabled"):
        pipe = create_loss_modifier_pipeline({"loss_modifiers_enabled": True})
    assert pipe.is_empty() and capsys.readouterr().out == ""


def test_factory_takes_parsed_settings_without_warning_again(recwarn):
    from losskit.modifiers import create_loss_modifier_pipeline
    from losskit.modifiers.config_keys import parse_modifier_config

    with pytest.warns(UserWarning, match="has no effect because loss_modifiers_enabled=False"):
        s = parse_modifier_config({"entropy_modifier_enabled": True})
    recwarn.clear()
    pipe = create_loss_modifier_pipeline(s, verbose=False)
    assert pipe.is_empty() and not [w for w in recwarn if "no effect" in str(w.message)]
    with pytest.warns(UserWarning, match="p2_gamma=3.0 is above 2"):
        s = parse_modifier_config({"loss_modifiers_enabled": True, "loss_weighting": "p2", "p2_gamma": 3})
    recwarn.clear()
    pipe = create_loss_modifier_pipeline(s, verbose=False)
    assert len(pipe) == 1 and not [w for w in recwarn if "p2_gamma" in str(w.message)]
