"""Schedules and SNR lookups (spec/diffusion.md §1, test vectors V1 and the SNR/λ rows of V3; acceptance 1)."""

import math

import pytest
import torch

from losskit.contract import LossInputError
from losskit.functional import diffusion as D

INF = math.inf
TS = torch.tensor([0, 100, 250, 500, 750, 999])

V1 = {
    "linear": [9999, 8.53666958, 1.08952805, 0.0843595494, 0.00331108547, 4.03599265e-5],
    "scaled_linear": [1175.47059, 8.45389371, 2.06553462, 0.381850441, 0.0595126654, 0.00468191671],
    "cosine": [24221.3272, 34.1811429, 5.48878681, 0.969609603, 0.167104433, 2.42876691e-9],
}
V1_ZT = [1175.47059, 7.83090201, 1.87734192, 0.317555662, 0.0339113815, 0.0]
BETAS = {"linear": D.linear_betas, "scaled_linear": D.scaled_linear_betas, "cosine": D.cosine_betas}


def assert_rel(actual, expected, rtol=1e-6):
    """Relative closeness, with exact zeros required to be exactly 0 and infinities to match."""
    a = torch.as_tensor(actual, dtype=torch.float64).reshape(-1)
    e = torch.as_tensor(expected, dtype=torch.float64).reshape(-1)
    assert a.shape == e.shape, (a.shape, e.shape)
    for x, y in zip(a.tolist(), e.tolist()):
        if y == 0 or math.isinf(y):
            assert x == y, (x, y, a, e)
        else:
            assert abs(x - y) <= rtol * abs(y), (x, y, a, e)


def table(name):
    return D.alphas_cumprod_from_betas(BETAS[name]())


@pytest.mark.parametrize("name", list(V1))
def test_v1_schedule_snr(name):
    ac = table(name)
    assert ac.dtype == torch.float64 and ac.shape == (1000,)
    snr = D.snr_from_alphas_cumprod(ac, TS)
    assert snr.dtype == torch.float64
    assert_rel(snr, V1[name])
    assert_rel(D.log_snr_from_alphas_cumprod(ac, TS).exp(), V1[name])


def test_v1_zero_terminal():
    ac = table("scaled_linear")
    zt = D.rescale_zero_terminal_snr(ac)
    snr = D.snr_from_alphas_cumprod(zt)
    assert snr[-1].item() == 0.0 and zt[-1].item() == 0.0
    assert zt[0].item() == ac[0].item()
    assert snr[0].item() == D.snr_from_alphas_cumprod(ac)[0].item()
    assert_rel(snr[TS], V1_ZT)
    lam = D.log_snr_from_alphas_cumprod(zt)
    assert lam[-1].item() == -INF and torch.isfinite(lam[:-1]).all()
    # the schedule stays monotone
    assert (zt[1:] <= zt[:-1]).all()


def test_table_endpoints_are_exact():
    ac = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    assert D.log_snr_from_alphas_cumprod(ac).tolist() == [INF, 0.0, -INF]
    assert D.snr_from_alphas_cumprod(ac).tolist() == [INF, 1.0, 0.0]


def test_table_dtype_is_kept():
    betas32 = D.scaled_linear_betas(dtype=torch.float32)
    ac = D.alphas_cumprod_from_betas(betas32)
    assert ac.dtype == torch.float32
    assert D.snr_from_alphas_cumprod(ac, TS).dtype == torch.float32
    assert D.log_snr_from_alphas_cumprod(ac).dtype == torch.float32
    # the float32 table is accumulated in float64, then rounded once
    ref = torch.cumprod(1 - betas32.double(), 0).float()
    assert torch.equal(ac, ref)


def test_betas_formulas_match_plain_torch():
    T = 7
    assert torch.equal(D.linear_betas(T, 1e-4, 0.02), torch.linspace(1e-4, 0.02, T, dtype=torch.float64))
    assert torch.allclose(
        D.scaled_linear_betas(T, 0.00085, 0.012),
        torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2,
        rtol=1e-15,
        atol=0,
    )

    def abar(u, s=0.008):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    expected = [min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)]
    assert_rel(D.cosine_betas(T), expected, rtol=1e-12)
    assert D.cosine_betas(T)[-1].item() == 0.999  # the last beta is capped


def test_gather_shape_matches_elementwise_loop():
    ac = table("cosine")
    t = torch.tensor([[0, 1, 999], [500, 7, 250], [3, 3, 3], [998, 100, 42]])
    lam = D.log_snr_from_alphas_cumprod(ac, t)
    snr = D.snr_from_alphas_cumprod(ac, t)
    assert lam.shape == (4, 3) and snr.shape == (4, 3)
    full_l, full_s = D.log_snr_from_alphas_cumprod(ac), D.snr_from_alphas_cumprod(ac)
    for i in range(4):
        for j in range(3):
            assert lam[i, j].item() == full_l[t[i, j]].item()
            assert snr[i, j].item() == full_s[t[i, j]].item()
    # int32 timesteps are integer too
    assert torch.equal(D.snr_from_alphas_cumprod(ac, t.int()), snr)


@pytest.mark.parametrize(
    "t, pattern",
    [
        (torch.tensor([0.0, 1.0]), r"timesteps must be an integer tensor, got dtype torch.float32"),
        (torch.tensor([0, 1000]), r"timesteps must lie in \[0, 1000\).*min 0, max 1000"),
        (torch.tensor([-1, 5]), r"timesteps must lie in \[0, 1000\).*min -1, max 5"),
        (torch.tensor([True]), r"timesteps must be an integer tensor"),
    ],
)
def test_bad_timesteps(t, pattern):
    ac = table("linear")
    with pytest.raises(LossInputError, match=pattern):
        D.snr_from_alphas_cumprod(ac, t)
    with pytest.raises(LossInputError, match=pattern):
        D.log_snr_from_alphas_cumprod(ac, t)


@pytest.mark.parametrize(
    "ac, pattern",
    [
        (
            torch.ones(2, 3, dtype=torch.float64),
            r"alphas_cumprod must be a non-empty 1-D tensor \[T\], got shape",
        ),
        (torch.tensor([0.5, 1.5], dtype=torch.float64), r"alphas_cumprod must lie within \[0, 1\].*1\.5"),
        (torch.tensor([-0.1, 0.5], dtype=torch.float64), r"alphas_cumprod must lie within \[0, 1\].*-0\.1"),
        (torch.tensor([1, 0]), r"alphas_cumprod must be floating point"),
    ],
)
def test_bad_table(ac, pattern):
    with pytest.raises(LossInputError, match=pattern):
        D.log_snr_from_alphas_cumprod(ac)


def test_rescale_needs_a_decreasing_table():
    with pytest.raises(LossInputError, match="alphas_cumprod"):
        D.rescale_zero_terminal_snr(torch.tensor([0.5], dtype=torch.float64))
    with pytest.raises(LossInputError, match="alphas_cumprod"):
        D.rescale_zero_terminal_snr(torch.tensor([0.2, 0.5], dtype=torch.float64))


V3_SIGMA = [0, 0.001, 0.1, 0.25, 0.5, 0.75, 0.9, 0.999, 1]
V3_SNR = [INF, 998001, 81, 9, 1, 0.111111111, 0.012345679, 1.002003e-6, 0]
V3_LAM = [INF, 13.8135096, 4.39444915, 2.19722458, 0, -2.19722458, -4.39444915, -13.8135096, -INF]


def test_v3_flow_snr_and_log_snr():
    s = torch.tensor(V3_SIGMA, dtype=torch.float64)
    assert_rel(D.flow_snr(s), V3_SNR)
    lam = D.flow_log_snr(s)
    assert lam[4].item() == 0.0
    assert_rel(lam, V3_LAM)
    assert_rel(D.flow_shift(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64), 3), [0.5, 0.75, 0.9])
    # σ = s(−λ/2) inverts flow_log_snr
    assert_rel(torch.sigmoid(-lam[1:-1] / 2), V3_SIGMA[1:-1], rtol=1e-12)


def test_flow_shift_endpoints_and_float_input():
    assert D.flow_shift(torch.tensor([0.0, 1.0], dtype=torch.float64), 3.0).tolist() == [0.0, 1.0]
    assert D.flow_log_snr(0.5).item() == 0.0
    with pytest.raises(LossInputError, match="shift must be a finite number > 0"):
        D.flow_shift(torch.tensor([0.5]), 0.0)


@pytest.mark.parametrize("fn", [D.flow_log_snr, D.flow_snr, lambda s: D.flow_shift(s, 2.0)])
@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_flow_sigma_out_of_range(fn, bad):
    with pytest.raises(LossInputError, match=r"sigma must lie within \[0, 1\]"):
        fn(torch.tensor([0.5, bad], dtype=torch.float64))


def test_edm_and_conversions():
    s = torch.tensor([0, 0.002, 0.1, 0.5, 1, 10, 80, INF], dtype=torch.float64)
    lam = D.edm_log_snr(s)
    assert_rel(lam, [INF] + [-2 * math.log(x) for x in s.tolist()[1:-1]] + [-INF])
    assert_rel(D.snr_from_log_snr(lam), [INF] + [1 / x**2 for x in s.tolist()[1:-1]] + [0])
    assert_rel(D.log_snr_from_snr(torch.tensor([0.0, 1.0, INF], dtype=torch.float64)), [-INF, 0.0, INF])
    with pytest.raises(LossInputError, match="sigma must be >= 0"):
        D.edm_log_snr(torch.tensor([-1.0]))
    with pytest.raises(LossInputError, match="snr must be >= 0"):
        D.log_snr_from_snr(torch.tensor([-1.0]))


def test_nan_propagates_through_lookups():
    assert math.isnan(D.flow_log_snr(torch.tensor([math.nan])).item())
    assert math.isnan(D.log_snr_from_alphas_cumprod(torch.tensor([math.nan, 0.5]))[0].item())
