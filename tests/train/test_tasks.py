"""The TASKS table and the config edge (``build_train_config``): typing of both spellings, per-task defaults, keys a
task does not read, every config/ file, the modifier settings parsed (and warned about) once."""

import dataclasses
import pathlib
import subprocess
import sys
import warnings

import pytest

from losskit.config import load_config, load_config_file
from losskit.contract import ConfigError
from losskit.modifiers import MODIFIER_CONFIG_KEYS, ModifierSettings
from losskit.modifiers.config_keys import section
from losskit.train.config import DiffusionTrainConfig, LMTrainConfig, TemporalTrainConfig
from losskit.train.tasks import TASKS, Task, build_train_config, run_task

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_the_table():
    assert list(TASKS) == ["lm", "temporal", "diffusion"]
    assert [t.config for t in TASKS.values()] == [LMTrainConfig, TemporalTrainConfig, DiffusionTrainConfig]
    assert TASKS["lm"].modifiers == ("EntropyModifier", "TargetSmoothingModifier", "MaskRatioWeightModifier")
    assert TASKS["temporal"].modifiers == ()
    assert TASKS["diffusion"].modifiers == ("SNRWeightModifier",)
    for name, task in TASKS.items():
        assert task.name == name and task.description
        module, function = task.runner.split(":")
        assert module == f"losskit.train.{name}" and function == "run"
        # a task's modifier keys are exactly its modifiers' keys and the master switch
        modifier_keys = {k for k, f in task.fields().items() if f.metadata.get("modifier")}
        expected = {k for owner in task.modifiers for k in section(owner)} | ({"loss_modifiers_enabled"}
                                                                              if task.modifiers else set())
        assert modifier_keys == expected, name


def test_a_table_row_that_disagrees_with_its_config_is_refused():
    with pytest.raises(TypeError, match="has the keys of modifiers"):
        Task("x", LMTrainConfig, "losskit.train.lm:run", "x", ("SNRWeightModifier",))


def test_run_task_dispatches_on_the_task(monkeypatch):
    from losskit.train import temporal

    seen = []
    monkeypatch.setattr(temporal, "run", lambda cfg, **kw: seen.append((cfg, kw)) or {"val_loss": 1.0})
    cfg = build_train_config({"task": "temporal"})
    assert run_task(cfg, extra=1) == {"val_loss": 1.0} and seen == [(cfg, {"extra": 1})]


def test_task_defaults():
    t = build_train_config({"task": "temporal"})
    assert (t.batch_size, t.learning_rate, t.seed, t.out_dir, t.device, t.epochs) == (64, 3e-3, 0, None, "cpu", 30)
    d = build_train_config({"task": "diffusion"})
    assert (d.loss_modifiers_enabled, d.learning_rate, d.batch_size, d.max_iters, d.seed) == (True, 2e-3, 128, 3000,
                                                                                              1337)
    assert type(build_train_config({})) is LMTrainConfig
    for name in TASKS:
        assert build_train_config({"task": name}).task == name
        assert build_train_config({"task": name}) == TASKS[name].config()  # the defaults are the dataclass's


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


# Both spellings of every kind, trainer and modifier keys alike: the object a config file holds and the string of
# the command line give the same typed value. (task, key, file value, command-line strings, typed value)
SPELLINGS = [
    ("lm", "bias", True, ["True", "true", " TRUE ", "1"], True),
    ("lm", "compile", False, ["False", "false", "0"], False),
    ("lm", "entropy_modifier_per_sample", 1, ["1", "true"], True),
    ("lm", "n_layer", 3, ["3", " 3 "], 3),
    ("lm", "n_layer", 3.0, ["3"], 3),
    ("lm", "target_smoothing_padding_token", 0, ["0"], 0),
    ("lm", "learning_rate", 2, ["2", "2.0", "2e0"], 2.0),
    ("lm", "entropy_modifier_weight", 2, ["2", "2.0", " 2 "], 2.0),
    ("lm", "dataset", " custom_text", ["custom_text", " custom_text "], "custom_text"),
    ("lm", "target_smoothing_convention", "fairseq", ["fairseq", " fairseq"], "fairseq"),
    ("lm", "target_smoothing_special_tokens", [0, 1, 2], ["0,1,2", "[0, 1, 2]", "(0,1,2)", "0,1,2,"], [0, 1, 2]),
    ("lm", "target_smoothing_special_tokens", 5, ["5", "[5]"], [5]),
    ("lm", "target_smoothing_special_tokens", [], ["", "[]"], []),
    ("diffusion", "snr_clamp_max", None, ["None", "none", "null", ""], None),
    ("diffusion", "snr_clamp_max", 4, ["4", "4.0"], 4.0),
    ("temporal", "energy_weight", None, ["None", "none", "null", ""], None),
    ("temporal", "energy_weight", 0.5, ["0.5", ".5"], 0.5),
    ("lm", "lr_decay_iters", None, ["None", "null", ""], None),
    ("lm", "out_dir", None, ["None", ""], None),
    ("temporal", "criterion", [{"name": "cross_entropy_loss"}], ["[{name: cross_entropy_loss}]",
                                                                '[{"name": "cross_entropy_loss"}]'],
     [{"name": "cross_entropy_loss"}]),
]


@pytest.mark.parametrize("task,key,from_file,from_cli,expected", SPELLINGS,
                         ids=[f"{s[1]}={s[2]!r}" for s in SPELLINGS])
def test_both_spellings_give_the_same_value(tmp_path, task, key, from_file, from_cli, expected):
    path = tmp_path / "cfg.py"
    path.write_text(f"task = {task!r}\n{key} = {from_file!r}\n")
    values = [getattr(build_train_config(load_config([str(path)])), key)]
    values += [getattr(build_train_config(load_config([f"--task={task}", f"--{key}={s}"])), key) for s in from_cli]
    assert all(v == expected and type(v) is type(expected) for v in values), values


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
    # new: the kinds and ranges the edge checks
    (["--n_layer=2.5"], "n_layer must be an int, got '2.5'"),
    (["--dataset=wikitext"], "dataset must be one of 'pydoc_topics', 'custom_text', got 'wikitext'"),
    (["--lr_decay_iters=-1"], "lr_decay_iters must be >= 0 or None, got '-1'"),
    (["--min_lr=0.1"], "min_lr must be <= learning_rate (0.003), got 0.1"),
    (["--task=temporal", "--num_threads=0"], "num_threads must be > 0, got '0'"),
    (["--task=temporal", "--criterion=abc"], "criterion must be a list, got 'abc'"),
    (["--task=diffusion", "--snr_clamp_max=nan"], "snr_clamp_max must be a number (not NaN)"),
    (["--task=diffusion", "--prediction_type=flow"], "prediction_type='flow' and schedule='flow' require each other"),
])
def test_bad_config_is_a_config_error(argv, message):
    with pytest.raises(ConfigError) as info:
        build_train_config(load_config(argv))
    assert message in str(info.value)


# Keys a task does not read: rejected, naming the task and the task that reads the key (acceptance of move 3).
@pytest.mark.parametrize("task,key,value,message", [
    ("temporal", "init_from", "resume", ("init_from is not available with task='temporal': only task 'lm' reads it; "
                                        "`losskit train --task=temporal --help` lists every key of task 'temporal'")),
    ("temporal", "compile", "True", "compile is not available with task='temporal': only task 'lm' reads it"),
    ("diffusion", "compile", "True", "compile is not available with task='diffusion': only task 'lm' reads it"),
    ("diffusion", "init_from", "scratch", "init_from is not available with task='diffusion'"),
    ("temporal", "max_iters", "5", ("max_iters is not available with task='temporal': only tasks 'lm' and "
                                   "'diffusion' read it")),
    ("temporal", "grad_clip", "0", "only tasks 'lm' and 'diffusion' read it"),
    ("diffusion", "eval_iters", "2", "eval_iters is not available with task='diffusion': only task 'lm' reads it"),
    ("diffusion", "dataset", "digits", "dataset is not available with task='diffusion': only task 'lm' reads it"),
    ("temporal", "dataset", "digits", "dataset is not available with task='temporal'"),
    ("diffusion", "gradient_accumulation_steps", "2", "only task 'lm' reads it"),
    ("diffusion", "on_nonfinite_logits", "skip_step", "only task 'lm' reads it"),
    ("lm", "num_threads", "1", ("num_threads is not available with task='lm': only tasks 'temporal' and 'diffusion' "
                               "read it; `losskit train --help` lists every key of task 'lm'")),
    ("lm", "epochs", "3", "epochs is not available with task='lm': only task 'temporal' reads it"),
    ("lm", "loss_weighting", "constant", "loss_weighting is not available with task='lm': only task 'diffusion'"),
    ("lm", "prediction_type", "epsilon", "prediction_type is not available with task='lm'"),
    ("diffusion", "entropy_modifier_enabled", "False", ("entropy_modifier_enabled is not available with "
                                                       "task='diffusion': only task 'lm' reads it")),
    ("diffusion", "target_smoothing_factor", "0.1", "only task 'lm' reads it"),
    ("temporal", "loss_modifiers_enabled", "False", ("loss_modifiers_enabled is not available with task='temporal': "
                                                    "only tasks 'lm' and 'diffusion' read it")),
    ("temporal", "entropy_modifier_weight", "2", "entropy_modifier_weight is not available with task='temporal'"),
    ("temporal", "epoch", "3", "unknown config key 'epoch'; did you mean 'epochs'? (a key of task 'temporal')"),
    ("diffusion", "num_timestep", "3", "did you mean 'num_timesteps'? (a key of task 'diffusion')"),
    ("temporal", "nonsense", "3", ("unknown config key 'nonsense'; `losskit train --task=temporal --help` lists "
                                  "every key of task 'temporal'")),
])
def test_a_key_the_task_does_not_read_is_rejected(task, key, value, message):
    for raw in ({"task": task, key: value}, load_config([f"--task={task}", f"--{key}={value}"])):
        with pytest.raises(ConfigError) as info:
            build_train_config(raw)
        assert message in str(info.value)


def test_every_key_of_a_task_is_read_by_its_runner():
    """Each field of a task appears as ``cfg.<key>`` in its runner or the shared helpers it calls (the other way
    round, a runner reading a key its config lacks fails every run test with an AttributeError)."""
    import inspect

    from losskit.train import diffusion, lm, runtime, schedule, sinks, temporal

    shared = "".join(inspect.getsource(m) for m in (schedule, sinks))
    sources = {"lm": inspect.getsource(lm) + inspect.getsource(runtime) + shared,
               "temporal": inspect.getsource(temporal) + shared,
               "diffusion": inspect.getsource(diffusion) + inspect.getsource(runtime) + shared}
    for name, task in TASKS.items():
        for key, f in task.fields().items():
            if f.metadata.get("modifier") or key == "task":
                continue  # the modifier keys are read by the pipeline; task by run_task
            assert f"cfg.{key}" in sources[name], (name, key)


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
        assert dict(c.modifiers.registered) == {"scale_mod_": {"enabled": True, "factor": 2.0}}
        d = build_train_config({"task": "diffusion", "scale_mod_enabled": "True"}, prefixes=registered_prefixes())
        assert d.extra_modifier_keys == {"scale_mod_enabled": True}
        with pytest.raises(ConfigError, match="scale_mod_enabled is not available with task='temporal': it configures "
                                              "the registered modifier 'scale_mod_', and task 'temporal' builds no"):
            build_train_config({"task": "temporal", "scale_mod_enabled": "True"}, prefixes=registered_prefixes())
    finally:
        unregister_modifier("scale_mod_")


@pytest.mark.parametrize("path", sorted((REPO / "config").glob("*")), ids=lambda p: p.name)
def test_every_config_file_validates_with_its_values(path):
    if path.suffix not in (".py", ".yaml", ".yml"):
        pytest.skip("not a config file")
    values = load_config_file(path)
    cfg = build_train_config(load_config([str(path)]))
    assert cfg.task == values.get("task", "lm") and type(cfg) is TASKS[cfg.task].config
    for key, value in values.items():  # every setting of the file reaches the config unchanged
        assert getattr(cfg, key) == value, key


def test_the_modifier_settings_are_parsed_once_with_the_flat_keys():
    cfg = build_train_config(load_config(["--loss_modifiers_enabled=True", "--target_smoothing_enabled=true",
                                          "--target_smoothing_special_tokens=2,0,2"]))
    assert isinstance(cfg.modifiers, ModifierSettings)
    assert cfg.modifiers.enabled and cfg.modifiers.smoothing.enabled
    assert cfg.modifiers.smoothing.special_tokens == (2, 0) and cfg.target_smoothing_special_tokens == [2, 0]
    assert {k: getattr(cfg, k) for k in cfg.modifiers.flat() if hasattr(cfg, k)} == {
        k: v for k, v in cfg.modifiers.flat().items() if k in TASKS["lm"].fields()}
    d = build_train_config({"task": "diffusion", "loss_weighting": "min_snr"})
    assert d.modifiers.snr.loss_weighting == "min_snr" and d.modifiers.snr.enabled and d.modifiers.enabled


MASTER_OFF = "has no effect because loss_modifiers_enabled=False"
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=32", "--batch_size=2", "--eval_iters=1",
        "--eval_interval=5", "--log_interval=1", "--device=cpu", "--max_iters=1"]
TINY_DIFFUSION = ["--task=diffusion", "--model_width=8", "--model_depth=1", "--sample_steps=1", "--batch_size=8",
                  "--max_iters=1", "--log_interval=1", "--eval_interval=1", "--num_timesteps=10"]


@pytest.mark.parametrize("argv,needle", [
    ([*TINY, "--entropy_modifier_enabled=True"], MASTER_OFF),
    ([*TINY_DIFFUSION, "--loss_modifiers_enabled=False", "--loss_weighting=min_snr"], MASTER_OFF),
    ([*TINY_DIFFUSION, "--loss_weighting=p2", "--p2_gamma=3"], "p2_gamma=3.0 is above 2"),
])
def test_a_modifier_warning_is_given_once_per_run(tmp_path, argv, needle):
    from losskit.train.cli import main

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # every call site would show, not only the first one
        assert main([*argv, f"--out_dir={tmp_path / 'run'}"]) == 0
    assert sum(needle in str(w.message) for w in seen) == 1


@pytest.mark.slow
def test_the_master_switch_warning_prints_once_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "losskit", "train", *TINY, "--entropy_modifier_enabled=True",
                           f"--out_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if MASTER_OFF in ln]
    assert len(lines) == 1 and "entropy_modifier_enabled=True" in lines[0]


def test_every_task_field_has_help_and_a_known_kind():
    from losskit.config import KINDS
    from losskit.train.config import key_kind

    for task in TASKS.values():
        for key, f in task.fields().items():
            assert f.metadata.get("help"), (task.name, key)
            assert key_kind(f).removesuffix("|None") in KINDS, (task.name, key, key_kind(f))
            if f.metadata.get("modifier"):
                assert key_kind(f) == MODIFIER_CONFIG_KEYS[key].type
    assert {f.name for f in dataclasses.fields(LMTrainConfig)} - set(TASKS["lm"].fields()) == {"modifiers"}


def test_every_unread_key_is_named_in_one_error():
    with pytest.raises(ConfigError) as info:
        build_train_config({"task": "temporal", "compile": True, "epoch": 3, "init_from": "resume", "epochs": 2})
    text = str(info.value)
    assert text.startswith("3 keys are not read by task 'temporal': ")
    for needle in ("compile is not available with task='temporal': only task 'lm' reads it",
                   "did you mean 'epochs'?", "init_from is not available with task='temporal'"):
        assert needle in text
    assert "epochs is not" not in text  # a key the task reads is not named
