"""Metric sinks shared by every task: JSONL (always), W&B and TensorBoard (when enabled), the console.

A sink receives ``log(step, {key: float})`` with keys like ``train/loss``, ``val/loss``,
``loss_modifiers/EntropyModifier.mean_entropy``. Only rank 0 logs. ``open_sinks`` builds the set from a task
config (``wandb_log``/``wandb_project``/``wandb_run_name``, ``tensorboard_log``); W&B honours
``WANDB_MODE=offline`` and then needs no network.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
from typing import Any

from losskit.contract import ConfigError

METRICS_FILE = "metrics.jsonl"


class JSONLSink:
    """One JSON object per log call: ``{"step": int, key: value, ...}`` appended to ``out_dir/metrics.jsonl``."""

    def __init__(self, out_dir: str | pathlib.Path, *, append: bool = False) -> None:
        self.path = pathlib.Path(out_dir) / METRICS_FILE
        self._file = open(self.path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": int(step)}
        row.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class WandbSink:
    """Weights & Biases: one ``run.log(metrics, step=step)`` per log call; the resolved config as the run config.

    ``wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=config_dict, dir=...)``. The run
    files go under ``$WANDB_DIR`` when that is set (the user's explicit choice), else under ``cfg.out_dir``
    (``out_dir/wandb/...``), next to the JSONL. With ``WANDB_MODE=offline`` nothing touches the network and
    the run is kept as ``offline-run-*/run-*.wandb`` for a later ``wandb sync``.
    """

    def __init__(self, cfg: Any, config_dict: dict) -> None:
        import wandb

        self._wandb = wandb
        run_dir = os.environ.get("WANDB_DIR") or str(cfg.out_dir)
        self._run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=config_dict,
                               dir=run_dir)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log(dict(metrics), step=int(step))

    def close(self) -> None:
        self._run.finish()


class TensorBoardSink:
    """TensorBoard: one scalar per key (the key is the tag) in event files under ``out_dir/tensorboard``."""

    def __init__(self, out_dir: str | pathlib.Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = pathlib.Path(out_dir) / "tensorboard"
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self._writer.add_scalar(k, v, int(step))
        self._writer.flush()  # a crashed or killed run keeps what it logged

    def close(self) -> None:
        self._writer.close()


class Sinks:
    """Fan-out to every enabled sink."""

    def __init__(self, sinks: list) -> None:
        self.sinks = sinks

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for s in self.sinks:
            s.log(step, metrics)

    def close(self) -> None:
        """Close every sink, even when one fails (the first failure is re-raised after the rest closed)."""
        error = None
        for s in self.sinks:
            try:
                s.close()
            except Exception as exc:  # noqa: BLE001 - keep closing the others, then report
                error = error or exc
        if error is not None:
            raise error


def _require(module: str, key: str) -> None:
    """A clear ``ConfigError`` when the optional package behind ``key=True`` is not installed."""
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{key}=True needs the {module} package, which is not installed; "
                          f"pip install 'losskit[tracking]' or set {key}=False")


def open_sinks(cfg: Any, config_dict: dict, *, append: bool = False, enabled: bool = True) -> Sinks:
    """JSONL always, plus TensorBoard / W&B per ``cfg``; an empty fan-out on ranks other than 0.

    The optional packages are checked before any file is opened, and a sink that fails to open closes the
    ones opened before it, so a bad setting leaves no half-written metrics behind.
    """
    if not enabled:
        return Sinks([])
    if cfg.tensorboard_log:
        _require("tensorboard", "tensorboard_log")
    if cfg.wandb_log:
        _require("wandb", "wandb_log")
    opened: list = []
    try:
        opened.append(JSONLSink(cfg.out_dir, append=append))
        if cfg.tensorboard_log:
            opened.append(TensorBoardSink(cfg.out_dir))
        if cfg.wandb_log:
            opened.append(WandbSink(cfg, config_dict))
    except BaseException:
        Sinks(opened).close()
        raise
    return Sinks(opened)


def _parse_rows(path: pathlib.Path) -> list[dict]:
    """The rows of a metrics file; a last line cut off by a killed writer is skipped, any other bad line is an
    error naming the file and line."""
    lines = path.read_text(encoding="utf-8").split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: the write was interrupted
                continue
            raise ConfigError(f"{path}: line {number} is not a JSON object: {line[:80]!r}") from None
    return rows


def read_metrics(run_dir: str | pathlib.Path) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl`` (for plot and compare)."""
    path = pathlib.Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a `losskit train` run directory")
    return _parse_rows(path)


def truncate_metrics(run_dir: str | pathlib.Path, *, last_step: int) -> int:
    """Keep only the rows of ``run_dir/metrics.jsonl`` with ``step <= last_step``; returns how many were dropped.

    A resumed run calls this with its checkpoint's iteration: the rows a killed run logged after that checkpoint
    are dropped (the resumed run logs those steps again), so the file keeps one row per step and kind. The file
    is rewritten through a temporary file and an atomic rename; a missing file is left missing.
    """
    path = pathlib.Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    rows = _parse_rows(path)
    kept = [r for r in rows if int(r.get("step", 0)) <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)
    return len(rows) - len(kept)


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of one key over the rows that have it."""
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]
