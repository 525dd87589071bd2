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


def teardown_runtime(rt: Runtime) -> None:
    if rt.owns_group:
        import torch.distributed as dist

        dist.destroy_process_group()


def save_resolved_config(out_dir: str | pathlib.Path, config: dict, *, print_it: bool = True) -> pathlib.Path:
    """Write the resolved config as ``out_dir/config.yaml`` (and print it): what this run really used."""
    import yaml

    path = pathlib.Path(out_dir) / "config.yaml"
    text = yaml.safe_dump(config, sort_keys=False, default_flow_style=None)
    path.write_text(text)
    if print_it:
        print("resolved config:\n" + "".join(f"  {line}\n" for line in text.splitlines()), end="", flush=True)
    return path
