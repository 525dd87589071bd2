"""The fused C++ row sweeps of the ``chunked`` implementation on CPU (``native.cpp``), built on first use.

The pure-torch chunk code (``passes.py``) runs a dozen torch ops per chunk, each a pass over it; these sweeps do
the same work in two passes per row for the statistics and one for the gradient (``native.cpp`` says how), with
no workspace at all. They are compiled once per machine with ``torch.utils.cpp_extension`` (g++ and ninja;
about a minute) into torch's extension cache and loaded from there afterwards; ``make setup`` builds them.

Where they cannot be built (no C++ compiler, no ninja) the first use warns once and ``impl="chunked"`` keeps the
pure-torch chunk code: same results, slower. ``LOSSKIT_CHUNKED_NATIVE=0`` selects that code deliberately (tests of
the fallback, debugging); the choice is read once per process.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

from torch.backends import cpu as cpu_backend

__all__ = ["ENV_VAR", "build_seconds", "module"]

ENV_VAR = "LOSSKIT_CHUNKED_NATIVE"
_SOURCE = Path(__file__).with_name("native.cpp")
_build_seconds: float | None = None

# at::vec picks its instruction set from these macros at compile time (as inductor's C++ code does).
_CAPABILITY_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512dq", "-mavx512vl",
               "-mavx512bw", "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}


def _enabled() -> bool:
    return os.environ.get(ENV_VAR, "").strip() not in ("0", "false", "False", "off")


def _ensure_ninja_on_path() -> None:
    # The ninja wheel installs its binary next to the interpreter, which is not on PATH for `.venv/bin/python`.
    if shutil.which("ninja") is None:
        os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")


def _clear_stale_lock(lock: Path, max_age_s: float = 600.0) -> None:
    """Remove a build lock left by a process killed mid-build: torch's extension loader waits on it forever.

    A build takes about a minute; a lock older than ``max_age_s`` has no live owner.
    """
    try:
        if time.time() - lock.stat().st_mtime > max_age_s:
            lock.unlink()
    except FileNotFoundError:
        pass


@functools.lru_cache(maxsize=1)
def module():
    """The loaded extension, or None (disabled by ``LOSSKIT_CHUNKED_NATIVE=0``, or it could not be built: one
    ``RuntimeWarning`` says why and what to install)."""
    global _build_seconds
    if not _enabled():
        return None
    try:
        from torch.utils import cpp_extension

        cap = cpu_backend.get_cpu_capability()
        flags = _CAPABILITY_FLAGS.get(cap, [])
        digest = hashlib.sha256(_SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:12]
        name = f"losskit_chunked_{cap.lower()}_{digest}"
        _ensure_ninja_on_path()
        _clear_stale_lock(Path(cpp_extension._get_build_directory(name, verbose=False)) / "lock")
        start = time.perf_counter()
        mod = cpp_extension.load(
            name=name,
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-fopenmp", *flags],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
        _build_seconds = time.perf_counter() - start
        return mod
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as exc:  # build or load failed
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        warnings.warn(
            f'impl="chunked" uses its pure-torch chunk code (correct, slower): the native CPU kernels could not be '
            f"built ({type(exc).__name__}: {first}). They need a C++ compiler (g++) and ninja; set "
            f"{ENV_VAR}=0 to select the pure-torch code without this warning",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def build_seconds() -> float | None:
    """Seconds the first ``module()`` call of this process took (building, or loading the cached build)."""
    return _build_seconds
