"""Which implementation serves a call.

| situation                                              | result                                   |
|--------------------------------------------------------|------------------------------------------|
| CUDA, Triton importable and GPU-validated, fp16/bf16/fp32 | ``"triton"``                          |
| CUDA, Triton importable, not yet GPU-validated         | ``"chunked"`` (``"triton"`` is opt-in)  |
| CUDA, Triton missing (warn once) or another dtype      | ``"chunked"``                            |
| CPU or any other device                                | ``"chunked"``                            |
| fp64 logits                                            | ``"chunked"`` (also for explicit triton) |
| explicit ``"triton"``, CPU, ``TRITON_INTERPRET=1``     | ``"triton"`` through the interpreter     |
| explicit ``"triton"``, CPU, interpreter off            | ``LossInputError`` (impl, device, remedy)|
| explicit ``"triton"``, Triton path not importable      | ``LossInputError`` (use ``"chunked"``)   |
| env ``LOSSKIT_KERNELS_IMPL`` set                       | replaces ``"auto"``; explicit impl wins  |

``"torch"`` (the readable reference) is never picked by ``"auto"``.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

from losskit.contract import LossInputError

IMPLS: tuple[str, ...] = ("auto", "torch", "chunked", "triton")
#: Whether ``"auto"`` may pick ``"triton"`` on CUDA. The Triton kernels pass their whole test matrix under the
#: interpreter, but the GPU checks (full-size parity, no host sync, CUDA graphs, determinism, torch.compile) have
#: not yet run on a real GPU; until they have, Triton is opt-in (``impl="triton"``) and ``"auto"`` keeps
#: ``"chunked"`` on CUDA.
TRITON_GPU_VALIDATED = False
ENV_VAR = "LOSSKIT_KERNELS_IMPL"
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether the Triton implementation (``losskit.kernels.triton``) imports in this environment."""
    try:
        importlib.import_module("losskit.kernels.triton")
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _warn_triton_missing() -> None:
    warnings.warn(
        'impl="auto" on CUDA uses "chunked": the Triton implementation (losskit.kernels.triton, extra '
        "`losskit[triton]`) is not importable",
        RuntimeWarning,
        stacklevel=4,
    )


def _check_name(name: str, value) -> str:
    if value not in IMPLS:
        raise LossInputError(f"{name} must be one of {', '.join(repr(i) for i in IMPLS)}, got {value!r}")
    return value


def resolve_impl(impl: str, logits: torch.Tensor) -> str:
    """The implementation (``"torch"``, ``"chunked"`` or ``"triton"``) that serves ``impl`` for ``logits``.

    Args:
        impl: ``"auto"``, ``"torch"``, ``"chunked"`` or ``"triton"``.
        logits: the logits of the call (device and dtype decide ``"auto"``).

    Raises:
        LossInputError: unknown ``impl`` (or env value); explicit ``"triton"`` when it cannot run.
    """
    _check_name("impl", impl)
    if impl == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            impl = _check_name(f"environment variable {ENV_VAR}", env)
    device = logits.device
    if impl == "torch" or impl == "chunked":
        return impl
    if logits.dtype == torch.float64:
        return "chunked"
    if impl == "triton":
        if not triton_available():
            raise LossInputError(
                f'impl="triton" is not available: losskit.kernels.triton cannot be imported (device {device}); '
                'use impl="chunked" (or impl="auto")'
            )
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "") != "1":
            raise LossInputError(
                f'impl="triton" needs a CUDA device, got logits on device {device}; set TRITON_INTERPRET=1 '
                'before importing triton to run the interpreter (tests only), or use impl="chunked"'
            )
        return "triton"
    # impl == "auto"
    if device.type == "cuda":
        if logits.dtype in _TRITON_DTYPES and triton_available() and TRITON_GPU_VALIDATED:
            return "triton"
        if not triton_available():
            _warn_triton_missing()
    return "chunked"
