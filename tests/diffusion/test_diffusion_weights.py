"""Weight functions against the spec's test vectors and edge cases (spec/diffusion.md §2-§3, §6-§7; acceptance
2, 3, 5, 9). The oracle for acceptance 3 is the naive formula in plain float64 torch."""

import math
import warnings

import pytest
import torch

from losskit.contract import LossInputError
from losskit.functional import diffusion as D
from losskit.functional import diffusion_weights as W

INF = math.inf
NAN = math.nan
SNRS = [0, 1e-4, 0.01, 0.1, 1, 5, 10, 100, 1000, 10000, INF]


def lam_of(snrs, dtype=torch.float64):
    return torch.log(torch.tensor(snrs, dtype=torch.float64)).to(dtype)


def assert_rel(actual, expected, rtol=1e-6):
    """Relative closeness, with exact zeros required to be exactly 0 and infinities to match."""
    a = torch.as_tensor(actual).double().reshape(-1)
    e = torch.as_tensor(expected, dtype=torch.float64).reshape(-1)
    assert a.shape == e.shape, (a.shape, e.shape)
    for x, y in zip(a.tolist(), e.tolist()):
        if y == 0 or math.isinf(y):
            assert x == y, (x, y, a, e)
        else:
            assert abs(x - y) <= rtol * abs(y), (x, y, a, e)


def sangoi0(lam, **kw):
    return D.sangoi_weight_from_mape(torch.exp(lam), torch.zeros_like(lam), **kw)


def sangoi02(lam, **kw):
    return D.sangoi_weight_from_mape(torch.exp(lam), torch.full_like(lam, 0.2), **kw)


V2 = [
    (
        "min_snr eps",
        lambda l, **k: D.min_snr_weight(l, prediction_type="epsilon", **k),
        [1, 1, 1, 1, 1, 1, 0.5, 0.05, 0.005, 0.0005, 0],
    ),
    (
        "min_snr v",
        lambda l, **k: D.min_snr_weight(l, prediction_type="v_prediction", **k),
        [
            0,
            9.9990001e-5,
            0.0099009901,
            0.0909090909,
            0.5,
            0.833333333,
            0.454545455,
            0.0495049505,
            0.004995005,
            0.000499950005,
            0,
        ],
    ),
    (
        "min_snr sample",
        lambda l, **k: D.min_snr_weight(l, prediction_type="sample", **k),
        [0, 0.0001, 0.01, 0.1, 1, 5, 5, 5, 5, 5, 5],
    ),
    (
        "min_snr sample diffusers",
        lambda l, **k: D.min_snr_weight(l, prediction_type="x0", convention="diffusers", **k),
        [0, 0.0001, 0.01, 0.1, 1, 5, 5, 5, 5, 5, 5],
    ),
    (
        "debiased eps ref",
        lambda l, **k: D.debiased_weight(l, prediction_type="epsilon", **k),
        [100000, 100, 10, 3.16227766, 1, 0.447213595, 0.316227766, 0.1, 0.0316227766, 0.01, 0],
    ),
    (
        "debiased eps onetrainer",
        lambda l, **k: D.debiased_weight(l, prediction_type="epsilon", convention="onetrainer", **k),
        [
            100000,
            100,
            10,
            3.16227766,
            1,
            0.447213595,
            0.316227766,
            0.1,
            0.0316227766,
            0.0316227766,
            0.0316227766,
        ],
    ),
    (
        "debiased eps kohya",
        lambda l, **k: D.debiased_weight(l, prediction_type="epsilon", convention="kohya", **k),
        [
            100000,
            100,
            10,
            3.16227766,
            1,
            0.447213595,
            0.316227766,
            0.1,
            0.0316227766,
            0.0316227766,
            0.0316227766,
        ],
    ),
    (
        "debiased v ref",
        lambda l, **k: D.debiased_weight(l, prediction_type="v_prediction", **k),
        [
            0,
            0.0099990001,
            0.099009901,
            0.287479787,
            0.5,
            0.372677996,
            0.287479787,
            0.099009901,
            0.0315911854,
            0.0099990001,
            0,
        ],
    ),
    (
        "debiased v onetrainer",
        lambda l, **k: D.debiased_weight(l, prediction_type="v_prediction", convention="onetrainer", **k),
        [
            1,
            0.999950004,
            0.99503719,
            0.953462589,
            0.707106781,
            0.40824829,
            0.301511345,
            0.099503719,
            0.0316069771,
            0.0316069771,
            0.0316069771,
        ],
    ),
    (
        "debiased v kohya",
        lambda l, **k: D.debiased_weight(l, prediction_type="v_prediction", convention="kohya", **k),
        [
            1,
            0.99990001,
            0.99009901,
            0.909090909,
            0.5,
            0.166666667,
            0.0909090909,
            0.0099009901,
            0.000999000999,
            0.000999000999,
            0.000999000999,
        ],
    ),
    (
        "debiased sample",
        lambda l, **k: D.debiased_weight(l, prediction_type="sample", **k),
        [0, 0.01, 0.1, 0.316227766, 1, 2.23606798, 3.16227766, 10, 31.6227766, 100, 100000],
    ),
    (
        "p2 eps",
        lambda l, **k: D.p2_weight(l, prediction_type="epsilon", **k),
        [
            1,
            0.99990001,
            0.99009901,
            0.909090909,
            0.5,
            0.166666667,
            0.0909090909,
            0.0099009901,
            0.000999000999,
            9.9990001e-5,
            0,
        ],
    ),
    (
        "p2 eps onetrainer",
        lambda l, **k: D.p2_weight(l, prediction_type="epsilon", convention="onetrainer", **k),
        [
            1,
            0.99990001,
            0.99009901,
            0.909090909,
            0.5,
            0.166666667,
            0.0909090909,
            0.0099009901,
            0.000999000999,
            9.9990001e-5,
            0,
        ],
    ),
    (
        "p2 eps k=.5 g=2",
        lambda l, **k: _quiet(D.p2_weight, l, prediction_type="epsilon", k=0.5, gamma=2, **k),
        [
            4,
            3.99840048,
            3.84467512,
            2.77777778,
            0.444444444,
            0.0330578512,
            0.00907029478,
            9.90074503e-5,
            9.9900075e-7,
            9.99900007e-9,
            0,
        ],
    ),
    (
        "p2 v ref",
        lambda l, **k: D.p2_weight(l, prediction_type="v_prediction", **k),
        [
            0,
            9.9980003e-5,
            0.00980296049,
            0.0826446281,
            0.25,
            0.138888889,
            0.0826446281,
            0.00980296049,
            0.000998002996,
            9.9980003e-5,
            0,
        ],
    ),
    (
        "p2 v onetrainer",
        lambda l, **k: D.p2_weight(l, prediction_type="v_prediction", convention="onetrainer", **k),
        [
            0.5,
            0.499975001,
            0.497512438,
            0.476190476,
            0.333333333,
            0.142857143,
            0.0833333333,
            0.00980392157,
            0.000998003992,
            9.9980004e-5,
            0,
        ],
    ),
    (
        "p2 sample",
        lambda l, **k: D.p2_weight(l, prediction_type="sample", **k),
        [
            0,
            9.9990001e-5,
            0.0099009901,
            0.0909090909,
            0.5,
            0.833333333,
            0.909090909,
            0.99009901,
            0.999000999,
            0.99990001,
            0.9999999999,
        ],
    ),
    (
        "sangoi mape 0",
        sangoi0,
        [
            0.99990001,
            0.99990001,
            0.99009901,
            0.909090909,
            0.5,
            0.166666667,
            0.0909090909,
            0.0099009901,
            0.0099009901,
            0.0099009901,
            0.0099009901,
        ],
    ),
    (
        "sangoi mape .2",
        sangoi02,
        [
            0.999920007,
            0.999920007,
            0.992071334,
            0.926586251,
            0.574349177,
            0.238494847,
            0.146854024,
            0.0249197052,
            0.0249197052,
            0.0249197052,
            0.0249197052,
        ],
    ),
]


def _quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


@pytest.mark.parametrize("name, fn, expected", V2, ids=[r[0] for r in V2])
def test_v2_float64(name, fn, expected):
    w = fn(lam_of(SNRS), dtype=torch.float64)
    assert w.dtype == torch.float64
    assert_rel(w, expected)


@pytest.mark.parametrize("name, fn, expected", V2, ids=[r[0] for r in V2])
def test_v2_default_float32_output_and_float32_input(name, fn, expected):
    w = fn(lam_of(SNRS))
    assert w.dtype == torch.float32 and not w.requires_grad
    assert_rel(w, expected, rtol=1e-6)
    # float32 λ: the input itself is rounded, so 1e-5
    w32 = fn(lam_of(SNRS, torch.float32))
    assert w32.dtype == torch.float32
    assert_rel(w32, expected, rtol=1e-5)


V3_SIGMA = [0, 0.001, 0.1, 0.25, 0.5, 0.75, 0.9, 0.999, 1]
V3 = [
    (
        "min_snr",
        lambda l: D.min_snr_weight(l, prediction_type="flow", dtype=torch.float64),
        [0, 5e-6, 0.05, 0.3125, 0.25, 0.0625, 0.01, 1e-6, 0],
    ),
    (
        "debiased",
        lambda l: D.debiased_weight(l, prediction_type="flow", dtype=torch.float64),
        [0, 0.000999, 0.09, 0.1875, 0.25, 0.1875, 0.09, 0.000999, 0],
    ),
    (
        "p2",
        lambda l: D.p2_weight(l, prediction_type="flow", dtype=torch.float64),
        [0, 9.99998998e-7, 0.00987804878, 0.05625, 0.125, 0.05625, 0.00987804878, 9.99998998e-7, 0],
    ),
    (
        "edm",
        lambda l: D.edm_weight(l, prediction_type="flow", dtype=torch.float64),
        [1, 0.998005, 0.85, 0.8125, 1.25, 2.3125, 3.25, 3.992005, 4],
    ),
    (
        "sd3_sigma_sqrt",
        lambda l: D.sd3_sigma_sqrt_weight(l, dtype=torch.float64),
        [1.00002e10, 1000000, 100, 16, 4, 1.77777778, 1.2345679, 1.002003, 1],
    ),
    (
        "sd3_cosmap",
        lambda l: D.sd3_cosmap_weight(l, dtype=torch.float64),
        [
            0.636619772,
            0.637894285,
            0.776365576,
            1.01859164,
            1.27323954,
            1.01859164,
            0.776365576,
            0.637894285,
            0.636619772,
        ],
    ),
    (
        "sangoi",
        lambda l: D.sangoi_weight_from_mape(torch.exp(l), torch.zeros_like(l), dtype=torch.float64),
        [0.0099009901, 0.0099009901, 0.012195122, 0.1, 0.5, 0.9, 0.987804878, 0.99990001, 0.99990001],
    ),
]


@pytest.mark.parametrize("name, fn, expected", V3, ids=[r[0] for r in V3])
def test_v3_flow(name, fn, expected):
    lam = D.flow_log_snr(torch.tensor(V3_SIGMA, dtype=torch.float64))
    w = fn(lam)
    if name == "sd3_sigma_sqrt":  # σ = 0 is the guard value 10000200001
        assert abs(w[0].item() / (1 + 1e5) ** 2 - 1) < 1e-12
    assert_rel(w, expected)


def test_v3_wrong_epsilon_form_differs():
    lam = D.flow_log_snr(torch.tensor([0.1, 0.5], dtype=torch.float64))
    eps_form = D.min_snr_weight(lam, prediction_type="epsilon", dtype=torch.float64)
    assert_rel(eps_form, [5 / 81, 1])  # the common mistake of V3
    assert_rel(D.min_snr_weight(lam, prediction_type="flow", dtype=torch.float64), [0.05, 0.25])


V4_SIGMA = [0, 0.002, 0.1, 0.5, 1, 10, 80, INF]
V4 = {
    "sample": [1e10, 250004, 104, 8, 5, 4.01, 4.00015625, 4],
    "epsilon": [1, 1.000016, 1.04, 2, 5, 401, 25601, 4e10],
    "v_prediction": [1, 1.000012, 1.02970297, 1.6, 2.5, 3.97029703, 3.99953132, 4],
}


@pytest.mark.parametrize("space", list(V4))
def test_v4_edm(space):
    lam = D.edm_log_snr(torch.tensor(V4_SIGMA, dtype=torch.float64))
    w = D.edm_weight(lam, prediction_type=space, dtype=torch.float64)
    assert_rel(w, V4[space])
    if space == "sample":
        assert abs(w[0].item() / (1e10 + 4) - 1) < 1e-12  # guard
    if space == "epsilon":
        assert abs(w[-1].item() / (4e10 + 1) - 1) < 1e-12
    # the sample row is EDM's own (σ² + σ_d²)/(σ σ_d)² at finite σ
    s = torch.tensor(V4_SIGMA[1:-1], dtype=torch.float64)
    if space == "sample":
        assert_rel(w[1:-1], (s**2 + 0.25) / (s * 0.5) ** 2, rtol=1e-12)


V5_T = torch.tensor([0, 100, 250, 500, 750, 999])
V5 = [
    (
        "min_snr eps",
        lambda l: D.min_snr_weight(l, prediction_type="epsilon", dtype=torch.float64),
        [0.00425361557, 0.591443443, 1, 1, 1, 1],
    ),
    (
        "min_snr v",
        lambda l: D.min_snr_weight(l, prediction_type="v_prediction", dtype=torch.float64),
        [0.00425, 0.528882612, 0.673792625, 0.276332684, 0.056169848, 0.00466009851],
    ),
    (
        "debiased eps onetrainer",
        lambda l: D.debiased_weight(
            l, prediction_type="epsilon", convention="onetrainer", dtype=torch.float64
        ),
        [0.0316227766, 0.343931226, 0.695798937, 1.61827883, 4.09916405, 14.6146412],
    ),
    (
        "debiased eps kohya",
        lambda l: D.debiased_weight(l, prediction_type="epsilon", convention="kohya", dtype=torch.float64),
        [0.0316227766, 0.343931226, 0.695798937, 1.61827883, 4.09916405, 14.6146412],
    ),
    (
        "debiased v ref",
        lambda l: D.debiased_weight(l, prediction_type="v_prediction", dtype=torch.float64),
        [0.0291423661, 0.307551377, 0.468824192, 0.447183331, 0.230249422, 0.0681056679],
    ),
    (
        "debiased v onetrainer",
        lambda l: D.debiased_weight(
            l, prediction_type="v_prediction", convention="onetrainer", dtype=torch.float64
        ),
        [0.0316069771, 0.325233028, 0.571145669, 0.850686379, 0.971509214, 0.99766723],
    ),
    (
        "sangoi mape .21",
        lambda l: D.sangoi_weight_from_mape(torch.exp(l), torch.full_like(l, 0.21), dtype=torch.float64),
        [0.0260967313, 0.169538187, 0.412724341, 0.774525601, 0.955357988, 0.996316717],
    ),
]


@pytest.mark.parametrize("name, fn, expected", V5, ids=[r[0] for r in V5])
def test_v5_scaled_linear(name, fn, expected):
    table = D.alphas_cumprod_from_betas(D.scaled_linear_betas())
    assert_rel(fn(D.log_snr_from_alphas_cumprod(table, V5_T)), expected)


# ---------------------------------------------------------------------------------------------------------
# Acceptance 3: literal cross-check at 200 log-spaced SNRs in [1e-4, 1e4].
# ---------------------------------------------------------------------------------------------------------
S = torch.logspace(-4, 4, 200, dtype=torch.float64)
LAM = torch.log(S)
SIG_FLOW = 1 / (1 + torch.sqrt(S))  # the flow σ with SNR = ((1 − σ)/σ)² = S
F = {"epsilon": 1 / S, "v_prediction": 1 / (1 + S), "sample": torch.ones_like(S), "flow": SIG_FLOW**2}


def close(a, b, rtol=1e-6):
    a, b = a.double(), b.double()
    assert torch.all((a - b).abs() <= rtol * b.abs()), (a - b).abs().div(b.abs()).max()


def test_literal_min_snr():
    g = 5.0
    close(D.min_snr_weight(LAM, prediction_type="epsilon", dtype=torch.float64), torch.clamp(S, max=g) / S)
    close(
        D.min_snr_weight(LAM, prediction_type="v_prediction", dtype=torch.float64),
        torch.clamp(S, max=g) / (S + 1),
    )
    close(D.min_snr_weight(LAM, prediction_type="sample", dtype=torch.float64), torch.clamp(S, max=g))
    close(
        D.min_snr_weight(LAM, prediction_type="flow", dtype=torch.float64),
        torch.clamp(S, max=g) * SIG_FLOW**2,
    )
    # another γ
    close(D.min_snr_weight(LAM, prediction_type="epsilon", gamma=1.0), torch.clamp(S, max=1.0) / S)


def test_literal_debiased():
    close(D.debiased_weight(LAM, prediction_type="epsilon", dtype=torch.float64), S**-0.5)
    close(D.debiased_weight(LAM, prediction_type="v_prediction", dtype=torch.float64), S**0.5 / (1 + S))
    close(D.debiased_weight(LAM, prediction_type="sample", dtype=torch.float64), S**0.5)
    close(D.debiased_weight(LAM, prediction_type="flow", dtype=torch.float64), SIG_FLOW * (1 - SIG_FLOW))


@pytest.mark.parametrize("gamma, k", [(1.0, 1.0), (0.5, 1.0), (2.0, 0.5), (0.0, 3.0)])
@pytest.mark.parametrize("space", list(F))
def test_literal_p2(space, gamma, k):
    w = D.p2_weight(LAM, prediction_type=space, gamma=gamma, k=k, dtype=torch.float64)
    close(w, S * (k + S) ** -gamma * F[space])


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
@pytest.mark.parametrize("space", list(F))
def test_literal_edm(space, sigma_data):
    sig_e = S**-0.5
    w_x0 = (sig_e**2 + sigma_data**2) / (sig_e * sigma_data) ** 2
    w = D.edm_weight(LAM, prediction_type=space, sigma_data=sigma_data, dtype=torch.float64)
    close(w, w_x0 * F[space])


def test_literal_sd3():
    # diffusers' compute_loss_weighting_for_sd3 on the σ that gives this SNR
    close(D.sd3_sigma_sqrt_weight(LAM, dtype=torch.float64), SIG_FLOW**-2.0)
    bot = 1 - 2 * SIG_FLOW + 2 * SIG_FLOW**2
    close(D.sd3_cosmap_weight(LAM, dtype=torch.float64), 2 / (math.pi * bot))


# ---------------------------------------------------------------------------------------------------------
# Acceptance 5: finite everywhere, §6 limits.
# ---------------------------------------------------------------------------------------------------------
LAMS = torch.tensor([-INF, -60, -23, -5, 0, 5, 23, 60, INF], dtype=torch.float64)
SPACES = ["epsilon", "v_prediction", "sample", "x0", "flow"]


def all_cells():
    for scheme in ["constant", "min_snr", "debiased", "p2", "edm", "sd3_sigma_sqrt", "sd3_cosmap"]:
        for space in SPACES:
            for conv in D.CONVENTIONS:
                yield scheme, space, conv


def test_finite_everywhere():
    checked = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for scheme, space, conv in all_cells():
            for params in ({}, {"snr_clamp_min": 1e-3, "snr_clamp_max": 1e3}):
                try:
                    w = D.loss_weight(scheme, LAMS, prediction_type=space, convention=conv, **params)
                except LossInputError:
                    D.check_convention(scheme, space, "reference")  # only convention cells may be refused
                    with pytest.raises(LossInputError):
                        D.check_convention(scheme, space, conv)
                    continue
                assert torch.isfinite(w).all() and (w >= 0).all(), (scheme, space, conv, w)
                checked += 1
        # sangoi through the dispatcher
        pred = torch.randn(9, 3, dtype=torch.float64)
        w = D.loss_weight("sangoi", LAMS, prediction_type="epsilon", predicted=pred, target=pred + 0.1)
        assert torch.isfinite(w).all()
    assert checked > 100


def test_p2_gamma_zero_is_exactly_one():
    w = D.p2_weight(LAMS, prediction_type="epsilon", gamma=0.0, k=3.0)
    assert torch.equal(w, torch.ones_like(w))
    # the other spaces are P·F with P ≡ 1: exactly F (s(λ), e^λ guarded, s(λ/2)²)
    w = D.p2_weight(LAMS, prediction_type="v_prediction", gamma=0.0, dtype=torch.float64)
    assert torch.equal(w, torch.sigmoid(LAMS))
    w = D.p2_weight(LAMS, prediction_type="flow", gamma=0.0, dtype=torch.float64)
    assert torch.equal(w, torch.sigmoid(LAMS / 2) ** 2)
    w = D.p2_weight(LAMS, prediction_type="v_prediction", gamma=0.0, convention="onetrainer")
    assert torch.equal(w, torch.ones_like(w))


EDGE = torch.tensor([-INF, INF], dtype=torch.float64)


@pytest.mark.parametrize(
    "fn, expected",
    [
        (lambda l: D.min_snr_weight(l, prediction_type="epsilon"), [1, 0]),
        (lambda l: D.min_snr_weight(l, prediction_type="v_prediction"), [0, 0]),
        (lambda l: D.min_snr_weight(l, prediction_type="sample"), [0, 5]),
        (lambda l: D.min_snr_weight(l, prediction_type="flow"), [0, 0]),
        (lambda l: D.min_snr_weight(l, prediction_type="epsilon", convention="kohya"), [1, 0]),
        (lambda l: D.debiased_weight(l, prediction_type="epsilon"), [1e5, 0]),
        (
            lambda l: D.debiased_weight(l, prediction_type="epsilon", convention="onetrainer"),
            [1e5, 1000**-0.5],
        ),
        (lambda l: D.debiased_weight(l, prediction_type="epsilon", convention="kohya"), [1e5, 1000**-0.5]),
        (lambda l: D.debiased_weight(l, prediction_type="v_prediction"), [0, 0]),
        (
            lambda l: D.debiased_weight(l, prediction_type="v_prediction", convention="onetrainer"),
            [1, 1001**-0.5],
        ),
        (lambda l: D.debiased_weight(l, prediction_type="v_prediction", convention="kohya"), [1, 1 / 1001]),
        (lambda l: D.debiased_weight(l, prediction_type="sample"), [0, 1e5]),
        (lambda l: D.p2_weight(l, prediction_type="epsilon", k=0.5, gamma=2), [4, 0]),
        (lambda l: D.p2_weight(l, prediction_type="v_prediction"), [0, 0]),
        (
            lambda l: D.p2_weight(l, prediction_type="v_prediction", convention="onetrainer", gamma=0.5),
            [2**-0.5, 0],
        ),
        (lambda l: D.p2_weight(l, prediction_type="flow"), [0, 0]),
        (lambda l: D.p2_weight(l, prediction_type="sample"), [0, 1e10 / (1 + 1e10)]),
        (lambda l: D.edm_weight(l, prediction_type="sample"), [4, 1e10 + 4]),
        (lambda l: D.edm_weight(l, prediction_type="epsilon"), [4e10 + 1, 1]),
        (lambda l: D.edm_weight(l, prediction_type="v_prediction"), [4, 1]),
        (lambda l: D.edm_weight(l, prediction_type="flow"), [4, 1]),
        (lambda l: D.sd3_sigma_sqrt_weight(l), [1, 10000200001]),
        (lambda l: D.sd3_cosmap_weight(l), [2 / math.pi, 2 / math.pi]),
    ],
)
def test_section6_limits(fn, expected):
    w = fn(EDGE)
    assert w.dtype == torch.float32
    assert_rel(w, expected)


def test_nan_propagates_to_its_example_only():
    lam = torch.tensor([NAN, 0.0, INF, -INF], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for scheme, space, conv in all_cells():
            try:
                w = D.loss_weight(scheme, lam, prediction_type=space, convention=conv)
            except LossInputError:
                continue
            assert math.isnan(w[0].item()), (scheme, space, conv)
            assert torch.isfinite(w[1:]).all(), (scheme, space, conv)


def test_clamps_apply_to_lambda_first():
    lam = lam_of([1e-6, 0.5, 1e6])
    w = D.min_snr_weight(
        lam, prediction_type="sample", snr_clamp_min=1e-3, snr_clamp_max=2.0, dtype=torch.float64
    )
    assert_rel(w, [1e-3, 0.5, 2.0])
    # debiased under onetrainer: an explicit clamp replaces the default 1000
    w = D.debiased_weight(
        lam, prediction_type="epsilon", convention="kohya", snr_clamp_max=1e4, dtype=torch.float64
    )
    assert_rel(w[2:], [1e-2])
    w = D.loss_weight("sd3_cosmap", lam, prediction_type="flow", snr_clamp_min=1.0, snr_clamp_max=1.0)
    assert_rel(w, [4 / math.pi] * 3)
    w = D.loss_weight(
        "sangoi",
        lam,
        prediction_type="flow",
        predicted=torch.zeros(3, 2),
        target=torch.ones(3, 2),
        snr_clamp_min=0.0,
    )
    assert_rel(w, [1, 1, 1])  # MAPE 1 everywhere


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"snr_clamp_min": -1.0}, "snr_clamp_min must be >= 0"),
        ({"snr_clamp_min": 2.0, "snr_clamp_max": 1.0}, "snr_clamp_min must be <= snr_clamp_max"),
        ({"dtype": torch.int64}, "dtype must be a floating-point"),
    ],
)
def test_common_validation(kwargs, pattern):
    with pytest.raises(LossInputError, match=pattern):
        D.min_snr_weight(LAM, prediction_type="epsilon", **kwargs)


@pytest.mark.parametrize(
    "call, pattern",
    [
        (
            lambda: D.min_snr_weight(LAM, prediction_type="epsilon", gamma=0),
            "gamma must be a finite number > 0",
        ),
        (
            lambda: D.min_snr_weight(LAM, prediction_type="epsilon", gamma=NAN),
            "gamma must be a finite number > 0",
        ),
        (
            lambda: D.p2_weight(LAM, prediction_type="epsilon", gamma=-1),
            r"gamma must be a finite number >= 0",
        ),
        (lambda: D.p2_weight(LAM, prediction_type="epsilon", k=0), "k must be a finite number > 0"),
        (
            lambda: D.edm_weight(LAM, prediction_type="epsilon", sigma_data=0),
            "sigma_data must be a finite number > 0",
        ),
        (
            lambda: D.min_snr_weight(LAM, prediction_type="eps"),
            "prediction_type must be one of 'epsilon', 'v_prediction', 'sample', 'x0', 'flow', got 'eps'",
        ),
        (
            lambda: D.min_snr_weight(LAM, prediction_type="epsilon", convention="sd"),
            "convention must be one of 'reference', 'onetrainer', 'kohya', 'diffusers', got 'sd'",
        ),
        (
            lambda: D.loss_weight("foo", LAM, prediction_type="epsilon"),
            "scheme must be one of 'constant', 'sangoi'",
        ),
        (
            lambda: D.loss_weight("min_snr", LAM, prediction_type="epsilon", k=1.0),
            r"unexpected parameter\(s\) k; accepted: gamma",
        ),
        (lambda: D.loss_weight("sangoi", LAM, prediction_type="epsilon"), "needs predicted and target"),
        (lambda: D.loss_weight("p2", LAM, prediction_type="epsilon", predicted=LAM), "sangoi' only"),
    ],
)
def test_parameter_validation(call, pattern):
    with pytest.raises(LossInputError, match=pattern):
        call()


def test_p2_large_gamma_warns_once():
    W._warned.discard("p2_gamma")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        D.p2_weight(LAM, prediction_type="epsilon", gamma=5.0)
        D.p2_weight(LAM, prediction_type="epsilon", gamma=5.0)
        D.p2_weight(LAM, prediction_type="epsilon", gamma=2.0)
    assert [str(r.message).startswith("P2 gamma=5.0 > 2") for r in rec] == [True]


def test_sd3_warns_once_outside_flow_and_sample():
    for key in list(W._warned):
        if key.startswith("sd3:"):
            W._warned.discard(key)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        D.loss_weight("sd3_sigma_sqrt", LAM, prediction_type="flow")
        D.loss_weight("sd3_cosmap", LAM, prediction_type="x0")
        assert rec == []
        a = D.loss_weight("sd3_sigma_sqrt", LAM, prediction_type="epsilon", convention="kohya")
        D.loss_weight("sd3_sigma_sqrt", LAM, prediction_type="epsilon")
    assert len(rec) == 1 and "prediction_type='epsilon'" in str(rec[0].message)
    # prediction_type and convention are ignored by the numbers
    assert torch.equal(a, D.sd3_sigma_sqrt_weight(LAM))


def test_dispatcher_equals_direct_calls():
    lam = LAM[::7]
    assert torch.equal(
        D.loss_weight("min_snr", lam, prediction_type="x0", gamma=3.0),
        D.min_snr_weight(lam, prediction_type="sample", gamma=3.0),
    )
    assert torch.equal(
        D.loss_weight("p2", lam, prediction_type="flow", gamma=0.5, k=2.0, dtype=torch.float64),
        D.p2_weight(lam, prediction_type="flow", gamma=0.5, k=2.0, dtype=torch.float64),
    )
    assert torch.equal(
        D.loss_weight("edm", lam, prediction_type="v_prediction", sigma_data=1.0, convention="kohya"),
        D.edm_weight(lam, prediction_type="v_prediction", sigma_data=1.0),
    )
    assert torch.equal(D.loss_weight("constant", lam, prediction_type="epsilon"), torch.ones(lam.shape))


def test_detached_unmutated_shape_and_device():
    lam = (LAM[:12].reshape(3, 4).clone()).requires_grad_(True)
    before = lam.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for scheme, space, conv in all_cells():
            try:
                w = D.loss_weight(scheme, lam, prediction_type=space, convention=conv)
            except LossInputError:
                continue
            assert w.shape == (3, 4) and w.device == lam.device and w.dtype == torch.float32
            assert not w.requires_grad
    assert torch.equal(lam.detach(), before)


def test_float32_sd_scaled_linear_table_needs_float64():
    """The reason tables stay float64: a float32 table shifts SNR by more than the tolerance."""
    t64 = D.alphas_cumprod_from_betas(D.scaled_linear_betas())
    t32 = D.alphas_cumprod_from_betas(D.scaled_linear_betas(dtype=torch.float32))
    s64 = D.snr_from_alphas_cumprod(t64)
    s32 = D.snr_from_alphas_cumprod(t32).double()
    assert ((s32 - s64).abs() / s64).max() > 1e-6
