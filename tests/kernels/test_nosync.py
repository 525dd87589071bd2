"""No host syncs in token_stats / fused_token_loss forward + backward (spec/kernels.md §4.1, §5, §8 item 6).

A ``TorchDispatchMode`` raises on the ATen ops behind host reads: ``_local_scalar_dense`` (``.item()``,
``bool()``, ``int()``), ``equal``, ``nonzero``, ``masked_select``, ``index.Tensor`` with a bool index, and
copies to another device. An AST lint forbids ``.item(``, ``.tolist(``, ``.cpu(`` in ``src/losskit/kernels``.
"""

from __future__ import annotations

import ast
import itertools
import pathlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from losskit import kernels

KERNELS_SRC = pathlib.Path(__file__).resolve().parents[2] / "src" / "losskit" / "kernels"
aten = torch.ops.aten
_FORBIDDEN = {
    aten._local_scalar_dense.default,
    aten.equal.default,
    aten.nonzero.default,
    aten.masked_select.default,
}


class SyncGuard(TorchDispatchMode):
    """Raise on any op that would read device values on the host."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FORBIDDEN or func.overloadpacket in {
            aten._local_scalar_dense,
            aten.nonzero,
            aten.masked_select,
        }:
            raise AssertionError(f"host sync: {func}")
        if func.overloadpacket in (aten.index, aten.index_put, aten.index_put_) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for i in (args[1] if len(args) > 1 else [])
            if i is not None
        ):
            raise AssertionError(f"bool-mask indexing: {func}")
        if func.overloadpacket in (aten._to_copy, aten.copy_):
            src = args[1] if func.overloadpacket == aten.copy_ else args[0]
            dst_dev = args[0].device if func.overloadpacket == aten.copy_ else kwargs.get("device")
            if dst_dev is not None and isinstance(src, torch.Tensor) and torch.device(dst_dev) != src.device:
                raise AssertionError(f"cross-device copy: {func}")
        return func(*args, **kwargs)


def test_guard_catches_what_it_should():
    x = torch.randn(3)
    for bad in (
        lambda: x.sum().item(),
        lambda: bool(x.sum() > 0),
        lambda: x[x > 0],
        lambda: x.nonzero(),
        lambda: torch.equal(x, x),
        lambda: x.to("meta"),
    ):
        with pytest.raises(AssertionError), SyncGuard():
            bad()


def _inputs(dtype, three_d):
    g = torch.Generator().manual_seed(0)
    if three_d:
        x = (torch.randn(2, 5, 41, generator=g) * 2).to(dtype)[:, :-1]
        t = torch.randint(0, 41, (2, 4), generator=g)
        t[0, 1] = -100
    else:
        x = (torch.randn(7, 41, generator=g) * 2).to(dtype)
        t = torch.randint(0, 41, (7,), generator=g)
        t[3] = -100
    return x, t


@pytest.mark.parametrize("impl", ["chunked", "torch"])
@pytest.mark.parametrize("chunk", [None, 4 * 20])
@pytest.mark.parametrize("three_d", [False, True])
def test_token_stats_fwd_bwd_without_sync(impl, chunk, three_d):
    x, t = _inputs(torch.float32, three_d)
    kernels.token_stats(x, t, smoothing_exclude=[1, 2], impl=impl)  # warm the column-set cache
    xx = x.clone().requires_grad_()
    mask = torch.ones(t.shape, dtype=torch.bool)
    with SyncGuard():
        s = kernels.token_stats(
            xx,
            t,
            mask=mask,
            smoothing_exclude=[1, 2],
            impl=impl,
            chunk_bytes=chunk if impl == "chunked" else None,
        )
        total = (
            s.lse.sum() + s.nll.sum() + s.entropy.sum() + s.wrong_entropy.sum() + s.log1m_target_prob.sum()
        )
        total = total + s.support_mean_logit.sum() + s.target_logit.sum()
        total.backward()
    assert xx.grad is not None


MODES = list(itertools.product(["forward", "backward"], ["sum", "none"], [False, True], ["float", "device"]))


@pytest.mark.parametrize(
    "mode,reduction,inplace,scale", [m for m in MODES if not (m[0] == "forward" and m[1] == "none")]
)
def test_fused_loss_fwd_bwd_without_sync(mode, reduction, inplace, scale):
    x, t = _inputs(torch.bfloat16, False)
    opts = {"label_smoothing": 0.1, "smoothing_exclude": [0, 1], "z_loss": 1e-4, "impl": "chunked"}
    kernels.fused_token_loss(x, t, **opts)  # warm the column-set caches
    leaf = x.clone().requires_grad_()
    w = torch.rand(t.shape, requires_grad=True)
    with SyncGuard():
        z = leaf * 1.0
        res = kernels.fused_token_loss(
            z,
            t,
            token_weight=w,
            normalizer=torch.tensor(5.0) if reduction == "sum" else None,
            reduction=reduction,
            grad_mode=mode,
            inplace_grad=inplace,
            grad_scale=torch.tensor(0.5) if scale == "device" else 0.5,
            **opts,
        )
        loss = res.loss if reduction == "sum" else (res.loss * torch.rand(res.loss.shape)).sum()
        loss.backward()
        _ = res.stats.bad.any()  # flags stay on device
    assert leaf.grad is not None and w.grad is not None


def test_lint_no_host_read_spellings_in_kernels():
    offenders = []
    for path in sorted(KERNELS_SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("item", "tolist", "cpu"):
                offenders.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert offenders == [], offenders


def test_lint_sees_a_planted_offender(tmp_path):
    tree = ast.parse("x = t.item()\ny = t.cpu()\n")
    found = [
        n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in ("item", "tolist", "cpu")
    ]
    assert found == ["item", "cpu"]
