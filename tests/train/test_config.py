"""The task configs (train/config.py): which task owns which key, frozen values, cross-key checks, the modifier
settings bound to the flat keys, the resolved dict that config.yaml holds."""

import dataclasses

import pytest
import yaml

from losskit.contract import ConfigError
from losskit.modifiers import MODIFIER_CONFIG_KEYS
from losskit.modifiers.config_keys import section
from losskit.train.config import (
    CommonTrainConfig,
    DiffusionTrainConfig,
    LMTrainConfig,
    NumThreadsConfig,
    StepScheduleConfig,
    TemporalTrainConfig,
    own_default,
    task_keys,
    train_config_to_dict,
)
from losskit.train.tasks import TASKS, build_train_config

NANOGPT_KEYS = ["out_dir", "eval_interval", "log_interval", "eval_iters", "eval_only", "always_save_checkpoint",
                "init_from", "wandb_log", "wandb_project", "wandb_run_name", "dataset", "gradient_accumulation_steps",
                "batch_size", "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "learning_rate",
                "max_iters", "weight_decay", "beta1", "beta2", "grad_clip", "decay_lr", "warmup_iters",
                "lr_decay_iters", "min_lr", "backend", "device", "dtype", "compile"]
COMMON = {"task", "out_dir", "seed", "device", "batch_size", "learning_rate", "wandb_log", "wandb_project",
          "wandb_run_name", "tensorboard_log"}
STEPS = {"max_iters", "eval_interval", "log_interval", "weight_decay", "beta1", "beta2", "grad_clip", "decay_lr",
         "warmup_iters", "lr_decay_iters", "min_lr"}
LM_ONLY = {"init_from", "eval_iters", "eval_only", "always_save_checkpoint", "dataset", "data",
           "gradient_accumulation_steps", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "dropout", "bias",
           "backend", "dtype", "compile", "loss_normalize", "on_nonfinite_logits"}
TEMPORAL_ONLY = {"epochs", "n_timesteps", "pattern", "dt", "loss_reaction_time", "tau", "noise_std", "channels",
                 "criterion", "energy_weight", "allow_no_supervision"}
DIFFUSION_ONLY = {"schedule", "num_timesteps", "zero_terminal_snr", "model_width", "model_depth", "diffusion_buckets",
                  "sample_steps"}


def _modifier_keys(*owners):
    return {"loss_modifiers_enabled"} | {k for o in owners for k in section(o)}


def test_each_task_owns_exactly_the_keys_its_runner_reads():
    assert {f.name for f in dataclasses.fields(CommonTrainConfig)} == COMMON
    assert {f.name for f in dataclasses.fields(StepScheduleConfig)} == STEPS
    assert {f.name for f in dataclasses.fields(NumThreadsConfig)} == {"num_threads"}
    lm = set(task_keys(LMTrainConfig))
    assert lm == COMMON | STEPS | LM_ONLY | _modifier_keys("EntropyModifier", "TargetSmoothingModifier",
                                                          "MaskRatioWeightModifier")
    assert set(NANOGPT_KEYS) <= lm  # nanoGPT's names, all on its task
    assert set(task_keys(TemporalTrainConfig)) == COMMON | {"num_threads"} | TEMPORAL_ONLY
    assert set(task_keys(DiffusionTrainConfig)) == (COMMON | STEPS | {"num_threads"} | DIFFUSION_ONLY
                                                    | _modifier_keys("SNRWeightModifier"))
    # no modifier key of the table is left out by every task, and none is taken by two tasks but the master switch
    owners = [{k for k, f in task_keys(t.config).items() if f.metadata.get("modifier")} for t in TASKS.values()]
    assert set().union(*owners) == set(MODIFIER_CONFIG_KEYS)
    assert owners[0] & owners[2] == {"loss_modifiers_enabled"} and owners[1] == set()


def test_configs_are_frozen_and_replace_rechecks():
    cfg = build_train_config({"n_layer": 2})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_layer = 3
    assert dataclasses.replace(cfg, out_dir="x").out_dir == "x"
    with pytest.raises(ConfigError, match="n_embd must be divisible by n_head"):
        dataclasses.replace(cfg, n_head=3)


@pytest.mark.parametrize("cls,kw,message", [
    (LMTrainConfig, {"min_lr": 1.0}, "min_lr must be <= learning_rate (0.003), got 1.0"),
    (LMTrainConfig, {"n_embd": 30}, "n_embd must be divisible by n_head into an even head size"),
    (LMTrainConfig, {"n_embd": 12, "n_head": 4}, "n_embd must be divisible by n_head into an even head size"),
    (LMTrainConfig, {"n_head": 4, "n_kv_head": 3}, "n_kv_head must divide n_head (4), got 3"),
    (DiffusionTrainConfig, {"min_lr": 1.0}, "min_lr must be <= learning_rate"),
    (DiffusionTrainConfig, {"prediction_type": "flow"}, "require each other"),
    (DiffusionTrainConfig, {"schedule": "flow"}, "require each other"),
    (DiffusionTrainConfig, {"schedule": "flow", "prediction_type": "flow", "zero_terminal_snr": True},
     "zero_terminal_snr applies to VP schedules only"),
    (DiffusionTrainConfig, {"zero_terminal_snr": True}, "x0 cannot be recovered from ε"),
    (LMTrainConfig, {"target_smoothing_factor": 1.5}, "target_smoothing_factor must be in [0, 1)"),
])
def test_cross_key_checks_run_when_a_config_is_made(cls, kw, message):
    with pytest.raises(ConfigError) as info:
        cls(**kw)
    assert message in str(info.value)


@pytest.mark.parametrize("cls,kw", [
    (LMTrainConfig, {"min_lr": 3e-3}), (LMTrainConfig, {"n_embd": 24, "n_head": 3}),
    (LMTrainConfig, {"n_head": 4, "n_kv_head": 2}), (DiffusionTrainConfig, {"schedule": "flow", "prediction_type": "flow"}),
    (DiffusionTrainConfig, {"zero_terminal_snr": True, "prediction_type": "v_prediction"}),
])
def test_the_limits_of_the_cross_key_checks_are_valid(cls, kw):
    cfg = cls(**kw)
    assert all(getattr(cfg, k) == v for k, v in kw.items())


def test_a_config_made_directly_parses_its_modifier_keys_silently(recwarn):
    cfg = LMTrainConfig(entropy_modifier_enabled=True, target_smoothing_special_tokens="3,1,3")
    assert cfg.modifiers.entropy.enabled and not cfg.modifiers.enabled  # master switch off: no warning here
    assert cfg.target_smoothing_special_tokens == [3, 1] and cfg.modifiers.smoothing.special_tokens == (3, 1)
    assert not [w for w in recwarn if "has no effect" in str(w.message)]
    assert DiffusionTrainConfig().modifiers.enabled and not DiffusionTrainConfig().modifiers.snr.enabled
    assert not hasattr(TemporalTrainConfig(), "modifiers")


def test_replacing_a_modifier_key_without_its_settings_is_refused():
    cfg = build_train_config({"loss_modifiers_enabled": "true"})
    with pytest.raises(TypeError, match=r"modifiers disagree with \['entropy_modifier_enabled'\]"):
        dataclasses.replace(cfg, entropy_modifier_enabled=True)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_the_resolved_dict_round_trips_through_config_yaml(task):
    """``config.yaml`` (the resolved dict, dumped as YAML) builds the same config again."""
    raw = {"task": task, "seed": 3, **({"loss_weighting": "min_snr", "snr_clamp_max": 4} if task == "diffusion" else {}),
           **({"target_smoothing_special_tokens": "0,1"} if task == "lm" else {}),
           **({"energy_weight": 0.5} if task == "temporal" else {})}
    cfg = build_train_config(raw)
    d = train_config_to_dict(cfg)
    assert list(d) == list(task_keys(type(cfg)))
    again = build_train_config(yaml.safe_load(yaml.safe_dump(d, sort_keys=False)))
    assert again == cfg
    assert getattr(again, "modifiers", None) == getattr(cfg, "modifiers", None)


def test_every_key_has_its_task_default_and_help():
    assert LMTrainConfig().task == "lm" and TemporalTrainConfig().task == "temporal"
    assert DiffusionTrainConfig().task == "diffusion"
    assert DiffusionTrainConfig().loss_modifiers_enabled is True and LMTrainConfig().loss_modifiers_enabled is False
    assert TemporalTrainConfig().num_threads == 1 and DiffusionTrainConfig().num_threads == 1
    assert (TemporalTrainConfig().seed, DiffusionTrainConfig().seed, LMTrainConfig().seed) == (0, 1337, 1337)


def test_a_task_default_keeps_the_groups_help_and_range_unless_it_says_otherwise():
    @dataclasses.dataclass(frozen=True)
    class Short(StepScheduleConfig, CommonTrainConfig):
        max_iters: int = own_default(StepScheduleConfig, "max_iters", 7)
        batch_size: int = own_default(CommonTrainConfig, "batch_size", 3, "rows per batch")

    fields = task_keys(Short)
    base = task_keys(StepScheduleConfig)["max_iters"].metadata
    assert Short().max_iters == 7 and Short().batch_size == 3
    assert fields["max_iters"].metadata["help"] == base["help"]
    assert fields["batch_size"].metadata["help"] == "rows per batch"
    assert fields["batch_size"].metadata["constraint"] == "> 0"
    with pytest.raises(ConfigError, match="batch_size must be > 0, got 0"):
        build_train_config({"task": "temporal", "batch_size": 0})
    with pytest.raises(ConfigError, match="max_iters must be >= 0, got -2"):
        build_train_config({"task": "diffusion", "max_iters": -2})
    # The diffusion task decays every parameter, so it says so instead of the lm's "(matrices only)".
    assert "all parameters" in task_keys(DiffusionTrainConfig)["weight_decay"].metadata["help"]
