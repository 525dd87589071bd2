"""Every row of the dispatch table of spec/kernels.md §2.4 (CUDA and Triton availability via monkeypatch)."""

from __future__ import annotations

import warnings

import pytest
import torch

from losskit import kernels
from losskit.contract import LossInputError
from losskit.kernels import dispatch


class _FakeCuda:
    """Stands in for a CUDA tensor: dispatch only looks at ``device`` and ``dtype``."""

    def __init__(self, dtype=torch.bfloat16):
        self.device = torch.device("cuda", 0)
        self.dtype = dtype


@pytest.fixture
def triton(monkeypatch):
    def set_available(value: bool):
        monkeypatch.setattr(dispatch, "triton_available", lambda: value)
        dispatch._warn_triton_missing.cache_clear()

    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    return set_available


def test_cuda_with_triton_picks_triton_once_gpu_validated(triton, monkeypatch):
    triton(True)
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        # until the GPU checks have run on a real GPU, triton is opt-in and auto keeps chunked on CUDA
        assert dispatch.resolve_impl("auto", _FakeCuda(dt)) == "chunked"
        assert dispatch.resolve_impl("triton", _FakeCuda(dt)) == "triton"
    monkeypatch.setattr(dispatch, "TRITON_GPU_VALIDATED", True)
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        assert dispatch.resolve_impl("auto", _FakeCuda(dt)) == "triton"


def test_cuda_without_triton_picks_chunked_and_warns_once(triton):
    triton(False)
    with pytest.warns(RuntimeWarning, match="chunked"):
        assert dispatch.resolve_impl("auto", _FakeCuda()) == "chunked"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.resolve_impl("auto", _FakeCuda()) == "chunked"


def test_cuda_other_dtype_picks_chunked(triton):
    triton(True)
    assert dispatch.resolve_impl("auto", _FakeCuda(torch.float64)) == "chunked"


def test_cpu_picks_chunked(triton):
    for available in (True, False):
        triton(available)
        assert dispatch.resolve_impl("auto", torch.zeros(2, 3)) == "chunked"
        assert dispatch.resolve_impl("auto", torch.zeros(2, 3, device="meta")) == "chunked"


def test_fp64_goes_to_chunked_even_for_explicit_triton(triton):
    triton(True)
    assert dispatch.resolve_impl("triton", torch.zeros(2, 3, dtype=torch.float64)) == "chunked"
    assert dispatch.resolve_impl("torch", torch.zeros(2, 3, dtype=torch.float64)) == "torch"


def test_explicit_triton_on_cpu_with_interpreter(triton, monkeypatch):
    triton(True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.resolve_impl("triton", torch.zeros(2, 3)) == "triton"


def test_explicit_triton_on_cpu_without_interpreter_names_impl_device_and_remedy(triton, monkeypatch):
    triton(True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(LossInputError) as err:
        dispatch.resolve_impl("triton", torch.zeros(2, 3))
    msg = str(err.value)
    assert 'impl="triton"' in msg and "cpu" in msg and "TRITON_INTERPRET=1" in msg and '"chunked"' in msg


def test_explicit_triton_when_not_available_says_use_chunked(triton):
    triton(False)
    with pytest.raises(LossInputError, match='impl="chunked"'):
        dispatch.resolve_impl("triton", torch.zeros(2, 3))
    x, t = torch.randn(2, 5), torch.tensor([0, 1])
    with pytest.raises(LossInputError, match="impl"):
        kernels.token_stats(x, t, impl="triton")


def test_triton_module_imports_where_triton_is_installed():
    pytest.importorskip("triton")
    dispatch.triton_available.cache_clear()
    assert dispatch.triton_available() is True


def test_env_override_replaces_auto_but_explicit_wins(triton, monkeypatch):
    triton(False)
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.resolve_impl("auto", torch.zeros(2, 3)) == "torch"
    assert dispatch.resolve_impl("chunked", torch.zeros(2, 3)) == "chunked"
    monkeypatch.setenv(dispatch.ENV_VAR, "bogus")
    with pytest.raises(LossInputError, match=dispatch.ENV_VAR):
        dispatch.resolve_impl("auto", torch.zeros(2, 3))


def test_env_override_reaches_the_public_functions(triton, monkeypatch):
    triton(False)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 1, 2])
    from losskit.kernels import chunked

    calls = []
    real = chunked.sweeps.stats
    monkeypatch.setattr(chunked.sweeps, "stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    kernels.token_stats(x, t)
    assert calls == []
    monkeypatch.setenv(dispatch.ENV_VAR, "chunked")
    kernels.token_stats(x, t)
    assert calls == [1]


def test_unknown_impl_is_rejected():
    with pytest.raises(LossInputError, match="impl"):
        dispatch.resolve_impl("cuda", torch.zeros(2, 3))


def test_double_backward_raises_pointing_to_torch_and_torch_supports_it():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 1, 2])
    loss = kernels.cross_entropy(x, t, impl="chunked")
    with pytest.raises(LossInputError, match='impl="torch"'):
        torch.autograd.grad(loss, x, create_graph=True)
    loss = kernels.cross_entropy(x, t, impl="torch")
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    g.sum().backward()
