"""What every eager-mode autograd Function (``chunked`` and ``triton``) shares: the end of its forward, its
whole backward (the once-differentiable guard, the hand-over of the gradient written in the forward, the rescale
to the upstream) and the gradient of ``token_weight``.

Eager mode writes G for an upstream of ``grad_scale`` during the forward and gives that one buffer to autograd
at the first backward, rescaled by the implementation's own ``rescale`` when the upstream differs; the gradient
of a ``token_weight`` that requires grad is ``upstream·(CE_ε + λ·lse²)/normalizer`` at valid rows, 0 elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from losskit.contract import LossInputError

__all__ = ["backward", "check_once_differentiable", "end_forward", "take_grad", "weight_grad"]

# Rescales the written gradient G (for an upstream of ``grad_scale``) in place to the upstream ``g_loss``.
Rescale = Callable[[Any, torch.Tensor, torch.Tensor], None]

_SECOND_BACKWARD_MESSAGE = (
    'fused_token_loss(grad_mode="forward") wrote its gradient in the forward and released it at the first '
    'backward; a second backward (retain_graph=True) needs fused_token_loss(grad_mode="backward") (or '
    'impl="torch" for kernels.cross_entropy and the loss modules)'
)


def check_once_differentiable(impl: str) -> None:
    """Refuse double backward (``create_graph=True``): the custom backwards are once-differentiable."""
    if torch.is_grad_enabled():
        raise LossInputError(
            f'impl="{impl}" computes a once-differentiable custom backward; double backward (create_graph=True) is '
            'not supported. Use impl="torch" for higher-order gradients'
        )


def take_grad(ctx) -> torch.Tensor:
    """The gradient buffer the forward wrote, handed over once (a second backward raises)."""
    grad = ctx.grad
    if grad is None:
        raise LossInputError(_SECOND_BACKWARD_MESSAGE)
    ctx.grad = None
    return grad


def keep_for_weight_grad(ctx, token_weight, token_loss: torch.Tensor, valid: torch.Tensor, normalizer) -> None:
    """Save what ``weight_grad`` needs when ``token_weight`` (input 1 of the Function) requires grad."""
    ctx.has_weight_grad = token_weight is not None and ctx.needs_input_grad[1]
    if ctx.has_weight_grad:
        ctx.token_loss, ctx.valid, ctx.normalizer = token_loss, valid, normalizer
        ctx.weight_meta = (token_weight.shape, token_weight.dtype)


def end_forward(ctx, *, impl: str, rescale: Rescale, grad: torch.Tensor, grad_scale, token_weight,
                valid: torch.Tensor, normalizer, loss: torch.Tensor, token_loss: torch.Tensor,
                outputs: tuple[torch.Tensor, ...]) -> tuple:
    """The end of every eager forward: keep the written gradient ``grad`` (for an upstream of ``grad_scale``),
    how ``backward`` rescales it, and what ``weight_grad`` needs; mark the statistics non-differentiable; return
    ``(loss, token_loss, *outputs)``."""
    ctx.impl, ctx.rescale = impl, rescale
    ctx.grad = grad
    ctx.grad_scale = grad_scale
    keep_for_weight_grad(ctx, token_weight, token_loss, valid, normalizer)
    ctx.mark_non_differentiable(token_loss, *outputs)
    return (loss, token_loss, *outputs)


@torch.compiler.disable  # runs from loss.backward() inside a compiled step: eager, not traced
def backward(ctx, g_loss: torch.Tensor | None, *_) -> tuple:
    """The backward of every eager Function with inputs ``(logits, token_weight, normalizer, opts)``: refuse
    double backward, take the forward's gradient once, rescale it to ``g_loss`` and add ``token_weight``'s."""
    check_once_differentiable(ctx.impl)
    grad = take_grad(ctx)
    if g_loss is None:
        return None, None, None, None
    if not ctx.needs_input_grad[0]:
        return None, weight_grad(ctx, g_loss), None, None
    ctx.rescale(ctx, grad, g_loss)
    return grad, weight_grad(ctx, g_loss), None, None


def weight_grad(ctx, g_loss: torch.Tensor) -> torch.Tensor | None:
    """``upstream·token_loss/normalizer`` at valid rows (0 elsewhere), shaped like ``token_weight``; or None."""
    if not ctx.has_weight_grad:
        return None
    zero = torch.zeros((), dtype=ctx.token_loss.dtype, device=ctx.token_loss.device)
    g_w = torch.where(ctx.valid, ctx.token_loss * g_loss.to(ctx.token_loss.dtype), zero)
    if ctx.normalizer is not None:
        g_w = g_w / ctx.normalizer.to(g_w.dtype)
    return g_w.reshape(ctx.weight_meta[0]).to(ctx.weight_meta[1])
