"""The raw launchers registered as torch custom ops, so that ``torch.compile`` treats them as opaque.

Each op takes tensors and plain numbers only and has a fake (meta) implementation giving output shapes and dtypes,
so a compiled step traces through the autograd Functions without running Triton at trace time. Ops that write into
their input declare it in ``mutates_args`` (the in-place variants write G into the logits themselves, so no input
aliases another). The launch configuration travels as four ints.
"""

from __future__ import annotations

import torch

from losskit.kernels.triton import kernels, launch
from losskit.kernels.triton.launch import LaunchConfig

Tensor = torch.Tensor


def _cfg(block_v: int, rows: int, num_warps: int, num_stages: int) -> LaunchConfig:
    return LaunchConfig(block_v=block_v, rows=rows, num_warps=num_warps, num_stages=num_stages)


def _fake_fields(n: int, like: Tensor) -> list[Tensor]:
    floats = [like.new_empty(n, dtype=torch.float32) for _ in range(8)]
    return floats + [like.new_empty(n, dtype=torch.int64), like.new_empty(n, dtype=torch.bool),
                     like.new_empty(n, dtype=torch.bool)]


@torch.library.custom_op("losskit::triton_token_stats", mutates_args=())
def token_stats(
    logits: Tensor, target: Tensor, valid: Tensor, oob: Tensor, excl: Tensor | None, num_support: int,
    write_consts: bool, block_v: int, rows: int, num_warps: int, num_stages: int,
) -> list[Tensor]:
    """``launch.launch_token_stats`` as an op: 11 StatFields tensors, then the row constants."""
    return launch.launch_token_stats(
        logits, target, valid, oob, excl, num_support, write_consts, _cfg(block_v, rows, num_warps, num_stages)
    )


@token_stats.register_fake
def _(logits, target, valid, oob, excl, num_support, write_consts, block_v, rows, num_warps, num_stages):
    n = target.numel()
    consts = logits.new_empty((kernels.NUM_CONSTS, n if write_consts else 0), dtype=torch.float32)
    return [*_fake_fields(n, logits), consts]


@torch.library.custom_op("losskit::triton_token_grad", mutates_args=())
def token_grad(
    logits: Tensor, target: Tensor, valid: Tensor, excl: Tensor | None, num_support: int, consts: Tensor,
    grads: list[Tensor | None], block_v: int, rows: int, num_warps: int, num_stages: int,
) -> Tensor:
    """G of the deferred backward in a new (contiguous) tensor shaped like ``logits``."""
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    launch.launch_token_grad(
        logits, out, target, valid, excl, num_support, consts, grads, _cfg(block_v, rows, num_warps, num_stages)
    )
    return out


@token_grad.register_fake
def _(logits, target, valid, excl, num_support, consts, grads, block_v, rows, num_warps, num_stages):
    return logits.new_empty(logits.shape)


@torch.library.custom_op("losskit::triton_token_grad_inplace", mutates_args=("logits",))
def token_grad_inplace(
    logits: Tensor, target: Tensor, valid: Tensor, excl: Tensor | None, num_support: int, consts: Tensor,
    grads: list[Tensor | None], block_v: int, rows: int, num_warps: int, num_stages: int,
) -> None:
    """G of the deferred backward written into the logits' storage (each tile is read before it is written)."""
    launch.launch_token_grad(
        logits, logits, target, valid, excl, num_support, consts, grads, _cfg(block_v, rows, num_warps, num_stages)
    )


@token_grad_inplace.register_fake
def _(logits, target, valid, excl, num_support, consts, grads, block_v, rows, num_warps, num_stages):
    return None


def _fused(logits, out, target, valid, oob, excl, num_support, weight, grad_scale, grad_scale_t, normalizer, eps_t,
           eps_over_kt, target_in_at, z_loss, block_v, rows, num_warps, num_stages) -> list[Tensor]:
    return launch.launch_fused_loss(
        logits, out, target, valid, oob, excl, num_support, weight, grad_scale, grad_scale_t, normalizer, eps_t,
        eps_over_kt, target_in_at, z_loss, _cfg(block_v, rows, num_warps, num_stages),
    )


@torch.library.custom_op("losskit::triton_fused_loss", mutates_args=())
def fused_loss(
    logits: Tensor, target: Tensor, valid: Tensor, oob: Tensor, excl: Tensor | None, num_support: int,
    weight: Tensor | None, grad_scale: float, grad_scale_t: Tensor | None, normalizer: Tensor | None,
    eps_t: Tensor | None, eps_over_kt: Tensor | None, target_in_at: Tensor | None, z_loss: float,
    block_v: int, rows: int, num_warps: int, num_stages: int,
) -> list[Tensor]:
    """Eager fused loss with G in a new tensor: ``[G, row_loss, token_loss, *fields]``."""
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    rest = _fused(logits, out, target, valid, oob, excl, num_support, weight, grad_scale, grad_scale_t, normalizer,
                  eps_t, eps_over_kt, target_in_at, z_loss, block_v, rows, num_warps, num_stages)
    return [out, *rest]


@fused_loss.register_fake
def _(logits, target, valid, oob, excl, num_support, weight, grad_scale, grad_scale_t, normalizer, eps_t,
      eps_over_kt, target_in_at, z_loss, block_v, rows, num_warps, num_stages):
    n = target.numel()
    return [logits.new_empty(logits.shape), logits.new_empty(n, dtype=torch.float32),
            logits.new_empty(n, dtype=torch.float32), *_fake_fields(n, logits)]


@torch.library.custom_op("losskit::triton_fused_loss_inplace", mutates_args=("logits",))
def fused_loss_inplace(
    logits: Tensor, target: Tensor, valid: Tensor, oob: Tensor, excl: Tensor | None, num_support: int,
    weight: Tensor | None, grad_scale: float, grad_scale_t: Tensor | None, normalizer: Tensor | None,
    eps_t: Tensor | None, eps_over_kt: Tensor | None, target_in_at: Tensor | None, z_loss: float,
    block_v: int, rows: int, num_warps: int, num_stages: int,
) -> list[Tensor]:
    """Eager fused loss writing G into the logits' storage: ``[row_loss, token_loss, *fields]``."""
    return _fused(logits, logits, target, valid, oob, excl, num_support, weight, grad_scale, grad_scale_t,
                  normalizer, eps_t, eps_over_kt, target_in_at, z_loss, block_v, rows, num_warps, num_stages)


@fused_loss_inplace.register_fake
def _(logits, target, valid, oob, excl, num_support, weight, grad_scale, grad_scale_t, normalizer, eps_t,
      eps_over_kt, target_in_at, z_loss, block_v, rows, num_warps, num_stages):
    n = target.numel()
    return [logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32),
            *_fake_fields(n, logits)]


@torch.library.custom_op("losskit::triton_grad_rescale", mutates_args=("grad",))
def grad_rescale(
    grad: Tensor, upstream: Tensor, expected: float, expected_t: Tensor | None, block_v: int, rows: int,
    num_warps: int, num_stages: int,
) -> None:
    """``grad *= upstream / expected`` in place, skipped on the device when they are equal."""
    launch.launch_grad_rescale(grad, upstream, expected, expected_t, _cfg(block_v, rows, num_warps, num_stages))


@grad_rescale.register_fake
def _(grad, upstream, expected, expected_t, block_v, rows, num_warps, num_stages):
    return None
