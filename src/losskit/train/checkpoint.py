"""Checkpoints of a run directory: atomic saves, a clear error for an unreadable file, and RNG states.

A save writes ``ckpt.pt.tmp`` and renames it over ``ckpt.pt`` (``os.replace`` is atomic on one file system), so a
process killed while saving leaves the previous ``ckpt.pt`` intact plus a stale ``ckpt.pt.tmp``, which the next start
in that directory removes. A ``ckpt.pt`` that cannot be read (truncated by a full disk or a partial copy, or not a
torch file) is a ``ConfigError`` naming the file, so the command line prints one line and exits with status 2.

``capture_rng_state`` / ``restore_rng_state`` carry every global random-number generator a training step may draw
from (torch's CPU generator, which dropout uses on CPU, every CUDA device's generator, Python's ``random`` and, when
numpy is loaded, numpy's legacy global generator), so a resumed run draws the same dropout masks as an uninterrupted
one. Generators owned by the trainer (the batch sampler's) are saved by their owners.
"""

from __future__ import annotations

import os
import pathlib
import random
import sys
from collections.abc import Iterable
from typing import Any

import torch

from losskit.contract import ConfigError

__all__ = [
    "CHECKPOINT",
    "capture_rng_state",
    "load_checkpoint",
    "remove_stale_tmp",
    "restore_rng_state",
    "save_checkpoint",
    "tmp_path_of",
]

CHECKPOINT = "ckpt.pt"


def tmp_path_of(path: str | pathlib.Path) -> pathlib.Path:
    """``ckpt.pt`` -> ``ckpt.pt.tmp``: where a save writes before its atomic rename."""
    path = pathlib.Path(path)
    return path.with_name(path.name + ".tmp")


def save_checkpoint(path: str | pathlib.Path, state: dict) -> None:
    """``torch.save(state)`` into ``path.tmp``, then rename it over ``path`` (never a half-written ``path``)."""
    path = pathlib.Path(path)
    tmp = tmp_path_of(path)
    torch.save(state, tmp)
    os.replace(tmp, path)


def remove_stale_tmp(run_dir: str | pathlib.Path) -> pathlib.Path | None:
    """Delete ``run_dir/ckpt.pt.tmp`` left by a save that was killed; returns its path when there was one."""
    tmp = tmp_path_of(pathlib.Path(run_dir) / CHECKPOINT)
    if tmp.is_file():
        tmp.unlink()
        return tmp
    return None


def load_checkpoint(path: str | pathlib.Path, *, required: Iterable[str] = ()) -> dict:
    """The checkpoint dict at ``path`` (loaded on the CPU with ``weights_only=True``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ConfigError: the file cannot be read (truncated, not a torch file) or lacks one of ``required``; the
            message is one line naming the file.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a `losskit train` run directory with a checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, EOFError, UnpicklingError, ... here
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"checkpoint {path} cannot be read ({path.stat().st_size} bytes; {type(exc).__name__}: {reason}); "
            "it is truncated or not a losskit checkpoint: restore it, or start from scratch in a new run directory"
        ) from None
    if not isinstance(state, dict):
        raise ConfigError(f"checkpoint {path} holds a {type(state).__name__}, expected a losskit checkpoint dict")
    missing = [k for k in required if k not in state]
    if missing:
        raise ConfigError(f"checkpoint {path} lacks {', '.join(missing)}: not a checkpoint of this task")
    return state


def capture_rng_state() -> dict[str, Any]:
    """The state of every global generator a step may use (see the module docstring), as torch-loadable values."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    np = sys.modules.get("numpy")
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        # a tensor instead of an ndarray: the checkpoint stays loadable with weights_only=True
        state["numpy"] = (name, torch.from_numpy(keys.copy()), int(pos), int(has_gauss), float(cached))
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state`` (keys that were not captured are left alone)."""
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"])
        if len(cuda) != torch.cuda.device_count():
            raise ConfigError(
                f"the checkpoint holds RNG states of {len(cuda)} CUDA devices, this process sees "
                f"{torch.cuda.device_count()}; resume on the same devices for an exact continuation"
            )
        torch.cuda.set_rng_state_all(cuda)
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))


def _as_tuples(value: Any) -> Any:
    """``random.setstate`` needs tuples; a round trip through a checkpoint may hand back lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
