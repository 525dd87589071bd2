"""The native C++ row sweeps of ``impl="chunked"`` and their pure-torch fallback.

Both sweeps return the same raw row state and write the same G; each is compared with the fp64 ``torch``
implementation on the same rounded inputs by the rule of ``_oracle.py``, and with each other. The fallback
(no compiler, or ``LOSSKIT_CHUNKED_NATIVE=0``) is exercised here by replacing ``native.module`` with a stub.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

from losskit import kernels
from losskit.kernels.chunked import native, sweeps

from ._oracle import FLOAT_FIELDS, assert_grad_close, assert_stats_close, assert_values_close

pytestmark = pytest.mark.skipif(native.module() is None, reason="native CPU kernels unavailable (no compiler)")


@pytest.fixture
def fallback(monkeypatch):
    """Run the pure-torch chunk passes instead of the native sweeps."""
    monkeypatch.setattr(native, "module", lambda: None)


def _case(seed, shape, v, dtype, view):
    g = torch.Generator().manual_seed(seed)
    full = (*shape[:-1], shape[-1] + 1) if view else shape
    base = torch.randn(*full, v, generator=g, dtype=torch.float64) * 3
    x64 = base[..., :-1, :] if view else base
    t = torch.randint(0, v, x64.shape[:-1], generator=g)
    flat = x64.reshape(-1, v) if not view else None
    if flat is not None and flat.shape[0] > 3:
        flat[1] = float("-inf")  # a degenerate row
        flat[1, t.reshape(-1)[1]] = 2.0
        flat[2, t.reshape(-1)[2]] += 40.0  # the target holds the mass
        flat[3, :5] = float("-inf")
        flat[3, t.reshape(-1)[3]] = 1.0  # -inf columns, but not at the target (that row would be bad)
    t.reshape(-1)[0] = -100
    return x64.to(dtype), t


CASES = [
    ((7,), 2, torch.float32, False),
    ((17,), 15, torch.float32, False),  # shorter than one vector
    ((9,), 33, torch.float16, False),  # one vector plus a ragged tail
    ((2, 5), 1000, torch.bfloat16, True),  # shifted 3-D view: rows not one stride apart
    ((3, 4), 1025, torch.float32, False),  # one block of 1024 columns plus one
    ((5,), 4099, torch.float64, False),
    ((4,), 3000, torch.float32, True),
]


def _stats(x, t, impl, ex):
    return kernels.token_stats(x, t, smoothing_exclude=ex, impl=impl)


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("excluded", [False, True])
def test_native_stats_and_grad_match_the_oracle_and_the_fallback(case, excluded, monkeypatch):
    shape, v, dtype, view = CASES[case]
    x, t = _case(case, shape, v, dtype, view)
    ex = [0, v // 2, v - 1] if excluded and v > 3 else []
    ref_x = x.detach().double().requires_grad_()
    ref = _stats(ref_x, t, "torch", ex)
    base_x = x.detach().clone().requires_grad_()
    base = _stats(base_x, t, "torch", ex)
    got_x = x.detach().clone().requires_grad_()
    got = _stats(got_x, t, "chunked", ex)
    assert_stats_close(got, ref, base, dtype, f"native case {case} ")
    assert torch.equal(got.argmax, ref.argmax) and torch.equal(got.bad, ref.bad)
    g = torch.Generator().manual_seed(case)
    weights = {k: torch.randn(ref.lse.shape, generator=g, dtype=torch.float64) for k in FLOAT_FIELDS}

    def combo(s):
        return sum(torch.where(torch.isfinite(getattr(ref, k)), w * getattr(s, k).double(), 0.0).sum()
                   for k, w in weights.items())

    combo(ref).backward()
    combo(base).backward()
    combo(got).backward()
    assert_grad_close(got_x.grad, ref_x.grad, base_x.grad, dtype, f"native case {case} grad")
    # the pure-torch passes give the same statistics and gradient (to rounding)
    monkeypatch.setattr(native, "module", lambda: None)
    fb_x = x.detach().clone().requires_grad_()
    fb = _stats(fb_x, t, "chunked", ex)
    assert_stats_close(fb, ref, base, dtype, f"fallback case {case} ")
    combo(fb).backward()
    assert_grad_close(fb_x.grad, ref_x.grad, base_x.grad, dtype, f"fallback case {case} grad")


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize(("eps", "conv", "lam", "weighted"), [(0.0, "torch", 0.0, False), (0.1, "torch", 1e-3, True),
                                                              (0.2, "fairseq", 0.0, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_native_eager_fused_loss_matches_the_oracle(inplace, eps, conv, lam, weighted, dtype):
    x, t = _case(3, (2, 7), 777, dtype, False)
    ex = [5, 6]
    w0 = torch.rand(t.shape, generator=torch.Generator().manual_seed(2)) + 0.5 if weighted else None

    def run(z, impl, wdtype):
        leaf = z.detach().clone().requires_grad_()
        inp = leaf.clone() if inplace and impl == "chunked" else leaf
        res = kernels.fused_token_loss(inp, t, token_weight=None if w0 is None else w0.to(wdtype),
                                       label_smoothing=eps, smoothing_convention=conv, smoothing_exclude=ex,
                                       z_loss=lam, normalizer=3.0, grad_mode="forward" if impl == "chunked" else "auto",
                                       inplace_grad=inplace and impl == "chunked", impl=impl)
        res.loss.backward(torch.tensor(0.5, dtype=res.loss.dtype))
        return res, leaf.grad

    ref, g_ref = run(x.double(), "torch", torch.float64)
    base, g_base = run(x, "torch", torch.float32)
    got, g_got = run(x, "chunked", torch.float32)
    assert_values_close(got.loss.detach(), ref.loss.detach(), base.loss.detach(), dtype, "loss")
    assert_values_close(got.token_loss, ref.token_loss, base.token_loss, dtype, "token_loss")
    assert_grad_close(g_got, g_ref, g_base, dtype, "grad")
    assert g_got.dtype == dtype


def test_native_serves_cpu_logits_with_unit_last_stride_only():
    x = torch.randn(4, 10)
    assert sweeps.native_module(x) is native.module()
    assert sweeps.native_module(x.t().contiguous().t()) is None  # last stride != 1: the pure-torch passes
    xt = torch.randn(10, 4).t().requires_grad_()
    t = torch.tensor([1, 2, 3, 4])
    loss = kernels.cross_entropy(xt, t, impl="chunked")
    loss.backward()
    ref = xt.detach().clone().requires_grad_()
    torch.nn.functional.cross_entropy(ref, t).backward()
    assert torch.allclose(xt.grad, ref.grad, atol=1e-6)


def test_nan_and_inf_in_ignored_rows_give_exact_zero_gradients():
    x = torch.randn(5, 70)
    x[1] = float("nan")
    x[3, 4] = float("inf")
    t = torch.tensor([1, -100, 2, -100, 4])
    for mode in ("forward", "backward"):
        leaf = x.clone().requires_grad_()
        kernels.fused_token_loss(leaf, t, grad_mode=mode, label_smoothing=0.1, impl="chunked").loss.backward()
        assert torch.equal(leaf.grad[[1, 3]], torch.zeros(2, 70))
        assert torch.isfinite(leaf.grad).all()


def test_build_failure_warns_once_and_falls_back(monkeypatch):
    from torch.utils import cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    native.module.cache_clear()
    monkeypatch.setattr(cpp_extension, "load", broken)
    try:
        with pytest.warns(RuntimeWarning, match="pure-torch chunk code.*no compiler here.*LOSSKIT_CHUNKED_NATIVE=0"):
            assert native.module() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert native.module() is None  # cached: one warning per process
            x = torch.randn(3, 9, requires_grad=True)
            kernels.cross_entropy(x, torch.tensor([1, 2, 3]), impl="chunked").backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
    finally:
        native.module.cache_clear()


def test_env_var_selects_the_pure_torch_passes_without_a_warning():
    code = (
        "import warnings; warnings.simplefilter('error'); import torch\n"
        "from losskit import kernels\nfrom losskit.kernels.chunked import native\n"
        "assert native.module() is None\n"
        "x = torch.randn(3, 9, requires_grad=True)\n"
        "kernels.cross_entropy(x, torch.tensor([1, 2, 3]), impl='chunked').backward()\nprint('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, native.ENV_VAR: "0"}, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    import os
    import time

    lock = tmp_path / "lock"
    lock.write_text("")
    native._clear_stale_lock(lock)
    assert lock.exists()  # a build may be running
    old = time.time() - 3600
    os.utime(lock, (old, old))
    native._clear_stale_lock(lock)
    assert not lock.exists()
    native._clear_stale_lock(lock)  # absent: nothing to do
