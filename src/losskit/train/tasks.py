"""The task registry of `losskit train`: task name -> config dataclass and run function.

Each task module exposes ``run(cfg) -> dict`` taking its config dataclass from ``losskit.config``
(``LMTrainConfig``, ``TemporalTrainConfig``, ``DiffusionTrainConfig``: common keys with the task's defaults,
its own keys, the modifier keys) and returning a summary (at least ``val_loss``). A task writes:

* ``out_dir/config.yaml`` via ``losskit.train.runtime.save_resolved_config`` (after all validation, so bad
  input leaves nothing half-written);
* its metrics through ``losskit.train.sinks.open_sinks(cfg, config_dict)``: ``train/loss``, ``val/loss``
  (the task's primary validation metric, which ``losskit compare`` reads) and its own keys.
"""

from __future__ import annotations

import importlib
from typing import Any

from losskit.config import TRAIN_CONFIGS

#: task -> "module:function" of its run function (imported only when that task runs).
TASK_RUNNERS: dict[str, str] = {
    "lm": "losskit.train.lm:run",
    "temporal": "losskit.train.temporal:run",
    "diffusion": "losskit.train.diffusion:run",
}

TASK_DESCRIPTIONS: dict[str, str] = {
    "lm": "byte-level Llama decoder on the embedded pydoc corpus (or --data=PATH)",
    "temporal": "recurrent conv network on the digits over time: CE + energy (docs/temporal.md)",
    "diffusion": "MLP denoiser on the digits with SNR loss weightings (docs/diffusion.md)",
}

assert set(TASK_RUNNERS) == set(TRAIN_CONFIGS)


def run_task(cfg: Any, **kwargs: Any) -> dict:
    """Run the task named by ``cfg.task``."""
    module_name, fn = TASK_RUNNERS[cfg.task].split(":")
    return getattr(importlib.import_module(module_name), fn)(cfg, **kwargs)
