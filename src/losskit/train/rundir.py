"""Run directories: every new run gets its own, so no run ever replaces an earlier run's checkpoint.

Layout (as Lightning's ``version_N``)::

    out/<task>/run-1/      config.yaml, metrics.jsonl, ckpt.pt, ... of the first run
    out/<task>/run-2/
    out/<task>/latest  ->  run-2   (a symlink to the newest run)

* ``out_dir`` unset (the default): a new ``out/<task>/run-<N>``, ``N`` one more than the highest there. The
  directory is claimed with ``os.mkdir``, which fails if it exists, so two runs started at the same moment never
  share one (the loser takes the next number).
* ``out_dir=DIR``: exactly ``DIR``. A fresh run refuses a ``DIR`` that already holds a run (its ``ckpt.pt`` or
  ``metrics.jsonl``) instead of overwriting it.
* ``init_from=resume``: continues ``DIR`` if it is a run directory, or the latest run of a task folder (``out_dir``
  unset means ``out/<task>``). ``losskit plot``, ``sample`` and ``export`` accept a task folder the same way
  (``find_run_dir``).
"""

from __future__ import annotations

import os
import pathlib
import re
import threading

from losskit.contract import ConfigError

__all__ = [
    "LATEST",
    "OUT_ROOT",
    "RUN_MARKERS",
    "claim_run_dir",
    "find_run_dir",
    "holds_run",
    "prepare_run_dir",
    "resolve_out_dir",
    "run_numbers",
    "task_folder",
]

OUT_ROOT = pathlib.Path("out")
LATEST = "latest"
_RUN = re.compile(r"^run-(\d+)$")
#: Files whose presence makes a directory a run directory.
RUN_MARKERS = ("ckpt.pt", "metrics.jsonl")


def task_folder(task: str) -> pathlib.Path:
    """``out/<task>``: where the numbered runs of ``task`` go (relative to the working directory)."""
    return OUT_ROOT / task


def holds_run(path: str | pathlib.Path) -> bool:
    """True when ``path`` is a run directory: it holds a checkpoint or a metrics file."""
    p = pathlib.Path(path)
    return any((p / name).is_file() for name in RUN_MARKERS)


def run_numbers(folder: str | pathlib.Path) -> list[int]:
    """The ``N`` of every ``run-N`` directory in ``folder``, ascending."""
    p = pathlib.Path(folder)
    if not p.is_dir():
        return []
    return sorted(int(m.group(1)) for e in p.iterdir() if (m := _RUN.match(e.name)) and e.is_dir())


def claim_run_dir(folder: str | pathlib.Path) -> pathlib.Path:
    """Create and return a new ``folder/run-N`` (the next free number) and point ``folder/latest`` at the newest.

    ``os.mkdir`` is atomic: when another process claims the same number first, this one takes the next.
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = max(run_numbers(folder), default=0) + 1
    while True:
        path = folder / f"run-{n}"
        try:
            os.mkdir(path)
            break
        except FileExistsError:
            n += 1
    _point_latest(folder)
    return path


def _point_latest(folder: pathlib.Path) -> None:
    """``folder/latest`` -> the highest ``run-N`` (a relative symlink, replaced atomically).

    Concurrent claimers can interleave (one computes the highest number, another claims a higher one and updates
    the link, then the first overwrites it), so each writer re-reads the highest number after its write and writes
    again until they agree: the last write is then always the highest run.
    """
    link = folder / LATEST
    tmp = folder / f".{LATEST}.{os.getpid()}.{threading.get_ident()}"
    written = None
    while True:
        newest = max(run_numbers(folder))
        if newest == written:
            return
        try:
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
            os.symlink(f"run-{newest}", tmp, target_is_directory=True)
            os.replace(tmp, link)
        except OSError:  # a file system without symlinks: readers fall back to the highest run-N
            if tmp.is_symlink():
                tmp.unlink()
            return
        written = newest


def find_run_dir(path: str | pathlib.Path) -> pathlib.Path:
    """The run directory that ``path`` names: ``path`` itself if it holds a run, else the latest run of the task
    folder ``path`` (its ``latest`` link, or its highest ``run-N``).

    Raises:
        FileNotFoundError: ``path`` is neither a run directory nor a task folder with runs.
    """
    p = pathlib.Path(path)
    if holds_run(p):
        return p
    link = p / LATEST
    if link.is_symlink() and (p / os.readlink(link)).is_dir():
        return p / os.readlink(link)
    numbers = run_numbers(p)
    if numbers:
        return p / f"run-{numbers[-1]}"
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist: expected a run directory or a task folder such as out/lm")
    raise FileNotFoundError(
        f"{p} is neither a run directory (no {' or '.join(RUN_MARKERS)}) nor a task folder holding run-N "
        "directories (such as out/lm)"
    )


def resolve_out_dir(task: str, out_dir: str | None, init_from: str = "scratch") -> str | None:
    """The ``out_dir`` a run uses, checked before anything is written (``None``: claim a new numbered run later).

    ``init_from="resume"`` (task lm, the one task that writes a checkpoint) continues a run; the other tasks have
    no ``init_from`` key and always start one.

    Raises:
        ConfigError: resume without a run to continue, or a fresh run into a directory that holds one.
    """
    if init_from == "resume":
        where = pathlib.Path(out_dir) if out_dir is not None else task_folder(task)
        try:
            return str(find_run_dir(where))
        except FileNotFoundError as exc:
            hint = "" if out_dir is not None else " (out_dir is unset, so the latest run of task folder " \
                f"{where} is resumed)"
            raise ConfigError(f"init_from='resume' needs a run to continue: {exc}{hint}") from None
    if out_dir is not None and holds_run(out_dir):
        resume = ("pass --init_from=resume to continue it, " if task == "lm" else
                  f"(task {task!r} cannot resume: only task 'lm' takes --init_from=resume) ")
        raise ConfigError(
            f"out_dir={out_dir!r} already holds a run (its {' or '.join(RUN_MARKERS)}), which a new run would "
            f"replace: {resume}choose another --out_dir, or leave out_dir unset for a new numbered run under "
            f"{task_folder(task)}/"
        )
    return out_dir


def prepare_run_dir(task: str, out_dir: str | None) -> pathlib.Path:
    """Create the run directory at the moment a task first writes: ``out_dir`` itself, or a new numbered run."""
    if out_dir is None:
        return claim_run_dir(task_folder(task))
    path = pathlib.Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path
