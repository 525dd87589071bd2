"""Acceptance 15: one full temporal train step (apply, model, CombinedLoss, backward) never syncs the host.

On CPU a small guard of our own raises on every host read: ``Tensor.item``/``__bool__``/``tolist``/``__float__``/
``__int__`` are patched, and a ``TorchDispatchMode`` rejects ``aten._local_scalar_dense`` (behind ``.item()`` and
``bool()``), ``aten.equal``, ``aten.nonzero``, ``aten.masked_select`` and boolean-mask indexing. On a CUDA
machine the same step runs under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from losskit.functional.temporal import PresentationSchedule
from losskit.train.temporal import TemporalDigitsNet, build_criterion, present, resolve_criterion

aten = torch.ops.aten
FORBIDDEN = {
    aten._local_scalar_dense.default,
    aten.equal.default,
    aten.nonzero.default,
    aten.nonzero_static.default,
    aten.masked_select.default,
}


class HostSync(AssertionError):
    pass


class NoSyncMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FORBIDDEN:
            raise HostSync(f"host sync: {func}")
        if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
            indices = args[1]
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices if i is not None):
                raise HostSync(f"boolean-mask indexing: {func}")
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_sync(monkeypatch):
    def refuse(name):
        def method(self, *args, **kwargs):
            raise HostSync(f"host sync: Tensor.{name}")

        return method

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu"):
            patch.setattr(torch.Tensor, name, refuse(name))
        with NoSyncMode():
            yield


def test_guard_catches_syncs(monkeypatch):
    x = torch.tensor([1.0, 0.0])
    for fn in (lambda: x.item() if x.numel() == 1 else x[0].item(), lambda: bool(x[0]), lambda: x.tolist(),
               lambda: x.nonzero(), lambda: x[x > 0], lambda: float(x[0])):
        with no_host_sync(monkeypatch), pytest.raises(HostSync):
            fn()


def setup(device):
    torch.manual_seed(0)
    schedule = PresentationSchedule.build("1011", 8, dt=2.0, loss_reaction_time=2.0, device=device)
    model = TemporalDigitsNet(8, 0.5).to(device)
    criterion = build_criterion(resolve_criterion(None, None)).to(device)  # CE with input_checks="deferred"
    images = torch.rand(5, 1, 8, 8, device=device)
    labels = torch.randint(0, 10, (5,), device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    return schedule, model, criterion, images, labels, generator


def train_step(schedule, model, criterion, images, labels, generator):
    x, y = present(schedule, images, labels, 0.5, generator)
    with criterion.recording(model):
        logits = model(x)
    out = criterion(logits, y, return_components=True)
    out.loss.backward()
    return out


def test_train_step_has_no_host_sync_cpu(monkeypatch):
    parts = setup("cpu")
    reference = train_step(*parts)  # the same step unguarded, for comparison
    parts[1].zero_grad()
    parts[5].manual_seed(0)
    with no_host_sync(monkeypatch):
        out = train_step(*parts)
        metrics = out.metrics()
        act_max = parts[2].criterion("energy_loss").last_stats.act_max
        flags = parts[2].criterion("cross_entropy_loss").last_flags
    assert set(act_max) == {"conv_in", "conv_rec"}
    assert set(flags) == {"bad", "empty"}
    assert torch.equal(out.loss, reference.loss)
    assert metrics["loss/total"].item() > 0
    assert all(p.grad is not None for p in parts[1].parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs on the lent GPU machine)")
def test_train_step_has_no_host_sync_cuda():
    parts = setup("cuda")
    train_step(*parts)  # warm-up: kernels compiled, schedule cached on the device
    parts[1].zero_grad()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = train_step(*parts)
        out.metrics()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.loss).item()
