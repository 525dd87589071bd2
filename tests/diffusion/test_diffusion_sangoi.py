"""The Sangoi weight of seed 001 (spec/diffusion.md §5, V6; acceptance 6-9).

"README" below is a plain transcription of the seed's formula, with its dims [1, 2, 3] generalised to all
non-batch dims; it is the oracle wherever it is finite.
"""

import math

import pytest
import torch

from losskit.contract import LossInputError
from losskit.functional import diffusion as D

INF, NAN = math.inf, math.nan
F64 = torch.float64


def readme(snr, predicted, target):
    """The seed's _sangoi_loss_modifier body, with self._snr(...) replaced by the given SNR."""
    snr = torch.clamp(snr, min=1e-4, max=100)
    epsilon = 1e-8
    mape = torch.abs((target - predicted) / (target + epsilon))
    mape = torch.clamp(mape, min=0, max=1)
    mape = mape.reshape(mape.shape[0], -1).mean(dim=1)
    snr_weight = torch.log(snr + 1)
    mape_reward = 1 - mape
    return torch.exp(-mape_reward * snr_weight)


def readme_rel(predicted, target):
    return torch.clamp(torch.abs((target - predicted) / (target + 1e-8)), min=0, max=1)


def assert_rel(actual, expected, rtol=1e-6):
    a = torch.as_tensor(actual).double().reshape(-1)
    e = torch.as_tensor(expected, dtype=F64).reshape(-1)
    assert a.shape == e.shape
    for x, y in zip(a.tolist(), e.tolist()):
        if y == 0:
            assert x == 0, (a, e)
        else:
            assert abs(x - y) <= rtol * abs(y), (a, e)


def set_a(dtype=F64):
    t = torch.tensor(
        [[[1, -2], [0.5, 4]], [[0, 1], [2, -1]], [[0.3, -0.7], [1.2, 2.5]], [[-1e-8, 1], [1, 1]]], dtype=dtype
    )[:, None]
    p = t.clone()
    p[0, 0] = torch.tensor([[1.1, -1.8], [0.4, 4.0]], dtype=dtype)
    p[1, 0] = torch.tensor([[0.001, 1.5], [2, -1]], dtype=dtype)
    return torch.tensor([0.5, 5, 1000, 0], dtype=F64), p, t


def set_b():
    t = torch.tensor([[2, -4, 0.5, 1], [-1e-8, -1e-8, 3, 3]], dtype=F64)[:, None]
    p = torch.tensor([[2.2, -4, 0.5, 0.7], [0.5, -1e-8, 3, 3]], dtype=F64)[:, None]
    return torch.tensor([2.0, 50.0], dtype=F64), p, t


def set_c():
    t = torch.ones(2, 1, 2, 1, 2, dtype=F64)
    t[1] = 2
    p = t.clone()
    p[0] = 1.5
    return torch.tensor([1.0, 1000.0], dtype=F64), p, t


def set_d():
    t = torch.tensor([[1, 1, 1, 1], [1, -3, 2, 0.5]], dtype=F64)
    p = torch.tensor([[1.2, 1, 5, 1], [1, -3, 2, 0.5]], dtype=F64)
    return torch.tensor([10.0, 10.0], dtype=F64), p, t


def set_e():
    t = torch.tensor([[0, 1], [0, 1]], dtype=torch.float16)
    p = torch.tensor([[0, 1], [0.001, 1]], dtype=torch.float16)
    return torch.tensor([1.0, 1.0], dtype=F64), p, t


def test_set_a_float64():
    snr, p, t = set_a()
    assert_rel(D.sangoi_mape(p, t), [0.0999999989, 0.374999999, 0, 0])
    w = D.sangoi_weight(snr, p, t)
    assert w.dtype == torch.float32 and w.shape == (4,)
    assert_rel(w, [0.694253162, 0.326328848, 0.0099009901, 0.99990001])
    ref = readme(snr, p, t)
    assert torch.isnan(ref[3]) and torch.isfinite(w).all()  # negative control: the README is NaN on A:3
    assert_rel(w[:3], ref[:3])


def test_set_a_float32_and_float16():
    snr, p, t = set_a(torch.float32)
    mape = D.sangoi_mape(p, t)
    assert mape.dtype == torch.float32
    assert_rel(mape, [0.100000009, 0.375, 0, 0])
    assert_rel(D.sangoi_weight(snr, p, t)[:2], [0.694253165, 0.326328849])
    snr, p, t = set_a(torch.float16)
    mape = D.sangoi_mape(p[:1], t[:1])
    assert mape.dtype == torch.float32  # fp16 is computed in float32
    assert_rel(mape, [0.0999755859])
    assert_rel(D.sangoi_weight(snr[:1], p[:1], t[:1]), [0.69424629])


def test_set_b_rank3():
    snr, p, t = set_b()
    assert_rel(D.sangoi_mape(p, t), [0.0999999991, 0.25])
    w = D.sangoi_weight(snr, p, t)
    assert_rel(w, [0.372041058, 0.0523989239])
    assert torch.isnan(readme(snr, p, t)[1])


def test_set_c_rank5():
    snr, p, t = set_c()
    assert_rel(D.sangoi_mape(p, t), [0.499999995, 0])
    assert_rel(D.sangoi_weight(snr, p, t), [0.707106779, 0.0099009901])
    assert_rel(readme(snr, p, t), [0.707106779, 0.0099009901])


def test_set_d_with_and_without_mask():
    snr, p, t = set_d()
    assert_rel(D.sangoi_mape(p, t), [0.2999999995, 0])
    assert_rel(D.sangoi_weight(snr, p, t), [0.186648765, 0.0909090909])
    for mask in (
        torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0]], dtype=torch.bool),
        torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0]], dtype=torch.float32),
    ):
        assert_rel(D.sangoi_mape(p, t, mask=mask), [0.066666666, 1])
        assert_rel(D.sangoi_weight(snr, p, t, mask=mask), [0.106667838, 1])


def test_set_e_float16():
    snr, p, t = set_e()
    assert_rel(D.sangoi_mape(p, t), [0, 0.5])
    assert_rel(D.sangoi_weight(snr, p, t), [0.5, 0.707106781])
    assert torch.isnan(readme(snr, p, t)[0])  # 1e-8 underflows in float16: 0/0


def test_mask_broadcasts_and_weights():
    snr, p, t = set_a()
    per_channel = torch.tensor([True])[None, :, None, None]  # [1,1,1,1]
    assert torch.equal(D.sangoi_weight(snr, p, t, mask=per_channel), D.sangoi_weight(snr, p, t))
    rows = torch.tensor([[1.0], [0.0]])  # broadcasts over the last dim: first row only
    mape = D.sangoi_mape(p, t, mask=rows)
    expected = readme_rel(p, t)[:, :, 0, :].reshape(4, -1).mean(1)
    assert torch.allclose(mape[:3], expected[:3], rtol=1e-12)
    with pytest.raises(LossInputError, match=r"mask must broadcast to the shape of predicted \(4, 1, 2, 2\)"):
        D.sangoi_weight(snr, p, t, mask=torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize("case", range(50))
def test_readme_parity_random(case):
    g = torch.Generator().manual_seed(1000 + case)
    rank = 1 + case % 5
    dtype = F64 if case % 2 else torch.float32
    shape = [int(torch.randint(1, 5, (1,), generator=g))] + [
        int(torch.randint(1, 4, (1,), generator=g)) for _ in range(rank - 1)
    ]
    t = (torch.randn(shape, generator=g, dtype=F64) * 10 ** torch.randint(-3, 2, shape, generator=g)).to(
        dtype
    )
    p = t + torch.randn(shape, generator=g, dtype=F64).to(dtype) * 0.5
    p = torch.where(torch.rand(shape, generator=g) < 0.3, t, p)  # some exact predictions
    t = torch.where(
        torch.rand(shape, generator=g) < 0.1, torch.zeros_like(t), t
    )  # zero targets (t + eps != 0)
    assert not bool(((t + 1e-8) == 0).any())
    snr = torch.exp(torch.randn(shape[0], generator=g, dtype=F64) * 4)
    rel = D.sangoi_relative_error(p, t)
    assert rel.dtype == dtype
    assert torch.equal(rel, readme_rel(p, t))  # bit-identical per element
    w = D.sangoi_weight(snr, p, t)
    ref = readme(snr, p, t)
    assert torch.isfinite(ref).all()
    assert torch.allclose(w.double(), ref.double(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("gamma", [None, 0, 5, 1e9])
def test_drop_in_equals_sangoi_weight(gamma):
    table = D.alphas_cumprod_from_betas(D.scaled_linear_betas())
    timesteps = torch.tensor([0, 17, 500, 999])
    _, p, t = set_a()
    w = D.sangoi_loss_modifier(timesteps, p, t, gamma, torch.device("cpu"), alphas_cumprod=table)
    expected = D.sangoi_weight(D.snr_from_alphas_cumprod(table, timesteps), p, t)
    assert torch.equal(w, expected)
    assert torch.equal(D.sangoi_loss_modifier(timesteps, p, t, alphas_cumprod=table), expected)
    assert torch.equal(
        D.sangoi_weight(torch.tensor([1.0, 2, 3, 4]), p, t, gamma),
        D.sangoi_weight(torch.tensor([1.0, 2, 3, 4]), p, t),
    )


@pytest.mark.parametrize("make", [set_a, set_b, set_e])
def test_nan_safe_gradients(make):
    snr, p, t = make()
    p = p.clone().requires_grad_(True)
    w = D.sangoi_weight(snr, p, t, detach=False)
    assert w.requires_grad and torch.isfinite(w).all()
    (w * torch.arange(1, w.numel() + 1)).sum().backward()
    assert torch.isfinite(p.grad).all()


def test_non_detached_gradient_matches_readme_autograd():
    snr, p, t = set_c()
    p1 = p.clone().requires_grad_(True)
    p2 = p.clone().requires_grad_(True)
    D.sangoi_weight(snr, p1, t, detach=False, dtype=F64).sum().backward()
    readme(snr, p2, t).sum().backward()
    assert torch.allclose(p1.grad, p2.grad, rtol=1e-12, atol=0)
    assert p1.grad.abs().sum() > 0


def test_gradcheck_away_from_kinks():
    g = torch.Generator().manual_seed(0)
    t = (torch.rand(3, 2, 3, generator=g, dtype=F64) + 0.5) * torch.where(
        torch.rand(3, 2, 3, generator=g) < 0.5, -1.0, 1.0
    ).double()
    p = (t * (1 + 0.1 + 0.6 * torch.rand(3, 2, 3, generator=g, dtype=F64))).requires_grad_(
        True
    )  # rel in (0.1, 0.7)
    tt = t.clone().requires_grad_(True)
    snr = torch.tensor([0.3, 7.0, 60.0], dtype=F64)
    assert torch.autograd.gradcheck(
        lambda a, b: D.sangoi_weight(snr, a, b, detach=False, dtype=F64), (p, tt), eps=1e-7, atol=1e-8
    )


def test_properties_random():
    g = torch.Generator().manual_seed(1)
    snr = torch.exp(torch.randn(4000, generator=g, dtype=F64) * 6)
    mape = torch.rand(4000, generator=g, dtype=F64)
    w = D.sangoi_weight_from_mape(snr, mape, dtype=F64)
    assert (w >= 1 / 101 - 1e-15).all() and (w <= 1).all()
    assert torch.equal(D.sangoi_weight_from_mape(snr, torch.ones_like(mape), dtype=F64), torch.ones_like(snr))
    low = snr[(snr <= 100) & (snr >= 1e-4)]  # below 1e-4 the Sangoi clamp holds s at 1e-4 (w within 1e-4)
    w0 = D.sangoi_weight_from_mape(low, torch.zeros_like(low), dtype=F64)
    p2 = D.p2_weight(torch.log(low), prediction_type="epsilon", gamma=1.0, k=1.0, dtype=F64)
    assert torch.allclose(w0, p2, rtol=1e-12, atol=0)
    # monotone: rises with MAPE, falls with SNR
    ms = torch.linspace(0, 1, 101, dtype=F64)
    for s in (0.0, 0.5, 30.0, 1e6):
        ws = D.sangoi_weight_from_mape(torch.full_like(ms, s), ms, dtype=F64)
        assert (ws[1:] >= ws[:-1]).all()
    ss = torch.logspace(-6, 6, 101, dtype=F64)
    for m in (0.0, 0.3, 0.99):
        ws = D.sangoi_weight_from_mape(ss, torch.full_like(ss, m), dtype=F64)
        assert (ws[1:] <= ws[:-1]).all()


def test_snr_edges_and_min_snr_zero():
    w = D.sangoi_weight_from_mape(
        torch.tensor([0.0, INF, NAN], dtype=F64), torch.zeros(3, dtype=F64), dtype=F64
    )
    assert_rel(w[:2], [1 / 1.0001, 1 / 101])
    assert math.isnan(w[2].item())
    w = D.sangoi_weight_from_mape(torch.tensor([0.0]), torch.tensor([0.2]), min_snr=0.0)
    assert w.item() == 1.0
    with pytest.raises(LossInputError, match="min_snr <= max_snr"):
        D.sangoi_weight_from_mape(torch.tensor([1.0]), torch.tensor([0.2]), min_snr=5.0, max_snr=1.0)


def test_nan_or_inf_inputs_give_nan_for_that_example_only():
    snr, p, t = set_d()
    for bad in (NAN, INF, -INF):
        pb = p.clone()
        pb[0, 1] = bad
        w = D.sangoi_weight(snr, pb, t)
        assert math.isnan(w[0].item()) and math.isfinite(w[1].item())
        tb = t.clone()
        tb[1, 2] = bad
        w = D.sangoi_weight(snr, p, tb)
        assert math.isfinite(w[0].item()) and math.isnan(w[1].item())
    # a bad value at a masked-out element does not reach the example
    pb = p.clone()
    pb[0, 2] = NAN
    mask = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.isfinite(D.sangoi_weight(snr, pb, t, mask=mask)).all()


def test_detached_unmutated_dtype_device():
    snr, p, t = set_a()
    p = p.clone().requires_grad_(True)
    mask = torch.ones(4, 1, 2, 2)
    before = [x.detach().clone() for x in (snr, p, t, mask)]
    w = D.sangoi_weight(snr, p, t, mask=mask)
    assert not w.requires_grad and w.dtype == torch.float32 and w.device == p.device
    w = D.loss_weight(
        "sangoi", torch.log(snr), prediction_type="v_prediction", predicted=p, target=t, mask=mask
    )
    assert not w.requires_grad and w.dtype == torch.float32
    for x, y in zip((snr, p, t, mask), before):
        assert torch.equal(x.detach(), y)
    assert D.sangoi_weight(snr, p, t, dtype=F64).dtype == F64


@pytest.mark.parametrize(
    "args, pattern",
    [
        ((torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0)), r"predicted must have a batch dimension"),
        (
            (torch.ones(2), torch.ones(2, 3), torch.ones(2, 4)),
            r"target must have the shape of predicted \(2, 3\)",
        ),
        (
            (torch.ones(3), torch.ones(2, 3), torch.ones(2, 3)),
            r"snr must hold one value per example \(shape \[2\]",
        ),
        (
            (torch.ones(2), torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3)),
            r"predicted must be a floating",
        ),
        ((torch.ones(2), torch.ones(2, 3), [1.0]), r"target must be a torch.Tensor"),
    ],
)
def test_bad_inputs(args, pattern):
    with pytest.raises(LossInputError, match=pattern):
        D.sangoi_weight(*args)


def test_drop_in_validates_timesteps():
    table = D.alphas_cumprod_from_betas(D.linear_betas(10))
    with pytest.raises(LossInputError, match=r"timesteps must lie in \[0, 10\)"):
        D.sangoi_loss_modifier(torch.tensor([10]), torch.ones(1, 2), torch.ones(1, 2), alphas_cumprod=table)
