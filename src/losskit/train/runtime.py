"""Process set-up shared by the tasks: device and autocast, DDP (torchrun) and the resolved-config file."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import pathlib
from typing import Any

import torch

from losskit.contract import ConfigError


@dataclasses.dataclass
class Runtime:
    device: torch.device
    autocast: Any  # zero-argument callable returning a context manager
    rank: int = 0
    world_size: int = 1
    owns_group: bool = False

    @property
    def master(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available; use device='cpu' or 'auto'")
    return device


def resolve_autocast(dtype: str, device: torch.device):
    """bf16 autocast on CUDA for ``dtype='auto'``; float32 (no autocast) on CPU unless asked."""
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "float32":
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def cpu_threads(device: torch.device, num_threads: int | None):
    """Run the body with ``num_threads`` intra-op threads on CPU (None, or another device: torch's setting), and
    give torch's setting back afterwards: the count is process-wide, and a caller that runs several tasks in one
    process (the tests, a notebook) keeps its own."""
    previous = torch.get_num_threads()
    if device.type == "cpu" and num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def setup_runtime(cfg: Any) -> Runtime:
    """Device, autocast and, under torchrun (``WORLD_SIZE > 1``), the process group (gloo on CPU, nccl on GPU)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(cfg.device, local_rank)
    owns = False
    if world > 1 and not dist.is_initialized():
        backend = cfg.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        owns = True
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return Runtime(device, resolve_autocast(cfg.dtype, device), rank, world, owns)


#: Set once this process has destroyed a process group it used with DistributedDataParallel (see
#: ``teardown_runtime``); the command line then ends the process with ``exit_process``.
_NATIVE_THREADS_LEFT = False


def teardown_runtime(rt: Runtime, *, synchronize: bool = True) -> None:
    """Leave the process group: a barrier (on a normal finish), then ``destroy_process_group``.

    The barrier keeps any rank from tearing down while another still has collectives in flight (rank 0 saving
    the last checkpoint while rank 1 exits). After an error it is skipped: the other ranks may never reach it.

    Why the process should then end with ``exit_process``: once a ``DistributedDataParallel`` module has been
    built, ``destroy_process_group()`` does not free the gloo backend (torch 2.13: a reference inside DDP's
    native state keeps it, surviving ``del`` and ``gc.collect()``), so its worker and transport threads keep
    running until the interpreter finalizes. Native threads torn down during interpreter finalization abort the
    process at random under load ("terminate called without an active exception", SIGABRT), which turned a
    finished run into a failed one.
    """
    global _NATIVE_THREADS_LEFT
    if rt.owns_group:
        import torch.distributed as dist

        try:
            if synchronize:
                dist.barrier()
        finally:
            dist.destroy_process_group()
            _NATIVE_THREADS_LEFT = True


def native_threads_left() -> bool:
    """Whether this process tore down a process group whose native threads outlive it (``teardown_runtime``)."""
    return _NATIVE_THREADS_LEFT


def exit_process(code: int) -> None:
    """Flush every output and end the process now, without interpreter finalization (``os._exit``).

    For a process in which ``native_threads_left()``: files are closed by then (sinks, checkpoints), so skipping
    finalization loses nothing, and the leftover native threads never meet a finalizing interpreter.
    """
    import logging
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)


def save_resolved_config(out_dir: str | pathlib.Path, config: dict, *, print_it: bool = True) -> pathlib.Path:
    """Write the resolved config as ``out_dir/config.yaml`` (and print it): what this run really used."""
    import yaml

    path = pathlib.Path(out_dir) / "config.yaml"
    text = yaml.safe_dump(config, sort_keys=False, default_flow_style=None)
    path.write_text(text)
    if print_it:
        print("resolved config:\n" + "".join(f"  {line}\n" for line in text.splitlines()), end="", flush=True)
    return path
