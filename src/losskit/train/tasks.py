"""The tasks of `losskit train`: one ``TASKS`` table, the config edge that builds a task's config, and the dispatch.

``TASKS`` maps a task name to its ``Task``: the config dataclass (``losskit.train.config``: the keys its runner
reads), the runner (``"module:function"``, imported only when that task runs), a one-line description, and the
built-in loss modifiers it can use (its config has their keys; registered user modifiers come with any of them).

``build_train_config(raw)`` is the one edge between a merged ``{key: value}`` (config files + ``--key=value``,
``losskit.config.load_config``) and a runner: it looks the task up, rejects every key that task does not read
(naming the task, the task that does read it, and the closest valid key), types each value with
``losskit.config.coerce``, parses the modifier keys once into ``ModifierSettings`` (their warnings print here,
once), and returns the task's frozen config. A runner ``run(cfg) -> dict`` returns a summary (at least
``val_loss``) and writes ``out_dir/config.yaml`` (``train_config_to_dict``) and its metrics (``train/loss``,
``val/loss``, the task's own keys) through ``losskit.train.sinks``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from collections.abc import Iterable, Mapping
from typing import Any

from losskit.config import coerce
from losskit.contract import ConfigError
from losskit.modifiers.config_keys import LEGACY_HINTS, parse_modifier_config
from losskit.train.config import (
    DiffusionTrainConfig,
    LMTrainConfig,
    TemporalTrainConfig,
    key_kind,
    task_keys,
)

__all__ = ["TASKS", "Task", "build_train_config", "help_pointer", "run_task", "task_of"]


@dataclasses.dataclass(frozen=True)
class Task:
    """One training task.

    Attributes:
        name: the ``--task`` value.
        config: its frozen config dataclass (every key its runner reads, nothing else).
        runner: ``"module:function"`` of ``run(cfg, **kwargs) -> dict``.
        description: one line for ``losskit train --help``.
        modifiers: the built-in modifiers (class names) it can use; ``()``: it builds no modifier pipeline and
            takes no modifier key.
    """

    name: str
    config: type
    runner: str
    description: str
    modifiers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if tuple(getattr(self.config, "MODIFIERS", ())) != self.modifiers:  # a programming error in the table
            raise TypeError(f"task {self.name!r}: {self.config.__name__} has the keys of modifiers "
                            f"{getattr(self.config, 'MODIFIERS', ())}, the table says {self.modifiers}")

    def fields(self) -> dict[str, dataclasses.Field]:
        """Every key of the task, in declaration order."""
        return task_keys(self.config)

    def run(self, cfg: Any, **kwargs: Any) -> dict:
        module_name, function = self.runner.split(":")
        return getattr(importlib.import_module(module_name), function)(cfg, **kwargs)


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("lm", LMTrainConfig, "losskit.train.lm:run",
         "byte-level Llama decoder on the embedded pydoc corpus (or --data=PATH)",
         ("EntropyModifier", "TargetSmoothingModifier", "MaskRatioWeightModifier")),
    Task("temporal", TemporalTrainConfig, "losskit.train.temporal:run",
         "recurrent conv network on the digits over time: CE + energy (docs/temporal.md)"),
    Task("diffusion", DiffusionTrainConfig, "losskit.train.diffusion:run",
         "MLP denoiser on the digits with SNR loss weightings (docs/diffusion.md)",
         ("SNRWeightModifier",)),
)}


def task_of(raw: Mapping[str, Any]) -> Task:
    """The task a merged config selects (``task``, default ``lm``)."""
    name = coerce("task", raw.get("task", "lm"), "str", choices=tuple(TASKS))
    return TASKS[name]


def help_pointer(task: str) -> str:
    """Where the user reads the keys of ``task``."""
    flag = "" if task == "lm" else f" --task={task}"
    return f"`losskit train{flag} --help` lists every key of task {task!r}"


def _rejection(key: str, task: Task, prefixes: tuple[str, ...]) -> ConfigError:
    """The error for a key ``task`` does not read. A key another task reads names that task (it is no typo, so no
    look-alike key is offered); any other key gets the curated legacy hint or the closest key ``task`` reads."""
    readers = [t.name for t in TASKS.values() if t is not task and key in t.fields()]
    prefix = next((p for p in prefixes if key.startswith(p)), None)
    if readers:
        names = " and ".join(f"'{n}'" for n in readers)
        return ConfigError(f"{key} is not available with task={task.name!r}: only task{'s' if len(readers) > 1 else ''} "
                           f"{names} read{'' if len(readers) > 1 else 's'} it; {help_pointer(task.name)}")
    if prefix is not None:  # only a task without modifiers gets here
        return ConfigError(f"{key} is not available with task={task.name!r}: it configures the registered modifier "
                           f"{prefix!r}, and task {task.name!r} builds no loss-modifier pipeline")
    if key in LEGACY_HINTS:
        return ConfigError(f"unknown config key {key!r}; {LEGACY_HINTS[key]}")
    close = difflib.get_close_matches(key, list(task.fields()), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? (a key of task {task.name!r})" if close else help_pointer(task.name)
    return ConfigError(f"unknown config key {key!r}; {hint}")


def build_train_config(raw: Mapping[str, Any], *, prefixes: Iterable[str] = ()) -> Any:
    """The selected task's frozen config from a merged ``{key: value}`` (config files, then overrides).

    Every key must be one the task reads (``Task.fields()``), or, for a task with modifiers, start with a
    ``register_modifier`` prefix (kept for the factory, see ``extra_modifier_keys``). Values are typed by each key's
    declared kind (``losskit.config.coerce``: strings from the command line and objects from a file alike) and
    range-checked; the modifier keys are then parsed once, with their cross-key checks and warnings, by
    ``losskit.modifiers.config_keys.parse_modifier_config`` into the config's ``modifiers``.

    Raises:
        ConfigError: unknown task; a key the task does not read (naming the task that does, and the closest key
            of this task); a bad type, range or combination.
    """
    raw = dict(raw)
    task = task_of(raw)
    fields = task.fields()
    prefixes = tuple(prefixes)
    accepted = prefixes if task.modifiers else ()  # registered modifiers need a pipeline
    unread = [name for name in raw if name not in fields and not any(name.startswith(p) for p in accepted)]
    if unread:  # every such key at once, so one run of the command shows all of them
        errors = [str(_rejection(name, task, prefixes)) for name in unread]
        if len(errors) == 1:
            raise ConfigError(errors[0])
        pointer = help_pointer(task.name)  # said once, at the end
        errors = [e.removesuffix("; " + pointer).removesuffix(pointer).rstrip("; ") for e in errors]
        raise ConfigError(f"{len(errors)} keys are not read by task {task.name!r}: " + "; ".join(errors)
                          + f"; {pointer}")
    values: dict[str, Any] = {}
    registered: dict[str, Any] = {}
    for name, value in raw.items():
        if name in fields:
            f = fields[name]
            values[name] = coerce(name, value, key_kind(f), choices=f.metadata.get("choices") or (),
                                  check=f.metadata.get("check"), constraint=f.metadata.get("constraint", ""))
        else:  # a registered modifier's key (the check above let it through)
            registered[name] = value
    if task.modifiers:
        modifier_values = {name: values.get(name, _default(f)) for name, f in fields.items()
                           if f.metadata.get("modifier")}
        settings = parse_modifier_config({**modifier_values, **registered}, prefixes=accepted)
        flat = settings.flat()
        values.update({name: flat[name] for name in modifier_values}, modifiers=settings)
    return task.config(**values)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def run_task(cfg: Any, **kwargs: Any) -> dict:
    """Run the task named by ``cfg.task``."""
    return TASKS[cfg.task].run(cfg, **kwargs)
