"""Configuration sources: python/YAML config files and ``--key=value`` command-line overrides.

This is nanoGPT's configurator made explicit (docs/training.md): ``python train.py [cfg.py|cfg.yaml]
--key=value ...``. Positional arguments are config files, applied in order; ``--key=value`` overrides are applied
after every file. Override values stay strings here: each consumer types them by the key's *declared* type
(``losskit.modifiers.config_keys.coerce_value`` for modifier keys), so validation runs once, on the merged result.

Sources and their rules:

* **Python file.** Executed in a fresh namespace; its module-level names become values, except names starting
  with ``_``, modules and callables (functions, classes), which are helpers rather than settings.
* **YAML file** (``.yaml``/``.yml``). A flat mapping of the same keys; nested mappings are rejected.
"""

from __future__ import annotations

import dataclasses as _dc
import math
import pathlib
import types
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from losskit.contract import ConfigError

__all__ = [
    "TASK_MODIFIERS",
    "TRAIN_CONFIGS",
    "CommonTrainConfig",
    "DiffusionTrainConfig",
    "LMTrainConfig",
    "TemporalTrainConfig",
    "build_train_config",
    "load_config",
    "load_config_file",
    "merge_config",
    "parse_overrides",
    "train_config_keys",
    "train_config_to_dict",
]

_PY_SUFFIXES = (".py",)
_YAML_SUFFIXES = (".yaml", ".yml")


def _load_python(path: pathlib.Path) -> dict[str, Any]:
    source = path.read_text()
    try:
        code = compile(source, str(path), "exec")
    except SyntaxError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid Python: {exc.msg} (line {exc.lineno})") from exc
    namespace: dict[str, Any] = {"__file__": str(path), "__name__": "__losskit_config__"}
    try:
        exec(code, namespace)  # noqa: S102 - executing the user's own config file is the documented contract
    except Exception as exc:
        raise ConfigError(f"config file {str(path)!r} raised {type(exc).__name__}: {exc}") from exc
    return {
        k: v
        for k, v in namespace.items()
        if not k.startswith("_") and not isinstance(v, types.ModuleType) and not callable(v)
    }


def _load_yaml(path: pathlib.Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"config file {str(path)!r} must hold a flat mapping of key: value, got {type(data).__name__}"
        )
    out: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"config file {str(path)!r}: keys must be strings, got {key!r}")
        if isinstance(value, Mapping):
            raise ConfigError(
                f"config file {str(path)!r}: key {key!r} holds a nested mapping; expected a flat mapping of "
                "key: value (scalars or lists)"
            )
        out[key] = value
    return out


def load_config_file(path: str | pathlib.Path) -> dict[str, Any]:
    """Load one python (``.py``) or YAML (``.yaml``/``.yml``) config file as a flat ``{key: value}`` dict.

    Raises:
        ConfigError: the file is missing, has another suffix, does not parse, raises while executing, or (YAML)
            is not a flat mapping.
    """
    p = pathlib.Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found (expected a .py or .yaml file)")
    suffix = p.suffix.lower()
    if suffix in _PY_SUFFIXES:
        return _load_python(p)
    if suffix in _YAML_SUFFIXES:
        return _load_yaml(p)
    raise ConfigError(f"config file {str(p)!r} must end in .py, .yaml or .yml, got {p.suffix!r}")


def parse_overrides(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Split command-line arguments into config file paths and ``--key=value`` overrides.

    Bare positional arguments are config files (nanoGPT's convention); ``--key=value`` sets ``key`` to the string
    ``value`` (an empty value is the empty string); a later override of the same key wins.

    Returns:
        ``(files, overrides)``: file paths in order, and ``{key: raw string value}``.

    Raises:
        ConfigError: an option without ``=`` (``--key value`` or a bare ``--flag``) or a key that is not a valid
            identifier.
    """
    files: list[str] = []
    overrides: dict[str, str] = {}
    for arg in argv:
        if not arg.startswith("-"):
            files.append(arg)
            continue
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"command-line argument {arg!r} must have the form --key=value")
        key, value = arg[2:].split("=", 1)
        if not key.isidentifier():
            raise ConfigError(f"command-line argument {arg!r}: {key!r} is not a valid config key name")
        overrides[key] = value
    return files, overrides


def merge_config(
    files: Iterable[str | pathlib.Path] = (),
    overrides: Mapping[str, Any] | None = None,
    *,
    base: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``base``, then every file in order, then the overrides (later sources win)."""
    merged: dict[str, Any] = dict(base or {})
    for f in files:
        merged.update(load_config_file(f))
    merged.update(overrides or {})
    return merged


def load_config(argv: Sequence[str], *, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``parse_overrides`` + ``merge_config``: the merged, not yet validated config of a command line."""
    files, overrides = parse_overrides(argv)
    return merge_config(files, overrides, base=base)


# ==========================================================================================================
# Trainer dataclasses (`losskit train`): common keys with nanoGPT's names, one dataclass per task, and
# `build_train_config`, which types, validates and rejects unknown keys (docs/training.md lists them).
# ==========================================================================================================


def _key(default: Any, help: str, *, choices: tuple = (), check: Any = None, constraint: str = "") -> Any:
    """A dataclass field with its help line and optional choices / range check (for coercion and --help)."""
    meta = {"help": help, "choices": choices, "check": check, "constraint": constraint}
    if isinstance(default, (list, dict)):
        return _dc.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return _dc.field(default=default, metadata=meta)


# Range presets for _key: the predicate and the text quoted by its error message, kept side by side.
_POS = {"check": lambda v: v > 0, "constraint": "> 0"}
_NONNEG = {"check": lambda v: v >= 0, "constraint": ">= 0"}
_UNIT = {"check": lambda v: 0 <= v < 1, "constraint": "in [0, 1)"}


@_dc.dataclass
class CommonTrainConfig:
    """Keys shared by every task; names follow nanoGPT where nanoGPT has one."""

    task: str = _key("lm", "training task", choices=("lm", "temporal", "diffusion"))
    out_dir: str | None = _key(None, "run directory (config.yaml, metrics.jsonl, ckpt.pt); unset = a new "
                               "out/<task>/run-N with out/<task>/latest pointing at it; DIR = exactly DIR, "
                               "never replacing a run already there")
    eval_interval: int = _key(250, "evaluate val/loss every this many steps (and at the end)", **_POS)
    log_interval: int = _key(25, "console line and metric sinks every this many steps", **_POS)
    eval_iters: int = _key(20, "validation batches per evaluation", **_POS)
    eval_only: bool = _key(False, "evaluate once and exit (nanoGPT); with init_from=resume the run directory is "
                           "left unchanged")
    always_save_checkpoint: bool = _key(False, "save at every eval, not only when val/loss improves")
    init_from: str = _key("scratch", "'scratch' or 'resume': continue out_dir (a run directory, or the latest run "
                          "of a task folder; unset = out/<task>/latest) from its ckpt.pt", choices=("scratch", "resume"))
    wandb_log: bool = _key(False, "log to Weights & Biases (works with WANDB_MODE=offline)")
    wandb_project: str = _key("losskit", "W&B project")
    wandb_run_name: str = _key("run", "W&B run name")
    tensorboard_log: bool = _key(False, "write TensorBoard event files into out_dir/tensorboard")
    dataset: str = _key("pydoc_topics", "'pydoc_topics' (embedded corpus) or 'custom_text' (your own text)")
    data: str | None = _key(None, "path of your own .txt file or folder of .txt files")
    gradient_accumulation_steps: int = _key(1, "micro-batches per optimizer step (per process)", **_POS)
    batch_size: int = _key(16, "sequences per micro-batch", **_POS)
    block_size: int = _key(128, "sequence length (tokens)", **_POS)
    n_layer: int = _key(4, "transformer blocks", **_POS)
    n_head: int = _key(4, "attention heads", **_POS)
    n_embd: int = _key(128, "model width", **_POS)
    dropout: float = _key(0.0, "attention dropout", **_UNIT)
    bias: bool = _key(False, "biases in linear layers (export: attention_bias and mlp_bias)")
    learning_rate: float = _key(3e-3, "peak learning rate (AdamW)", **_POS)
    max_iters: int = _key(500, "optimizer steps of the whole run; on resume, a value below the checkpoint's "
                          "iteration is an error (nothing is written) and an equal one trains nothing", **_NONNEG)
    weight_decay: float = _key(0.1, "AdamW weight decay (matrices only)", **_NONNEG)
    beta1: float = _key(0.9, "AdamW beta1", **_UNIT)
    beta2: float = _key(0.99, "AdamW beta2", **_UNIT)
    grad_clip: float = _key(1.0, "clip the global gradient norm (0 = off)", **_NONNEG)
    decay_lr: bool = _key(True, "cosine learning-rate decay after warmup")
    warmup_iters: int = _key(50, "linear warmup steps", **_NONNEG)
    lr_decay_iters: int | None = _key(None, "end of the cosine decay (None = max_iters)")
    min_lr: float = _key(3e-4, "learning rate at the end of the decay", **_NONNEG)
    backend: str = _key("auto", "DDP backend: 'auto' (nccl on CUDA, else gloo), 'nccl', 'gloo'",
                        choices=("auto", "nccl", "gloo"))
    device: str = _key("auto", "'auto' (cuda if available), 'cpu', 'cuda', 'cuda:N', 'mps'")
    dtype: str = _key("auto", "'auto' (bf16 autocast on CUDA, float32 on CPU), 'float32', 'bfloat16'",
                      choices=("auto", "float32", "bfloat16"))
    compile: bool = _key(False, "torch.compile the model")
    seed: int = _key(1337, "random seed (model init, data order)")
    loss_normalize: str = _key("global_tokens", "'global_tokens' (split-invariant) or 'tokens' (nanoGPT mean)",
                               choices=("global_tokens", "tokens"))
    on_nonfinite_logits: str = _key("error", "'error' or 'skip_step' (zero grads, skip, count)",
                                    choices=("error", "skip_step"))


def _modifier_fields() -> list[tuple[str, Any, Any]]:
    from losskit.modifiers.config_keys import MODIFIER_CONFIG_KEYS

    out = []
    for name, spec in MODIFIER_CONFIG_KEYS.items():
        default = spec.default
        meta = {"help": spec.help, "modifier": True}
        f = (_dc.field(default_factory=lambda d=default: list(d), metadata=meta) if isinstance(default, list)
             else _dc.field(default=default, metadata=meta))
        out.append((name, Any, f))
    return out


#: Every modifier key of MODIFIER_CONFIG_KEYS as a field (the single source of truth stays that table).
ModifierKeys = _dc.make_dataclass("ModifierKeys", _modifier_fields())


@_dc.dataclass
class _ExtraKeys:
    # keys under a `register_modifier` prefix, kept verbatim for the factory
    extra_modifier_keys: dict = _dc.field(default_factory=dict, metadata={"help": "", "internal": True})


@_dc.dataclass
class LMTrainConfig(CommonTrainConfig, ModifierKeys, _ExtraKeys):
    """Task `lm` (default): the byte-level Llama decoder on the embedded corpus."""

    n_kv_head: int | None = _key(None, "key/value heads for grouped-query attention (None = n_head)")


@_dc.dataclass
class TemporalTrainConfig(CommonTrainConfig, ModifierKeys, _ExtraKeys):
    """Task `temporal` (docs/temporal.md): the recurrent digits network with energy loss."""

    dataset: str = _key("digits", "scikit-learn's bundled digits")
    batch_size: int = _key(64, "images per batch", **_POS)
    learning_rate: float = _key(3e-3, "Adam learning rate", **_POS)
    seed: int = _key(0, "random seed")
    device: str = _key("cpu", "'cpu', 'cuda', ...")
    epochs: int = _key(30, "training epochs", **_POS)
    n_timesteps: int = _key(8, "timesteps per presentation", **_POS)
    pattern: str = _key("1011", "presentation pattern of stimulus (1) and null (0) steps")
    dt: float = _key(2.0, "integration step", **_POS)
    loss_reaction_time: float = _key(2.0, "reaction time masked out of the loss", **_NONNEG)
    tau: float = _key(4.0, "time constant (leak alpha = dt/tau, 0 < alpha <= 1)", **_POS)
    noise_std: float = _key(0.5, "stimulus noise standard deviation", **_NONNEG)
    channels: int = _key(16, "feature channels", **_POS)
    criterion: list | None = _key(None, "weighted loss list (docs/temporal.md); None = CE + 0.05 energy")
    num_threads: int | None = _key(1, "torch intra-op threads on CPU (None = torch's default)")
    energy_weight: float | None = _key(None, "overrides the weight of the energy_loss criterion entry")
    allow_no_supervision: bool = _key(False, "train even when pattern, dt and loss_reaction_time leave no timestep "
                                      "with a label (otherwise a start-up error)")


@_dc.dataclass
class DiffusionTrainConfig(CommonTrainConfig, ModifierKeys, _ExtraKeys):
    """Task `diffusion` (docs/diffusion.md): an MLP denoiser on the digits; SNR weightings."""

    dataset: str = _key("digits", "scikit-learn's bundled digits")
    batch_size: int = _key(128, "images per batch", **_POS)
    learning_rate: float = _key(2e-3, "AdamW learning rate", **_POS)
    weight_decay: float = _key(0.0, "AdamW weight decay", **_NONNEG)
    warmup_iters: int = _key(100, "linear warmup steps", **_NONNEG)
    min_lr: float = _key(0.0, "learning rate at the end of the cosine decay", **_NONNEG)
    max_iters: int = _key(3000, "optimizer steps", **_NONNEG)
    log_interval: int = _key(100, "bucket metrics and console line interval", **_POS)
    eval_interval: int = _key(1000, "eval x0-MSE interval (also at step 0 and the end)", **_POS)
    seed: int = _key(1337, "random seed")
    loss_modifiers_enabled: Any = _dc.field(default=True, metadata={"help": "master switch (on for diffusion)",
                                                                     "modifier": True})
    schedule: str = _key("cosine", "noise schedule", choices=("cosine", "linear", "scaled_linear", "flow"))
    num_timesteps: int = _key(1000, "diffusion timesteps T", **_POS)
    zero_terminal_snr: bool = _key(False, "rescale the VP schedule to SNR 0 at t = T-1")
    model_width: int = _key(256, "denoiser MLP width", **_POS)
    model_depth: int = _key(3, "residual blocks", **_POS)
    num_threads: int | None = _key(1, "torch intra-op threads on CPU (None = torch's default)")
    diffusion_buckets: int = _key(10, "timestep buckets for logging and eval", **_POS)
    sample_steps: int = _key(100, "DDIM / Euler sampling steps", **_POS)


#: task name -> its config dataclass.
TRAIN_CONFIGS: dict[str, type] = {
    "lm": LMTrainConfig,
    "temporal": TemporalTrainConfig,
    "diffusion": DiffusionTrainConfig,
}

#: Built-in modifiers a task can use (the others need class logits, or are diffusion-only).
TASK_MODIFIERS: dict[str, tuple[str, ...]] = {
    "lm": ("entropy_modifier_enabled", "target_smoothing_enabled", "mask_ratio_weight_enabled"),
    "temporal": (),
    "diffusion": ("loss_weighting",),
}


def train_config_keys(cls: type) -> dict[str, _dc.Field]:
    """The user-settable fields of a task config dataclass, in declaration order."""
    return {f.name: f for f in _dc.fields(cls) if not f.metadata.get("internal")}


def _coerce_train_value(key: str, value: Any, field: _dc.Field) -> Any:
    """Type ``value`` by the field's declared annotation (``int``, ``float``, ``bool``, ``str``, ``X | None``,
    ``list | None``) and check its range; strings from the command line are parsed."""
    ann = str(field.type).replace(" ", "")
    optional = ann.endswith("|None")
    base = ann[: -len("|None")] if optional else ann
    if optional and (value is None or (isinstance(value, str) and value.strip() in ("None", "none", "null", ""))):
        return None
    out: Any
    if base == "bool":
        from losskit.modifiers.config_keys import coerce_bool

        out = coerce_bool(key, value)
    elif base == "int":
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an int, got {value!r}")
        if isinstance(value, int):
            out = value
        elif isinstance(value, float) and value.is_integer():
            out = int(value)
        elif isinstance(value, str):
            try:
                out = int(value.strip())
            except ValueError:
                raise ConfigError(f"{key} must be an int, got {value!r}") from None
        else:
            raise ConfigError(f"{key} must be an int, got {value!r}")
    elif base == "float":
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a float, got {value!r}")
        try:
            out = float(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a float, got {value!r}") from None
        if math.isnan(out):
            raise ConfigError(f"{key} must be a number (not NaN), got {value!r}")
    elif base == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        out = value.strip()
    elif base == "list":
        if isinstance(value, str):
            import yaml

            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError as exc:
                raise ConfigError(f"{key} must be a list (YAML/JSON syntax), got {value!r}: {exc}") from None
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        out = value
    else:  # a programming error in the dataclass
        raise TypeError(f"trainer key {key!r} has unsupported annotation {field.type!r}")
    choices = field.metadata.get("choices") or ()
    if choices and out not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    check = field.metadata.get("check")
    if check is not None and out is not None and not check(out):
        raise ConfigError(f"{key} must be {field.metadata.get('constraint')}, got {value!r}")
    return out


def _unknown_train_key(key: str, valid: list[str]) -> ConfigError:
    from losskit.modifiers.config_keys import unknown_key_message

    return ConfigError(unknown_key_message(key, valid, fallback="`losskit train --help` lists every key"))


def build_train_config(raw: Mapping[str, Any], *, prefixes: Iterable[str] = ()) -> Any:
    """Build the selected task's config dataclass from a merged ``{key: value}`` (files + overrides).

    Every key must be a common trainer key, a key of the selected task, a modifier key of
    ``MODIFIER_CONFIG_KEYS`` or start with a ``register_modifier`` prefix (kept in ``extra_modifier_keys``);
    anything else is a ``ConfigError`` naming the closest valid key. Values are typed by the field's declared
    type (strings from the command line are parsed) and range-checked; modifier keys are coerced and validated
    by ``losskit.modifiers.config_keys.validate_modifier_config``, the single source of truth.

    Raises:
        ConfigError: unknown task or key, bad type or range, a modifier the task cannot use.
    """
    from losskit.modifiers.config_keys import (
        MODIFIER_CONFIG_KEYS,
        SUB_SWITCHES,
        switch_on,
        validate_modifier_config,
    )

    raw = dict(raw)
    task = _coerce_train_value("task", raw.get("task", "lm"), _dc.fields(CommonTrainConfig)[0])
    cls = TRAIN_CONFIGS[task]
    fields = train_config_keys(cls)
    prefixes = tuple(prefixes)
    values: dict[str, Any] = {}
    modifier_raw: dict[str, Any] = {k: f.default for k, f in fields.items() if f.metadata.get("modifier")
                                     and f.default is not _dc.MISSING}
    extra: dict[str, Any] = {}
    for key, value in raw.items():
        if key in MODIFIER_CONFIG_KEYS:
            modifier_raw[key] = value
        elif any(key.startswith(p) for p in prefixes):
            from losskit.modifiers.config_keys import literal_value

            extra[key] = literal_value(value)
            modifier_raw[key] = extra[key]
        elif key in fields:
            values[key] = _coerce_train_value(key, value, fields[key])
        else:
            valid = [k for k in fields] + [k for k in MODIFIER_CONFIG_KEYS if k not in fields]
            raise _unknown_train_key(key, valid)
    modifiers = validate_modifier_config(modifier_raw, prefixes=prefixes)
    allowed = TASK_MODIFIERS[task]
    if modifiers["loss_modifiers_enabled"]:
        for switch in SUB_SWITCHES.values():
            if switch not in allowed and switch_on(switch, modifiers[switch]):
                raise ConfigError(
                    f"{switch}={modifiers[switch]!r} is not available with task={task!r} (it needs "
                    f"{'class logits' if task != 'lm' else 'a diffusion process'}); usable: "
                    f"{', '.join(allowed) or 'none of the built-in modifiers'}"
                )
    values.update(modifiers)
    values["extra_modifier_keys"] = extra
    cfg = cls(**values)
    _check_train_config(cfg)
    return cfg


def _check_train_config(cfg: Any) -> None:
    """Cross-key checks of the common keys."""
    if cfg.lr_decay_iters is not None and cfg.lr_decay_iters < 0:
        raise ConfigError(f"lr_decay_iters must be >= 0 or None, got {cfg.lr_decay_iters!r}")
    if cfg.min_lr > cfg.learning_rate:
        raise ConfigError(f"min_lr must be <= learning_rate ({cfg.learning_rate!r}), got {cfg.min_lr!r}")
    if isinstance(cfg, LMTrainConfig):
        kv = cfg.n_kv_head or cfg.n_head
        if cfg.n_embd % cfg.n_head or (cfg.n_embd // cfg.n_head) % 2:
            raise ConfigError(
                f"n_embd must be divisible by n_head into an even head size, got n_embd={cfg.n_embd}, "
                f"n_head={cfg.n_head}"
            )
        if cfg.n_head % kv:
            raise ConfigError(f"n_kv_head must divide n_head ({cfg.n_head}), got {kv}")


def train_config_to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as a flat dict (what config.yaml holds), registered-prefix keys inlined."""
    out = {f.name: getattr(cfg, f.name) for f in _dc.fields(cfg) if not f.metadata.get("internal")}
    out.update(getattr(cfg, "extra_modifier_keys", {}) or {})
    return out

