"""`losskit train [CONFIG.py|CONFIG.yaml ...] [--key=value ...]` (and the root ``train.py`` shim).

Config files are applied in order, then the ``--key=value`` overrides; the merged result is typed and
validated once (``losskit.train.tasks.build_train_config``), so every problem is reported before training starts.
``--help`` lists every key of the selected task (``--task=NAME --help``; default lm) with that task's default,
grouped by which tasks read it.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import textwrap

from losskit.config import load_config
from losskit.contract import ConfigError, LossInputError
from losskit.train.runtime import exit_process, native_threads_left
from losskit.train.tasks import TASKS, build_train_config, run_task


def registered_prefixes() -> tuple[str, ...]:
    """Prefixes of user modifiers registered with ``losskit.modifiers.register_modifier``."""
    from losskit.modifiers import registered_modifiers

    return tuple(registered_modifiers())


HELP_COLUMN = 45


def _key_groups(task: str) -> list[tuple[str, list[dataclasses.Field]]]:
    """The keys of ``task`` grouped by which tasks read them: every task, some tasks, this task only, modifiers."""
    groups: dict[str, list[dataclasses.Field]] = {}
    spec = TASKS[task]
    for f in spec.fields().values():
        readers = [name for name, t in TASKS.items() if f.name in t.fields()]
        if f.metadata.get("modifier"):
            title = (f"loss-modifier keys of task {task!r}: {', '.join(spec.modifiers)} and registered modifiers "
                     "(`losskit modifiers` explains them; docs/modifiers.md)")
        elif len(readers) == len(TASKS):
            title = f"keys of every task (defaults of task {task!r})"
        elif len(readers) > 1:
            title = f"keys of tasks {' and '.join(repr(r) for r in readers)}"
        else:
            title = f"keys of task {task!r} only"
        groups.setdefault(title, []).append(f)
    order = ("keys of every", "keys of tasks", "keys of task", "loss-modifier")
    return sorted(groups.items(), key=lambda item: next(i for i, o in enumerate(order) if item[0].startswith(o)))


def help_text(task: str = "lm") -> str:
    """Usage plus one line per key of ``task``: name, the task's default, meaning (grouped by ``_key_groups``)."""
    width = max(shutil.get_terminal_size((100, 24)).columns, 60)
    intro = (f"Config files (python: module-level names; YAML: a flat mapping) apply in order, then --key=value. "
             f"Each task takes only the keys it reads; any other key is an error. These are the keys of task "
             f"{task!r}; `losskit train --task=NAME --help` shows another task's keys and defaults.")
    lines = [
        "usage: losskit train [CONFIG.py|CONFIG.yaml ...] [--key=value ...]",
        "       python train.py [CONFIG ...] [--key=value ...]      (the same command)",
        "       torchrun --nproc_per_node=N -m losskit train ...      (DDP: gloo on CPU, nccl on GPU)",
        "",
        *textwrap.wrap(intro, width),
        "",
        "tasks:",
    ]
    lines += [f"  {name:<10} {t.description}" for name, t in TASKS.items()]
    for title, group in _key_groups(task):
        lines += [""] + textwrap.wrap(title + ":", width)
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
        print(help_text(task if task in TASKS else "lm"))
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
