"""Metric sinks shared by every task: JSONL (always), W&B and TensorBoard (when enabled), the console.

A sink receives ``log(step, {key: float})`` with keys like ``train/loss``, ``val/loss``,
``loss_modifiers/EntropyModifier.mean_entropy``. Only rank 0 logs. ``open_sinks`` builds the set from a task
config (``wandb_log``/``wandb_project``/``wandb_run_name``, ``tensorboard_log``); W&B honours
``WANDB_MODE=offline`` and then needs no network.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

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
    def __init__(self, cfg: Any, config_dict: dict) -> None:
        try:
            import wandb
        except ImportError as exc:  # the `tracking` extra
            raise ImportError("wandb_log=True needs wandb: pip install 'losskit[tracking]'") from exc
        self._wandb = wandb
        self._run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=config_dict,
                               dir=str(cfg.out_dir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log(dict(metrics), step=int(step))

    def close(self) -> None:
        self._run.finish()


class TensorBoardSink:
    def __init__(self, out_dir: str | pathlib.Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # the `tracking` extra
            raise ImportError("tensorboard_log=True needs tensorboard: pip install 'losskit[tracking]'") from exc
        self._writer = SummaryWriter(log_dir=str(pathlib.Path(out_dir) / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self._writer.add_scalar(k, v, int(step))
        self._writer.flush()

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
        for s in self.sinks:
            s.close()


def open_sinks(cfg: Any, config_dict: dict, *, append: bool = False, enabled: bool = True) -> Sinks:
    """JSONL always, plus W&B / TensorBoard per ``cfg``; an empty fan-out on ranks other than 0."""
    if not enabled:
        return Sinks([])
    sinks: list = [JSONLSink(cfg.out_dir, append=append)]
    if cfg.tensorboard_log:
        sinks.append(TensorBoardSink(cfg.out_dir))
    if cfg.wandb_log:
        sinks.append(WandbSink(cfg, config_dict))
    return Sinks(sinks)


def read_metrics(run_dir: str | pathlib.Path) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl`` (for plot and compare)."""
    path = pathlib.Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a `losskit train` run directory")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of one key over the rows that have it."""
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]
