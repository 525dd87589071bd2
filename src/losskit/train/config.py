"""What each training task reads: one frozen config dataclass per task, built from shared groups of keys.

A key belongs to a task only if that task's runner reads it, so a key a task does not read is an error (the edge,
``losskit.train.tasks.build_train_config``, says which task does read it). The groups::

    CommonTrainConfig    every task: task, out_dir, seed, device, batch_size, learning_rate, the metric sinks
    StepScheduleConfig   lm and diffusion: max_iters, eval/log intervals, AdamW, grad_clip, warm-up + cosine decay
    NumThreadsConfig     temporal and diffusion: torch's CPU threads
    modifier_keys(...)   lm and diffusion: the flat keys of the built-in modifiers the task can use (from
                         ``losskit.modifiers.config_keys.MODIFIER_CONFIG_KEYS``) plus ``modifiers``, the
                         ``ModifierSettings`` parsed from them once, which the runner hands to the factory

    LMTrainConfig        = Common + StepSchedule + modifiers (entropy, smoothing, mask ratio) + the lm keys
    TemporalTrainConfig  = Common + NumThreads + the temporal keys (no loss modifiers: no pipeline)
    DiffusionTrainConfig = Common + StepSchedule + NumThreads + modifiers (SNR weighting) + the diffusion keys

Every field carries its help line (``losskit train --help``), its kind (how ``losskit.config.coerce`` types it),
and its range or choices. Cross-key checks run in ``__post_init__``, so no config object with contradictory
values exists. Names follow nanoGPT where nanoGPT has one (docs/training.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

from losskit.contract import ConfigError
from losskit.modifiers.config_keys import (
    MASTER_SWITCH,
    MODIFIER_CONFIG_KEYS,
    ModifierSettings,
    parse_modifier_config,
    section,
)

__all__ = [
    "CommonTrainConfig",
    "DiffusionTrainConfig",
    "LMTrainConfig",
    "NumThreadsConfig",
    "StepScheduleConfig",
    "TemporalTrainConfig",
    "key",
    "key_kind",
    "modifier_keys",
    "own_default",
    "task_keys",
    "train_config_to_dict",
]


def key(default: Any, help: str, *, choices: tuple = (), check: Callable[[Any], bool] | None = None,
        constraint: str = "") -> Any:
    """A config field: its default, help line and optional choices / range check (its kind is its annotation)."""
    return _field(default, {"help": help, "choices": choices, "check": check, "constraint": constraint})


def _field(default: Any, metadata: dict) -> Any:
    """The dataclass field of every key: a list or dict default is copied for each config (not shared)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def own_default(group: type, name: str, default: Any, help: str | None = None) -> Any:
    """A task's own default for the key ``name`` of ``group``: the group's help line (unless ``help`` says
    what the key means in this task), kind and range, declared once there."""
    meta = dict(group.__dataclass_fields__[name].metadata)
    meta["help"] = help or meta["help"]
    return _field(default, meta)


# Range presets for `key`: the predicate and the text its error message quotes, side by side.
_POS = {"check": lambda v: v > 0, "constraint": "> 0"}
_NONNEG = {"check": lambda v: v >= 0, "constraint": ">= 0"}
_UNIT = {"check": lambda v: 0 <= v < 1, "constraint": "in [0, 1)"}


def key_kind(field: dataclasses.Field) -> str:
    """How ``losskit.config.coerce`` types a field: its declared ``kind``, else its annotation (``"int|None"``)."""
    return field.metadata.get("kind") or str(field.type).replace(" ", "")


def task_keys(cls: type) -> dict[str, dataclasses.Field]:
    """The user-settable fields of a task config dataclass, in declaration order."""
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def train_config_to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as a flat dict (what ``config.yaml`` holds), registered-modifier keys inlined."""
    out = {name: getattr(cfg, name) for name in task_keys(type(cfg))}
    out.update(getattr(cfg, "extra_modifier_keys", {}))
    return out


# ------------------------------------------------------------------------------------------------------------
# Key groups
# ------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CommonTrainConfig:
    """The keys every task reads (each task overrides some defaults)."""

    task: str = key("lm", "training task: 'lm', 'temporal' or 'diffusion'")
    out_dir: str | None = key(None, "run directory (config.yaml, metrics.jsonl, ...); unset = a new out/<task>/run-N "
                              "with out/<task>/latest pointing at it; DIR = exactly DIR, never replacing a run "
                              "already there")
    seed: int = key(1337, "random seed (model init, data order)")
    device: str = key("auto", "'auto' (cuda if available), 'cpu', 'cuda', 'cuda:N', 'mps'")
    batch_size: int = key(16, "sequences per micro-batch", **_POS)
    learning_rate: float = key(3e-3, "peak learning rate (AdamW)", **_POS)
    wandb_log: bool = key(False, "log to Weights & Biases (works with WANDB_MODE=offline)")
    wandb_project: str = key("losskit", "W&B project")
    wandb_run_name: str = key("run", "W&B run name")
    tensorboard_log: bool = key(False, "write TensorBoard event files into out_dir/tensorboard")


@dataclasses.dataclass(frozen=True)
class StepScheduleConfig:
    """Step-based training (lm, diffusion): iterations, AdamW, clipping, nanoGPT's warm-up + cosine schedule."""

    max_iters: int = key(500, "optimizer steps of the whole run; on resume, a value below the checkpoint's "
                         "iteration is an error (nothing is written) and an equal one trains nothing", **_NONNEG)
    eval_interval: int = key(250, "evaluate val/loss every this many steps (and at the end)", **_POS)
    log_interval: int = key(25, "console line and metric sinks every this many steps", **_POS)
    weight_decay: float = key(0.1, "AdamW weight decay (matrices only)", **_NONNEG)
    beta1: float = key(0.9, "AdamW beta1", **_UNIT)
    beta2: float = key(0.99, "AdamW beta2", **_UNIT)
    grad_clip: float = key(1.0, "clip the global gradient norm (0 = off)", **_NONNEG)
    decay_lr: bool = key(True, "cosine learning-rate decay after warmup")
    warmup_iters: int = key(50, "linear warmup steps", **_NONNEG)
    lr_decay_iters: int | None = key(None, "end of the cosine decay (None = max_iters)", check=lambda v: v >= 0,
                                     constraint=">= 0 or None")
    min_lr: float = key(3e-4, "learning rate at the end of the decay", **_NONNEG)


def check_schedule(cfg: Any) -> None:
    """Cross-key check of ``StepScheduleConfig``: the decay ends at or below the peak."""
    if cfg.min_lr > cfg.learning_rate:
        raise ConfigError(f"min_lr must be <= learning_rate ({cfg.learning_rate!r}), got {cfg.min_lr!r}")


@dataclasses.dataclass(frozen=True)
class NumThreadsConfig:
    """torch's intra-op threads on CPU (temporal, diffusion). *Why one by default:* every op of these tasks is
    tiny; on a 2-core machine shared with other processes, two spinning OpenMP threads made a temporal step 30x
    slower (1.4 s instead of 45 ms)."""

    num_threads: int | None = key(1, "torch intra-op threads on CPU (None = torch's default)", **_POS)


def modifier_keys(*owners: str, **defaults: Any) -> type:
    """A frozen dataclass mixin with the flat keys of the built-in modifiers ``owners`` (class names) and the
    master switch, typed and checked as ``MODIFIER_CONFIG_KEYS`` declares them (``defaults`` overrides a default),
    plus ``modifiers``: their ``ModifierSettings``, parsed once at the edge.

    ``MODIFIERS`` (a class attribute) names the built-ins; the registered user modifiers come with them.
    """
    names = [MASTER_SWITCH] + [name for owner in owners for name in section(owner)]
    fields: list[tuple[str, Any, Any]] = []
    for name in names:
        spec = MODIFIER_CONFIG_KEYS[name]
        default = defaults.pop(name, spec.default)
        meta = {"help": spec.help, "kind": spec.type, "choices": spec.choices, "constraint": spec.constraint,
                "check": spec.check, "modifier": True}
        fields.append((name, Any, _field(default, meta)))
    if defaults:
        raise TypeError(f"modifier_keys: {sorted(defaults)} are not keys of {owners}")
    fields.append(("modifiers", ModifierSettings | None,
                   dataclasses.field(default=None, repr=False, compare=False, metadata={"internal": True})))
    cls = dataclasses.make_dataclass("ModifierKeys", fields, bases=(_ModifierKeys,), frozen=True)
    cls.MODIFIERS = owners
    return cls


class _ModifierKeys:
    """What every ``modifier_keys`` mixin shares: the settings bound to the flat keys, and the registered keys."""

    MODIFIERS: ClassVar[tuple[str, ...]] = ()

    def _bind_modifier_settings(self) -> None:
        """Parse the flat keys when the config is built directly (``LMTrainConfig(...)``: no warnings, which are the
        command line's), else check that the given settings are those of the flat keys."""
        flat = {name: getattr(self, name) for name, f in task_keys(type(self)).items() if f.metadata.get("modifier")}
        if self.modifiers is None:
            settings = parse_modifier_config(flat, warn=False)
            object.__setattr__(self, "modifiers", settings)
            parsed = settings.flat()
            for name in flat:  # the typed values ("0,1" -> [0, 1])
                object.__setattr__(self, name, parsed[name])
            return
        parsed = self.modifiers.flat()
        wrong = sorted(k for k, v in flat.items() if parsed[k] != v)
        if wrong:  # a programming error: dataclasses.replace of a modifier key keeps the old settings
            raise TypeError(f"{type(self).__name__}: modifiers disagree with {wrong}; build the config with "
                            "losskit.train.tasks.build_train_config, which parses them together")

    @property
    def extra_modifier_keys(self) -> dict[str, Any]:
        """The keys of registered user modifiers (``register_modifier`` prefixes), flat, as parsed."""
        return {prefix + k: v for prefix, sub in self.modifiers.registered for k, v in sub.items()}


# ------------------------------------------------------------------------------------------------------------
# The tasks
# ------------------------------------------------------------------------------------------------------------

_ENTROPY, _SMOOTHING, _MASK_RATIO, _SNR = ("EntropyModifier", "TargetSmoothingModifier", "MaskRatioWeightModifier",
                                           "SNRWeightModifier")


@dataclasses.dataclass(frozen=True)
class LMTrainConfig(modifier_keys(_ENTROPY, _SMOOTHING, _MASK_RATIO), StepScheduleConfig, CommonTrainConfig):
    """Task `lm` (default): the byte-level Llama decoder on the embedded corpus (``losskit.train.lm``)."""

    init_from: str = key("scratch", "'scratch' or 'resume': continue out_dir (a run directory, or the latest run of a "
                         "task folder; unset = out/lm/latest) from its ckpt.pt", choices=("scratch", "resume"))
    eval_iters: int = key(20, "validation batches per evaluation", **_POS)
    eval_only: bool = key(False, "evaluate once and exit (nanoGPT); with init_from=resume the run directory is left "
                          "unchanged")
    always_save_checkpoint: bool = key(False, "save at every eval, not only when val/loss improves")
    dataset: str = key("pydoc_topics", "'pydoc_topics' (embedded corpus) or 'custom_text' (your own text)",
                       choices=("pydoc_topics", "custom_text"))
    data: str | None = key(None, "path of your own .txt file or folder of .txt files")
    gradient_accumulation_steps: int = key(1, "micro-batches per optimizer step (per process)", **_POS)
    block_size: int = key(128, "sequence length (tokens)", **_POS)
    n_layer: int = key(4, "transformer blocks", **_POS)
    n_head: int = key(4, "attention heads", **_POS)
    n_kv_head: int | None = key(None, "key/value heads for grouped-query attention (None = n_head)")
    n_embd: int = key(128, "model width", **_POS)
    dropout: float = key(0.0, "attention dropout", **_UNIT)
    bias: bool = key(False, "biases in linear layers (export: attention_bias and mlp_bias)")
    backend: str = key("auto", "DDP backend: 'auto' (nccl on CUDA, else gloo), 'nccl', 'gloo'",
                       choices=("auto", "nccl", "gloo"))
    dtype: str = key("auto", "'auto' (bf16 autocast on CUDA, float32 on CPU), 'float32', 'bfloat16'",
                     choices=("auto", "float32", "bfloat16"))
    compile: bool = key(False, "torch.compile the model")
    loss_normalize: str = key("global_tokens", "'global_tokens' (split-invariant) or 'tokens' (nanoGPT mean)",
                              choices=("global_tokens", "tokens"))
    on_nonfinite_logits: str = key("error", "'error' or 'skip_step' (zero grads, skip, count)",
                                   choices=("error", "skip_step"))

    def __post_init__(self) -> None:
        self._bind_modifier_settings()
        check_schedule(self)
        kv = self.n_kv_head or self.n_head
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ConfigError(
                f"n_embd must be divisible by n_head into an even head size, got n_embd={self.n_embd}, "
                f"n_head={self.n_head}"
            )
        if self.n_head % kv:
            raise ConfigError(f"n_kv_head must divide n_head ({self.n_head}), got {kv}")


@dataclasses.dataclass(frozen=True)
class TemporalTrainConfig(NumThreadsConfig, CommonTrainConfig):
    """Task `temporal` (docs/temporal.md): the recurrent digits network with energy loss (``losskit.train.temporal``);
    Adam at a constant rate, one pass over the training digits per epoch."""

    task: str = own_default(CommonTrainConfig, "task", "temporal")
    batch_size: int = own_default(CommonTrainConfig, "batch_size", 64, "images per batch")
    learning_rate: float = own_default(CommonTrainConfig, "learning_rate", 3e-3, "Adam learning rate")
    seed: int = own_default(CommonTrainConfig, "seed", 0, "random seed")
    device: str = own_default(CommonTrainConfig, "device", "cpu")
    epochs: int = key(30, "training epochs", **_POS)
    n_timesteps: int = key(8, "timesteps per presentation", **_POS)
    pattern: str = key("1011", "presentation pattern of stimulus (1) and null (0) steps")
    dt: float = key(2.0, "integration step", **_POS)
    loss_reaction_time: float = key(2.0, "reaction time masked out of the loss", **_NONNEG)
    tau: float = key(4.0, "time constant (leak alpha = dt/tau, 0 < alpha <= 1)", **_POS)
    noise_std: float = key(0.5, "stimulus noise standard deviation", **_NONNEG)
    channels: int = key(16, "feature channels", **_POS)
    criterion: list | None = key(None, "weighted loss list (docs/temporal.md); None = CE + 0.05 energy")
    energy_weight: float | None = key(None, "overrides the weight of the energy_loss criterion entry")
    allow_no_supervision: bool = key(False, "train even when pattern, dt and loss_reaction_time leave no timestep "
                                     "with a label (otherwise a start-up error)")


@dataclasses.dataclass(frozen=True)
class DiffusionTrainConfig(modifier_keys(_SNR, loss_modifiers_enabled=True), NumThreadsConfig, StepScheduleConfig,
                           CommonTrainConfig):
    """Task `diffusion` (docs/diffusion.md): an MLP denoiser on the digits with SNR loss weightings
    (``losskit.train.diffusion``); the master switch is on, so ``--loss_weighting=NAME`` alone selects one."""

    task: str = own_default(CommonTrainConfig, "task", "diffusion")
    batch_size: int = own_default(CommonTrainConfig, "batch_size", 128, "images per batch")
    learning_rate: float = own_default(CommonTrainConfig, "learning_rate", 2e-3, "AdamW learning rate")
    weight_decay: float = own_default(StepScheduleConfig, "weight_decay", 0.0, "AdamW weight decay (all parameters)")
    warmup_iters: int = own_default(StepScheduleConfig, "warmup_iters", 100)
    min_lr: float = own_default(StepScheduleConfig, "min_lr", 0.0)
    max_iters: int = own_default(StepScheduleConfig, "max_iters", 3000, "optimizer steps")
    log_interval: int = own_default(StepScheduleConfig, "log_interval", 100, "bucket metrics and console line interval")
    eval_interval: int = own_default(StepScheduleConfig, "eval_interval", 1000,
                                     "eval x0-MSE interval (also at step 0 and the end)")
    schedule: str = key("cosine", "noise schedule", choices=("cosine", "linear", "scaled_linear", "flow"))
    num_timesteps: int = key(1000, "diffusion timesteps T", **_POS)
    zero_terminal_snr: bool = key(False, "rescale the VP schedule to SNR 0 at t = T-1")
    model_width: int = key(256, "denoiser MLP width", **_POS)
    model_depth: int = key(3, "residual blocks", **_POS)
    diffusion_buckets: int = key(10, "timestep buckets for logging and eval", **_POS)
    sample_steps: int = key(100, "DDIM / Euler sampling steps", **_POS)

    def __post_init__(self) -> None:
        self._bind_modifier_settings()
        check_schedule(self)
        flow_space, flow_schedule = self.prediction_type == "flow", self.schedule == "flow"
        if flow_space != flow_schedule:
            raise ConfigError(
                "prediction_type='flow' and schedule='flow' require each other, got "
                f"prediction_type={self.prediction_type!r}, schedule={self.schedule!r}"
            )
        if self.zero_terminal_snr and flow_schedule:
            raise ConfigError("zero_terminal_snr applies to VP schedules only, got schedule='flow'")
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            raise ConfigError(
                "zero_terminal_snr=True with prediction_type='epsilon': x0 cannot be recovered from ε at α = 0; use "
                "v_prediction or sample"
            )
