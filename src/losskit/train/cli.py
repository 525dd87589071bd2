"""`losskit train [CONFIG.py|CONFIG.yaml ...] [--key=value ...]` (and the root ``train.py`` shim).

Config files are applied in order, then the ``--key=value`` overrides; the merged result is typed and
validated once (``losskit.config.build_train_config``), so every problem is reported before training starts.
``--help`` lists every key of the selected task (``--task=NAME --help``) with its default.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import textwrap

from losskit.config import (
    TRAIN_CONFIGS,
    CommonTrainConfig,
    build_train_config,
    load_config,
    train_config_keys,
)
from losskit.contract import ConfigError, LossInputError
from losskit.train.runtime import exit_process, native_threads_left
from losskit.train.tasks import TASK_DESCRIPTIONS, run_task


def registered_prefixes() -> tuple[str, ...]:
    """Prefixes of user modifiers registered with ``losskit.modifiers.register_modifier``."""
    from losskit.modifiers import registered_modifiers

    return tuple(registered_modifiers())


HELP_COLUMN = 45


def help_text(task: str = "lm") -> str:
    """Usage plus one line per key of ``task``: name, default, meaning (common keys, task keys, modifiers)."""
    cls = TRAIN_CONFIGS[task]
    fields = train_config_keys(cls)
    lines = [
        "usage: losskit train [CONFIG.py|CONFIG.yaml ...] [--key=value ...]",
        "       python train.py [CONFIG ...] [--key=value ...]      (the same command)",
        "       torchrun --nproc_per_node=N -m losskit train ...      (DDP: gloo on CPU, nccl on GPU)",
        "",
        "Config files (python: module-level names; YAML: a flat mapping) apply in order, then --key=value.",
        "Unknown keys are errors. `losskit train --task=NAME --help` shows that task's keys and defaults.",
        "",
        "tasks:",
    ]
    lines += [f"  {name:<10} {desc}" for name, desc in TASK_DESCRIPTIONS.items()]
    common = {f.name for f in dataclasses.fields(CommonTrainConfig)}
    groups = [
        (f"common keys (defaults of task {task!r})", [f for f in fields.values() if f.name in common]),
        (f"keys of task {task!r}", [f for f in fields.values()
                                   if f.name not in common and not f.metadata.get("modifier")]),
        ("loss-modifier keys (`losskit modifiers` explains them; docs/modifiers.md)",
         [f for f in fields.values() if f.metadata.get("modifier")]),
    ]
    width = max(shutil.get_terminal_size((100, 24)).columns, 60)
    for title, group in groups:
        if not group:
            continue
        lines += ["", title + ":"]
        for f in group:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            head = f"  --{f.name}={default!r}"
            # the help column starts at 45 and wraps under itself to the terminal's width
            wrapped = textwrap.wrap(f.metadata.get("help", ""), width - HELP_COLUMN) or [""]
            if len(head) < HELP_COLUMN - 1:
                lines.append(f"{head:<{HELP_COLUMN - 1}} {wrapped[0]}".rstrip())
            else:
                lines += [head, " " * HELP_COLUMN + wrapped[0]]
            lines += [" " * HELP_COLUMN + more for more in wrapped[1:]]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    argv = list(argv)
    if any(a in ("-h", "--help") for a in argv):
        task = next((a.split("=", 1)[1] for a in argv if a.startswith("--task=")), "lm")
        print(help_text(task if task in TRAIN_CONFIGS else "lm"))
        return 0
    code = 0
    try:
        cfg = build_train_config(load_config(argv), prefixes=registered_prefixes())
        run_task(cfg)
    except (ConfigError, LossInputError) as exc:
        print(f"losskit train: error: {exc}", file=sys.stderr)
        code = 2
    if native_threads_left():  # a DDP run (torchrun): see losskit.train.runtime.teardown_runtime
        exit_process(code)
    return code
