"""Launch configuration, the exclusion bitmask, and the raw launchers of the Triton kernels.

The raw launchers take tensors, ints, floats and bools only (so that ``ops.py`` can register each one as a torch
custom op), allocate their outputs, and launch one kernel. They are device-agnostic: no ``torch.cuda`` call, CPU
tensors are accepted (the Triton interpreter, ``TRITON_INTERPRET=1``), and nothing reads a tensor value on the
host. Grid: ``cdiv(n, rows)`` programs of ``rows`` rows each; no atomics, so results are bitwise deterministic for
a given configuration.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton

from losskit.contract import LossInputError
from losskit.kernels.triton import kernels

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
NUM_FIELD_OUTPUTS = 11  # the StatFields: 8 floats, argmax, correct, bad


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """How the kernels are launched.

    Attributes:
        block_v: vocabulary tile width (a power of two).
        rows: rows per program (a power of two); a program handles a ``(rows, block_v)`` tile.
        num_warps: warps per program (GPU only; the interpreter ignores it).
        num_stages: software pipelining depth of the tile loop (GPU only).
    """

    block_v: int
    rows: int = 1
    num_warps: int = 8
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_v", "rows", "num_warps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value & (value - 1):
                raise LossInputError(f"LaunchConfig.{name} must be a positive power of two, got {value!r}")
        if isinstance(self.num_stages, bool) or not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise LossInputError(f"LaunchConfig.num_stages must be a positive int, got {self.num_stages!r}")
        if self.block_v * self.rows > 65536:
            raise LossInputError(
                f"LaunchConfig: rows x block_v must be at most 65536 elements per tile, got "
                f"{self.rows} x {self.block_v}"
            )


@functools.lru_cache(maxsize=256)
def default_config(num_classes: int, dtype: torch.dtype, device_type: str) -> LaunchConfig:
    """The configuration table (V bucket, dtype, device), sized by the register file.

    The pass-1 state is six ``(rows, block_v)`` arrays (d, s, a, Σz, argmax value and index) held in registers, so
    a tile of ``rows·block_v`` elements over ``32·num_warps`` threads costs about ``6·elements/threads`` registers
    per thread, and Hopper gives at most 65536 per SM (64 per thread at 32 warps, 128 at 16): tiles are therefore
    at most 4096 elements at 16 warps (8 per thread per array). GPU: V ≤ 4096: one tile per row (``BLOCK_V =
    next_pow2(V)``) and ``4096 / BLOCK_V`` rows per program; larger V: one row per program, 4096-wide tiles,
    16 warps, 2 stages. ``python -m losskit.kernels.triton.tune`` sweeps alternatives on the GPU.

    The interpreter (CPU tensors) pays per operation, not per element, so it takes up to 32 rows and 1024-wide
    tiles per program.
    """
    del dtype  # one table for the three dtypes until a tuning run on the lent GPU says otherwise
    pow2 = triton.next_power_of_2(num_classes)
    if device_type != "cuda":
        return LaunchConfig(block_v=min(pow2, 1024), rows=32, num_warps=1, num_stages=1)
    if num_classes <= 4096:
        block = max(pow2, 16)
        rows = max(1, min(16, 4096 // block))
        elements = block * rows
        return LaunchConfig(block_v=block, rows=rows, num_warps=16 if elements >= 4096 else 8 if elements >= 2048 else 4)
    return LaunchConfig(block_v=4096, rows=1, num_warps=16, num_stages=2)


@functools.lru_cache(maxsize=64)
def exclusion_bitmask(excluded: tuple[int, ...], num_classes: int, device: torch.device) -> torch.Tensor | None:
    """Packed bitmask of the excluded ids E: ``ceil(V/32)`` int32 words, bit ``i % 32`` of word ``i // 32`` set for
    ``i ∈ E``; None when E is empty (the kernels then drop the lookup at compile time).

    Built on the host from the id list (configuration, never step data), copied to ``device`` once and cached per
    (ids, V, device), so repeated calls allocate and copy nothing.
    """
    if not excluded:
        return None
    words = [0] * ((num_classes + 31) // 32)
    for i in excluded:
        words[i >> 5] |= 1 << (i & 31)
    signed = [w - (1 << 32) if w >= (1 << 31) else w for w in words]
    return torch.tensor(signed, dtype=torch.int32).to(device)


def check_logits(logits: torch.Tensor) -> None:
    """The Triton path's own requirements: fp16/bf16/fp32 and unit stride along the vocabulary."""
    if logits.dtype not in _DTYPES:
        raise LossInputError(
            f'impl="triton" computes fp16/bf16/fp32 logits, got {logits.dtype}; fp64 goes to impl="chunked"'
        )
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        raise LossInputError(
            f'impl="triton" needs logits with stride 1 along the last dim, got strides {tuple(logits.stride())}; '
            'pass a tensor whose classes are contiguous (x.contiguous()) or use impl="chunked"'
        )


def _geometry(x: torch.Tensor) -> tuple[int, int, int]:
    """``(T, stride_b, stride_t)`` so that flat row ``r`` starts at ``(r // T)·stride_b + (r % T)·stride_t``."""
    if x.dim() == 3:
        return max(x.shape[1], 1), x.stride(0), x.stride(1)
    return max(x.shape[0], 1), 0, x.stride(0)


def _grid(n: int, cfg: LaunchConfig) -> tuple[int]:
    return (triton.cdiv(n, cfg.rows),)


def _dummy(x: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    """A valid pointer for an argument that a compile-time flag removes."""
    return x if t is None else t


def _field_outputs(n: int, device: torch.device) -> list[torch.Tensor]:
    floats = [torch.empty(n, dtype=torch.float32, device=device) for _ in range(8)]
    return floats + [
        torch.empty(n, dtype=torch.int64, device=device),
        torch.empty(n, dtype=torch.bool, device=device),
        torch.empty(n, dtype=torch.bool, device=device),
    ]


def launch_token_stats(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    oob: torch.Tensor,
    excl: torch.Tensor | None,
    num_support: int,
    write_consts: bool,
    cfg: LaunchConfig,
) -> list[torch.Tensor]:
    """``_token_stats_kernel``: the 11 StatFields outputs, then the ``(NUM_CONSTS, n)`` row constants (an empty
    ``(NUM_CONSTS, 0)`` tensor unless ``write_consts``)."""
    v = logits.shape[-1]
    n = target.numel()
    dev = logits.device
    outs = _field_outputs(n, dev)
    consts = torch.empty((kernels.NUM_CONSTS, n if write_consts else 0), dtype=torch.float32, device=dev)
    if n:
        t_len, s_b, s_t = _geometry(logits)
        kernels._token_stats_kernel[_grid(n, cfg)](
            logits, t_len, s_b, s_t, n, v, target, valid, oob, _dummy(target, excl), float(num_support),
            *outs, consts if write_consts else outs[0],
            BLOCK_V=cfg.block_v, ROWS=cfg.rows, HAS_EXCL=excl is not None, WRITE_CONSTS=write_consts,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return [*outs, consts]


def launch_token_grad(
    logits: torch.Tensor,
    out: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    excl: torch.Tensor | None,
    num_support: int,
    consts: torch.Tensor,
    grads: list[torch.Tensor | None],
    cfg: LaunchConfig,
) -> None:
    """``_token_grad_kernel``: G into ``out`` (shaped like ``logits``; may be ``logits`` itself).

    ``grads`` are the upstream gradients of (lse, target_logit, nll, log1m_target_prob, support_mean_logit,
    entropy, wrong_entropy, support_gap), each ``(n,)`` of any float dtype and stride (a broadcast scalar has stride
    0), or None when the field is unused.
    """
    v = logits.shape[-1]
    n = target.numel()
    if not n:
        return
    t_len, s_b, s_t = _geometry(logits)
    _, o_b, o_t = _geometry(out)
    args = []
    for g in grads:
        args += [consts, 0] if g is None else [g, g.stride(0) if g.dim() else 0]
    has = [g is not None for g in grads]
    kernels._token_grad_kernel[_grid(n, cfg)](
        logits, t_len, s_b, s_t, out, o_b, o_t, n, v, target, valid, _dummy(target, excl), float(num_support),
        consts, *args,
        BLOCK_V=cfg.block_v, ROWS=cfg.rows, HAS_EXCL=excl is not None,
        HAS_LSE=has[0], HAS_ZY=has[1], HAS_NLL=has[2], HAS_L1M=has[3], HAS_MEAN=has[4], HAS_H=has[5],
        HAS_HQ=has[6], HAS_AK=has[7], HAS_BETA=has[5] or has[6], HAS_GAMMA=has[4] or has[7],
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def launch_fused_loss(
    logits: torch.Tensor,
    out: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    oob: torch.Tensor,
    excl: torch.Tensor | None,
    num_support: int,
    weight: torch.Tensor | None,
    grad_scale: float,
    grad_scale_t: torch.Tensor | None,
    normalizer: torch.Tensor | None,
    eps_t: torch.Tensor | None,
    eps_over_kt: torch.Tensor | None,
    target_in_at: torch.Tensor | None,
    z_loss: float,
    cfg: LaunchConfig,
) -> list[torch.Tensor]:
    """``_fused_loss_kernel``: G into ``out`` (may be ``logits``); returns ``[row_loss, token_loss, *fields]``.

    ``row_loss`` is ``v_t·w_t·(CE_ε + λ·lse²)`` (summed by the caller), ``token_loss`` the unweighted per-token
    loss; ``weight`` is flat ``(n,)`` or None; the smoothing tensors are those of ``prepare.Smoothing`` (all None
    for ε = 0); ``grad_scale_t`` (0-d, on the device) replaces the float ``grad_scale`` when given.
    """
    v = logits.shape[-1]
    n = target.numel()
    dev = logits.device
    row_loss = torch.empty(n, dtype=torch.float32, device=dev)
    token_loss = torch.empty(n, dtype=torch.float32, device=dev)
    outs = _field_outputs(n, dev)
    if n:
        t_len, s_b, s_t = _geometry(logits)
        _, o_b, o_t = _geometry(out)
        smooth = eps_t is not None
        kernels._fused_loss_kernel[_grid(n, cfg)](
            logits, t_len, s_b, s_t, out, o_b, o_t, n, v, target, valid, oob, _dummy(target, excl),
            float(num_support), _dummy(row_loss, weight), float(grad_scale), _dummy(row_loss, grad_scale_t),
            _dummy(row_loss, normalizer), _dummy(row_loss, eps_t), _dummy(row_loss, eps_over_kt),
            _dummy(row_loss, target_in_at), float(z_loss), row_loss, token_loss, *outs,
            BLOCK_V=cfg.block_v, ROWS=cfg.rows, HAS_EXCL=excl is not None, HAS_W=weight is not None,
            GS_PTR=grad_scale_t is not None, HAS_NORM=normalizer is not None, HAS_SMOOTH=smooth,
            HAS_Z=z_loss != 0.0, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return [row_loss, token_loss, *outs]


def launch_grad_rescale(
    grad: torch.Tensor, upstream: torch.Tensor, expected: float, expected_t: torch.Tensor | None, cfg: LaunchConfig
) -> None:
    """``_grad_rescale_kernel``: ``grad *= upstream / expected`` in place; each program returns at once when the
    two scalars are equal (a plain ``loss.backward()`` then costs one launch of empty programs)."""
    v = grad.shape[-1]
    n = grad.numel() // v if v else 0
    if not n:
        return
    t_len, s_b, s_t = _geometry(grad)
    kernels._grad_rescale_kernel[_grid(n, cfg)](
        grad, t_len, s_b, s_t, n, v, upstream, float(expected), _dummy(upstream, expected_t),
        EXP_PTR=expected_t is not None, BLOCK_V=cfg.block_v, ROWS=cfg.rows,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
