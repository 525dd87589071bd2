"""Gradient modes and the in-place contract of the chunked implementation (spec/kernels.md §4.1, §8 item 5)."""

from __future__ import annotations

import pytest
import torch

from losskit import kernels
from losskit.contract import LossInputError

from ._oracle import assert_grad_close


def _inputs(dtype=torch.float32, n=9, v=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, v, generator=g) * 3).to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    t[2] = -100
    w = torch.rand(n, generator=g) + 0.5
    return x, t, w


OPTS = {"label_smoothing": 0.1, "smoothing_exclude": [0, 5], "z_loss": 1e-3, "impl": "chunked"}


def _grad(x, t, w, mode, upstream, inplace=False, grad_scale=1.0):
    xx = x.clone().requires_grad_()
    leaf = xx
    if inplace:  # in-place needs a non-leaf producer so the storage is the step's own buffer
        xx = xx * 1.0
    res = kernels.fused_token_loss(
        xx,
        t,
        token_weight=w,
        normalizer=torch.tensor(4.0),
        grad_mode=mode,
        grad_scale=grad_scale,
        inplace_grad=inplace,
        **OPTS,
    )
    res.loss.backward(upstream)
    return leaf.grad, res


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("upstream", ["one", "half", "device"])
def test_eager_equals_deferred(dtype, upstream):
    x, t, w = _inputs(dtype)
    up = {"one": torch.tensor(1.0), "half": torch.tensor(0.5), "device": torch.tensor(2.5)}[upstream]
    ge, re = _grad(x, t, w, "forward", up)
    gd, rd = _grad(x, t, w, "backward", up)
    x64 = x.double().requires_grad_()
    ref = kernels.fused_token_loss(
        x64,
        t,
        token_weight=w.double(),
        normalizer=torch.tensor(4.0, dtype=torch.float64),
        **{**OPTS, "impl": "torch"},
    )
    ref.loss.backward(up.double())
    assert_grad_close(ge, x64.grad, gd, dtype, "eager vs deferred")
    assert_grad_close(gd, x64.grad, ge, dtype, "deferred vs eager")
    assert torch.equal(re.loss, rd.loss) or abs(re.loss.item() - rd.loss.item()) < 1e-6


def test_grad_scale_device_scalar_and_matching_upstream_skip_rescale():
    x, t, w = _inputs()
    scale = torch.tensor(0.25)
    g1, _ = _grad(x, t, w, "forward", torch.tensor(0.25), grad_scale=scale)
    g2, _ = _grad(x, t, w, "backward", torch.tensor(0.25))
    assert_grad_close(g1, g2.double(), g2, torch.float32, "grad_scale")
    g3, _ = _grad(x, t, w, "forward", torch.tensor(0.25), grad_scale=0.25)
    assert torch.equal(g1, g3)


def test_reduction_none_takes_a_per_token_upstream():
    x, t, w = _inputs(torch.float64)
    up = torch.randn(9, dtype=torch.float64)
    xc = x.clone().requires_grad_()
    kernels.fused_token_loss(xc, t, token_weight=w.double(), reduction="none", **OPTS).loss.backward(up)
    xr = x.clone().requires_grad_()
    kernels.fused_token_loss(
        xr, t, token_weight=w.double(), reduction="none", **{**OPTS, "impl": "torch"}
    ).loss.backward(up)
    torch.testing.assert_close(xc.grad, xr.grad, rtol=1e-12, atol=1e-15)


def test_second_eager_backward_raises():
    x, t, _w = _inputs()
    xx = x.clone().requires_grad_()
    loss = kernels.fused_token_loss(xx, t, grad_mode="forward", **OPTS).loss
    loss.backward(retain_graph=True)
    with pytest.raises(LossInputError, match='grad_mode="backward"'):
        loss.backward()
    # deferred mode supports it
    xd = x.clone().requires_grad_()
    loss = kernels.fused_token_loss(xd, t, grad_mode="backward", **OPTS).loss
    loss.backward(retain_graph=True)
    loss.backward()


@pytest.mark.parametrize("mode", ["forward", "backward"])
def test_double_backward_raises_pointing_to_torch_impl(mode):
    x, t, _ = _inputs(torch.float64)
    xx = x.clone().requires_grad_()
    loss = kernels.fused_token_loss(xx, t, grad_mode=mode, **OPTS).loss
    with pytest.raises(LossInputError, match='impl="torch"'):
        torch.autograd.grad(loss, xx, create_graph=True)
    xs = x.clone().requires_grad_()
    with pytest.raises(LossInputError, match='impl="torch"'):
        torch.autograd.grad(kernels.token_stats(xs, t, impl="chunked").entropy.sum(), xs, create_graph=True)


@pytest.mark.parametrize("mode", ["forward", "backward"])
@pytest.mark.parametrize("three_d", [False, True])
def test_inplace_off_leaves_logits_bitwise_unchanged(mode, three_d):
    x, t, _w = _inputs(torch.bfloat16)
    if three_d:
        base = torch.randn(3, 4, 37).to(torch.bfloat16)
        x, t = base[:, :-1], torch.randint(0, 37, (3, 3))
    xx = x.clone().requires_grad_()
    before = xx.detach().clone()
    kernels.fused_token_loss(xx, t, grad_mode=mode, **OPTS).loss.backward()
    assert torch.equal(xx.detach().view(torch.int16), before.view(torch.int16))


@pytest.mark.parametrize("mode", ["forward", "backward"])
def test_inplace_writes_grad_into_logits_and_bumps_version(mode):
    x, t, w = _inputs()
    expected, _ = _grad(x, t, w, mode, torch.tensor(1.0))
    leaf = x.clone().requires_grad_()
    z = leaf * 1.0
    v0 = z._version
    res = kernels.fused_token_loss(
        z, t, token_weight=w, normalizer=torch.tensor(4.0), grad_mode=mode, inplace_grad=True, **OPTS
    )
    if mode == "forward":
        assert z._version > v0  # G already sits in z's storage
    res.loss.backward()
    assert z._version > v0
    torch.testing.assert_close(leaf.grad, expected, rtol=0, atol=0)
    torch.testing.assert_close(z.detach(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["forward", "backward"])
def test_inplace_second_consumer_gets_pytorch_inplace_error(mode):
    x, t, _ = _inputs()
    leaf = x.clone().requires_grad_()
    z = leaf * 1.0
    other = (z.exp() * z).sum()  # saves z for its backward
    loss = kernels.fused_token_loss(z, t, grad_mode=mode, inplace_grad=True, **OPTS).loss
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()


def test_stats_only_when_no_grad():
    x, t, _ = _inputs()
    with torch.no_grad():
        res = kernels.fused_token_loss(x.clone().requires_grad_(), t, **OPTS)
    assert not res.loss.requires_grad
    s = kernels.token_stats(x, t, impl="chunked")
    assert not s.lse.requires_grad


def test_token_weight_gradient_is_free_in_eager_mode():
    x, t, w = _inputs(torch.float64)
    grads = []
    for mode in ("forward", "backward"):
        ww = w.double().clone().requires_grad_()
        kernels.fused_token_loss(
            x.clone().requires_grad_(),
            t,
            token_weight=ww,
            grad_mode=mode,
            normalizer=torch.tensor(3.0, dtype=torch.float64),
            **OPTS,
        ).loss.backward()
        grads.append(ww.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=0)
    assert grads[0][2] == 0  # ignored row


def test_normalizer_with_grad_in_eager_mode():
    x, t, w = _inputs(torch.float64)
    res = []
    for mode in ("forward", "backward"):
        ww = w.double().clone().requires_grad_()
        xx = x.clone().requires_grad_()
        norm = (ww * 2).sum()
        kernels.fused_token_loss(
            xx, t, token_weight=ww, grad_mode=mode, normalizer=norm, **OPTS
        ).loss.backward()
        res.append((xx.grad, ww.grad))
    torch.testing.assert_close(res[0][0], res[1][0], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(res[0][1], res[1][1], rtol=1e-12, atol=1e-15)
