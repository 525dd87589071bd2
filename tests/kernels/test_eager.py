"""kernels.eager: the shared end of the eager forward and the one eager backward (rescale, weight gradient).

Driven through ``fused_token_loss(grad_mode="forward", impl="chunked")``; the oracle is plain torch autograd of
``Σ w·CE / normalizer`` in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from losskit import kernels


def _oracle(logits, target, weight, normalizer, upstream):
    x = logits.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    ce = F.cross_entropy(x, target, reduction="none")
    ((w * ce).sum() / normalizer * upstream).backward()
    return x.grad, w.grad


def _case(seed: int, n: int = 7, v: int = 13):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=gen, dtype=torch.float64) * 3
    target = torch.randint(0, v, (n,), generator=gen)
    weight = torch.rand(n, generator=gen, dtype=torch.float64) + 0.1
    return logits, target, weight


@pytest.mark.parametrize("grad_scale", [1.0, 0.25, "tensor"])
@pytest.mark.parametrize("upstream", [1.0, 0.25, 3.0])
def test_the_written_gradient_is_rescaled_to_any_upstream(grad_scale, upstream):
    logits, target, weight = _case(1)
    scale = torch.tensor(0.5, dtype=torch.float64) if grad_scale == "tensor" else grad_scale
    normalizer = torch.tensor(4.0, dtype=torch.float64)
    x = logits.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = kernels.fused_token_loss(x, target, token_weight=w, normalizer=normalizer, grad_mode="forward",
                                   grad_scale=scale, impl="chunked")
    (out.loss * upstream).backward()
    gx, gw = _oracle(logits, target, weight, normalizer, upstream)
    torch.testing.assert_close(x.grad, gx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.grad, gw, rtol=1e-10, atol=1e-12)


def test_only_the_weight_gradient_when_the_logits_need_none():
    logits, target, weight = _case(2, n=5, v=9)
    w = weight.clone().requires_grad_(True)
    out = kernels.fused_token_loss(logits, target, token_weight=w, grad_mode="forward", impl="chunked")
    (out.loss * 2.0).backward()
    _, gw = _oracle(logits, target, weight, 1.0, 2.0)
    torch.testing.assert_close(w.grad, gw, rtol=1e-10, atol=1e-12)
    assert logits.grad is None


def test_the_forward_returns_loss_then_non_differentiable_statistics():
    logits, target, _ = _case(3)
    x = logits.clone().requires_grad_(True)
    out = kernels.fused_token_loss(x, target, grad_mode="forward", impl="chunked")
    assert out.loss.requires_grad
    assert not out.token_loss.requires_grad and not out.stats.lse.requires_grad
    torch.testing.assert_close(out.token_loss, F.cross_entropy(logits, target, reduction="none"))
