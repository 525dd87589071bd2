"""What a benchmark row is tagged with: date, commit, device and library versions (docs/losses.md, "Benchmarks").

Every function here only reads: the git work tree of the losskit sources, installed package metadata, procfs and
torch's device queries. Missing things become ``""`` (a library that is not installed) or ``"unknown"`` (no git),
never an exception, so a benchmark can run from an installed wheel too.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import pathlib
import platform
import subprocess

import torch

_SOURCE_DIR = pathlib.Path(__file__).resolve().parent
DEFAULT_CSV_DIR = pathlib.Path("bench_results")


@dataclasses.dataclass(frozen=True)
class Environment:
    """The per-run columns of the CSV (the same for every row of one run)."""

    date: str
    git_commit: str
    device: str
    capability: str
    torch: str
    triton: str
    cuda: str
    liger: str
    cut_cross_entropy: str
    threads: int


def package_version(*names: str) -> str:
    """The installed version of the first distribution in ``names`` that is installed, else ``""``."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return ""


def git_commit(path: pathlib.Path = _SOURCE_DIR) -> str:
    """Short commit hash of the work tree holding ``path``, with ``+dirty`` for uncommitted tracked changes."""

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", *args], cwd=path, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def dated_csv_path(stem: str, now: datetime.datetime | None = None) -> pathlib.Path:
    """``bench_results/<stem>_<UTC date and time>.csv``, the default CSV path of every benchmark."""
    now = now or datetime.datetime.now(datetime.UTC)
    return DEFAULT_CSV_DIR / f"{stem}_{now.strftime('%Y-%m-%dT%H%M%SZ')}.csv"


def add_csv_option(parser: argparse.ArgumentParser, stem: str) -> None:
    """Every benchmark's ``--csv PATH`` (unset: ``dated_csv_path(stem)``, which ``csv_path`` resolves)."""
    parser.add_argument("--csv", type=pathlib.Path, default=None, metavar="PATH",
                        help=f"CSV output path (default {DEFAULT_CSV_DIR}/{stem}_<date>.csv)")


def csv_path(args: argparse.Namespace, stem: str) -> pathlib.Path:
    """``--csv`` if given, else a new dated path for ``stem``."""
    return args.csv or dated_csv_path(stem)


def describe(device: torch.device) -> Environment:
    """Collect the run's tags for ``device`` (``cpu`` or a CUDA device)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        capability = f"sm_{major}{minor}"
    else:
        name = f"{cpu_model()} ({torch.get_num_threads()} torch threads)"
        capability = torch.backends.cpu.get_cpu_capability()
    return Environment(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        git_commit=git_commit(),
        device=name,
        capability=capability,
        torch=torch.__version__,
        triton=package_version("triton", "pytorch-triton"),
        cuda=torch.version.cuda or "",
        liger=package_version("liger-kernel", "liger_kernel"),
        cut_cross_entropy=package_version("cut-cross-entropy", "cut_cross_entropy"),
        threads=torch.get_num_threads(),
    )
