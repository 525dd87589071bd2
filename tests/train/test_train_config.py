"""Trainer config: typing, unknown keys, per-task defaults, --help, every config/ file, errors before writing."""

import dataclasses
import pathlib

import pytest

from losskit.config import (
    TRAIN_CONFIGS,
    CommonTrainConfig,
    DiffusionTrainConfig,
    LMTrainConfig,
    TemporalTrainConfig,
    build_train_config,
    load_config,
    train_config_keys,
)
from losskit.contract import ConfigError
from losskit.modifiers import MODIFIER_CONFIG_KEYS
from losskit.train.cli import help_text, main

REPO = pathlib.Path(__file__).resolve().parents[2]
NANOGPT_KEYS = ["out_dir", "eval_interval", "log_interval", "eval_iters", "eval_only", "always_save_checkpoint", "init_from", "wandb_log", "wandb_project", "wandb_run_name", "dataset", "gradient_accumulation_steps", "batch_size", "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "learning_rate", "max_iters", "weight_decay", "beta1", "beta2", "grad_clip", "decay_lr", "warmup_iters", "lr_decay_iters", "min_lr", "backend", "device", "dtype", "compile"] + ["task", "data", "seed", "loss_normalize", "on_nonfinite_logits", "tensorboard_log"]


def test_every_task_dataclass_holds_common_task_and_modifier_keys():
    common = {f.name for f in dataclasses.fields(CommonTrainConfig)}
    assert set(NANOGPT_KEYS) <= common
    for cls in TRAIN_CONFIGS.values():
        keys = set(train_config_keys(cls))
        assert common <= keys and set(MODIFIER_CONFIG_KEYS) <= keys
    assert {"epochs", "n_timesteps", "pattern", "dt", "loss_reaction_time", "tau", "noise_std", "channels",
            "criterion", "energy_weight"} <= set(train_config_keys(TemporalTrainConfig))
    assert {"schedule", "num_timesteps", "zero_terminal_snr", "model_width", "model_depth", "num_threads",
            "diffusion_buckets", "sample_steps"} <= set(train_config_keys(DiffusionTrainConfig))


def test_task_defaults():
    t = build_train_config({"task": "temporal"})
    assert (t.batch_size, t.learning_rate, t.seed, t.out_dir, t.device, t.epochs) == (64, 3e-3, 0, None, "cpu", 30)
    d = build_train_config({"task": "diffusion"})
    assert (d.loss_modifiers_enabled, d.learning_rate, d.batch_size, d.max_iters, d.seed) == (True, 2e-3, 128, 3000,
                                                                                              1337)
    assert type(build_train_config({})) is LMTrainConfig


def test_overrides_are_typed_by_the_declared_type():
    c = build_train_config(load_config(["--max_iters=7", "--bias=true", "--learning_rate=1", "--data=x.txt",
                                        "--lr_decay_iters=None", "--target_smoothing_special_tokens=0,1,2"]))
    assert (c.max_iters, c.bias, c.learning_rate, c.data, c.lr_decay_iters) == (7, True, 1.0, "x.txt", None)
    for spelling, expected in (("True", True), (" FALSE ", False), ("1", True), ("0", False)):
        assert build_train_config({"bias": spelling}).bias is expected
    assert build_train_config({"bias": 1}).bias is True
    assert c.target_smoothing_special_tokens == [0, 1, 2]
    t = build_train_config(load_config(["--task=temporal", "--pattern=10001000"]))
    assert t.pattern == "10001000"


@pytest.mark.parametrize("argv,message", [
    (["--max_iter=3"], "unknown config key 'max_iter'; did you mean 'max_iters'?"),
    (["--entropy_modifier_wieght=2"], "did you mean 'entropy_modifier_weight'?"),
    (["--custom_param=2"], "unknown config key 'custom_param'"),
    (["--batch_size=abc"], "batch_size must be an int, got 'abc'"),
    (["--batch_size=0"], "batch_size must be > 0, got '0'"),
    (["--init_from=gpt2"], "init_from must be one of 'scratch', 'resume', got 'gpt2'"),
    (["--target_smoothing_factor=1.0"], "target_smoothing_factor must be in [0, 1), got"),
    (["--entropy_modifier_weight=abc"], "entropy_modifier_weight must be a float"),
    (["--task=nope"], "task must be one of"),
    (["--task=temporal", "--loss_modifiers_enabled=True", "--entropy_modifier_enabled=True"], "not available"),
    (["--loss_modifiers_enabled=True", "--loss_weighting=min_snr"], "not available with task='lm'"),
    (["--n_embd=30"], "n_embd must be divisible"),
    (["--custom_param=2"], "unknown config key 'custom_param'; `losskit train --help` lists every key"),
    (["--entropy_modifier_verbose=True"], ("unknown config key 'entropy_modifier_verbose'; did you mean "
                                           "'entropy_modifier_debug'? (renamed)")),
    (["--bias=yes"], "bias must be a bool (True/False/true/false/1/0), got 'yes'"),
    (["--dropout=1"], "dropout must be in [0, 1), got '1'"),
    (["--max_iters=-1"], "max_iters must be >= 0, got '-1'"),
])
def test_bad_config_is_a_config_error(argv, message):
    with pytest.raises(ConfigError) as info:
        build_train_config(load_config(argv))
    assert message in str(info.value)


def test_registered_prefix_keys_are_accepted():
    from losskit.modifiers import BaseLossModifier, register_modifier, unregister_modifier

    class Scale(BaseLossModifier):
        def modify_loss(self, logits, targets, loss, **kwargs):
            return loss * self.config.get("factor", 1.0)

        def get_metrics(self):
            return {}

    register_modifier(Scale, "scale_mod_")
    try:
        from losskit.train.cli import registered_prefixes

        c = build_train_config({"scale_mod_enabled": "True", "scale_mod_factor": "2.0"}, prefixes=registered_prefixes())
        assert c.extra_modifier_keys == {"scale_mod_enabled": True, "scale_mod_factor": 2.0}
    finally:
        unregister_modifier("scale_mod_")


@pytest.mark.parametrize("path", sorted((REPO / "config").glob("*")), ids=lambda p: p.name)
def test_every_config_file_validates(path):
    if path.suffix not in (".py", ".yaml", ".yml"):
        pytest.skip("not a config file")
    cfg = build_train_config(load_config([str(path)]))
    assert cfg.task in TRAIN_CONFIGS


def test_help_documents_every_key(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for key in train_config_keys(LMTrainConfig):
        assert f"--{key}=" in out
    for task, cls in TRAIN_CONFIGS.items():
        text = help_text(task)
        assert all(f"--{k}=" in text for k in train_config_keys(cls))


@pytest.mark.parametrize("argv,needle", [
    (["missing_config.py"], "not found"),
    (["BAD_PY"], "not valid Python"),
    (["--max_iter=3"], "did you mean 'max_iters'"),
    (["--data=DATA", "--block_size=100000"], "block_size must be at most"),
    (["--data=LATIN1"], "not UTF-8"),
    (["--data=EMPTY"], "is empty"),
    (["--target_smoothing_factor=2"], "target_smoothing_factor"),
    (["--init_from=resume"], "needs a run to continue"),
])
def test_bad_input_fails_before_anything_is_written(tmp_path, capsys, argv, needle):
    bad_py = tmp_path / "bad.py"
    bad_py.write_text("x = = 1\n")
    data = tmp_path / "d.txt"
    data.write_text("\n\n".join("some words " * 40 for _ in range(30)))
    (tmp_path / "l1.txt").write_bytes(b"caf\xe9 " * 100)
    (tmp_path / "empty.txt").write_text("")
    subst = {"BAD_PY": str(bad_py), "--data=DATA": f"--data={data}", "--data=LATIN1": f"--data={tmp_path / 'l1.txt'}",
             "--data=EMPTY": f"--data={tmp_path / 'empty.txt'}"}
    run_dir = tmp_path / "run"
    code = main([subst.get(a, a) for a in argv] + [f"--out_dir={run_dir}", "--device=cpu"])
    assert code == 2
    assert needle in capsys.readouterr().err
    assert not run_dir.exists()
