"""``kernels.prepare``: the per-row view of a call (validity, clamped targets, out-of-range flags, ``[y∈A]``)
and the per-row label smoothing of §3.3, against values written out by hand in the test."""

from __future__ import annotations

import pytest
import torch

from losskit.contract import LossInputError
from losskit.kernels.prepare import check_label_smoothing, compute_dtype, prepare, prepare_smoothing

from .test_nosync import SyncGuard

F64 = torch.float64


def case(lead=(2, 5), v=7, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*lead, v, generator=g).to(dtype)
    target = torch.randint(0, v, lead, generator=g)
    flat = target.view(-1)
    mask = torch.ones(lead, dtype=torch.bool)
    # ignored; out of range and valid (twice); out of range but masked (where the leading shape has room)
    for i, value in ((1, -100), (2, v), (3, -3), (6, 3 * v)):
        if i < flat.numel():
            flat[i] = value
    mask.view(-1)[min(6, flat.numel() - 1)] = False
    return logits, target, mask


@pytest.mark.parametrize("lead", [(2, 5), (9,), (1, 1), (3, 1)])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("ignore_index", [-100, None, 4])
def test_validity_clamped_targets_and_out_of_range(lead, with_mask, ignore_index):
    v = 7
    logits, target, mask = case(lead, v)
    mask = mask if with_mask else None
    with SyncGuard():  # no tensor value is read on the host
        prep = prepare(logits, target, ignore_index=ignore_index, mask=mask, smoothing_exclude=[5, 1])
    t = target.reshape(-1).tolist()
    m = [True] * len(t) if mask is None else mask.reshape(-1).tolist()
    valid = [mi and (ignore_index is None or ti != ignore_index) for ti, mi in zip(t, m, strict=True)]
    assert prep.lead_shape == lead and prep.num_classes == v and prep.dtype == torch.float32
    assert prep.valid.tolist() == valid and prep.valid.dtype == torch.bool and prep.valid.dim() == 1
    assert prep.target.tolist() == [min(max(ti, 0), v - 1) for ti in t] and prep.target.dtype == torch.int64
    assert prep.out_of_range.tolist() == [ok and not 0 <= ti < v for ti, ok in zip(t, valid, strict=True)]
    assert prep.support.ids == (1, 5) and prep.num_support == v - 2
    in_a = [float(min(max(ti, 0), v - 1) not in (1, 5)) for ti in t]
    assert prep.target_in_support.tolist() == in_a and prep.target_in_support.dtype == torch.float32


def test_int32_targets_and_the_compute_dtype():
    logits, target, _ = case()
    prep = prepare(logits.double(), target.int(), ignore_index=-100, mask=None, smoothing_exclude=())
    assert prep.target.dtype == torch.int64 and prep.dtype == F64 and prep.target_in_support.dtype == F64
    assert prep.support.ids == () and prep.num_support == 7
    assert compute_dtype(torch.zeros(1, dtype=F64)) == F64
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        assert compute_dtype(torch.zeros(1, dtype=dt)) == torch.float32
        prep = prepare(logits.to(dt), target, ignore_index=-100, mask=None, smoothing_exclude=())
        assert prep.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"logits": torch.zeros(2, 3, 4, 5)},
         r"logits must have shape \(N, V\) or \(B, T, V\), got \(2, 3, 4, 5\)"),
        ({"logits": torch.zeros(2, 5, dtype=torch.long)}, "logits must be a floating-point tensor"),
        ({"logits": torch.zeros(2, 1)}, "at least 2 classes"),
        ({"target": torch.zeros(3, dtype=torch.long)},
         r"target must have the leading shape of logits \(2,\), got \(3,\)"),
        ({"target": torch.zeros(2)}, "target must be an integer tensor"),
        ({"mask": torch.ones(2)}, "mask must be a bool tensor"),
        ({"mask": torch.ones(3, dtype=torch.bool)}, "mask must have the leading shape"),
        ({"token_weight": torch.ones(2, dtype=torch.long)}, "token_weight must be a floating-point tensor"),
        ({"token_weight": torch.ones(2, 1)}, "token_weight must have the leading shape"),
        ({"ignore_index": 1.5}, "ignore_index must be an int or None, got 1.5"),
        ({"ignore_index": True}, "ignore_index must be an int or None, got True"),
        ({"smoothing_exclude": [5]}, r"smoothing_exclude: class id 5 is outside \[0, V\) with V=5"),
        ({"smoothing_exclude": [-1]}, "smoothing_exclude: class id -1"),
        ({"smoothing_exclude": ["a"]}, "smoothing_exclude must hold integer class ids"),
        ({"smoothing_exclude": "0"}, "smoothing_exclude must be a list"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, needle):
    args = {"logits": torch.zeros(2, 5), "target": torch.zeros(2, dtype=torch.long), "ignore_index": -100,
            "mask": None, "smoothing_exclude": (), "token_weight": None}
    args.update(kwargs)
    logits, target = args.pop("logits"), args.pop("target")
    with pytest.raises(LossInputError, match=needle):
        prepare(logits, target, **args)


def test_the_check_order_reports_shapes_before_ids():
    # both the target shape and an excluded id are wrong: the shape is reported (one order on every path)
    with pytest.raises(LossInputError, match="target must have the leading shape"):
        prepare(torch.zeros(2, 5), torch.zeros(3, dtype=torch.long), ignore_index=-100, mask=None,
                smoothing_exclude=[9])


# ---- prepare_smoothing -------------------------------------------------------------------------------------


def _smoothing_case(excluded=(1, 4), v=6):
    logits = torch.zeros(8, v, dtype=F64)
    target = torch.tensor([0, 1, 2, 3, 4, 5, -100, 2])
    return prepare(logits, target, ignore_index=-100, mask=None, smoothing_exclude=excluded)


def test_no_smoothing_gives_no_tensors():
    sm = prepare_smoothing(_smoothing_case(), 0.0, "torch", None, torch.device("cpu"))
    assert sm.eps == 0.0 and sm.eps_t is None and sm.eps_over_kt is None and sm.target_in_at is None
    assert sm.k_ratio is None


@pytest.mark.parametrize("convention", ["torch", "fairseq"])
@pytest.mark.parametrize("hard", [None, (), (2,), (1, 2, 5)])
def test_eps_t_and_k_ratio_per_row(convention, hard):
    eps, v, excluded = 0.3, 6, (1, 4)
    prep = _smoothing_case(excluded, v)
    sm = prepare_smoothing(prep, eps, convention, hard, torch.device("cpu"))
    hard_ids = set(excluded if hard is None else hard)
    k = v - len(excluded)
    for i, y in enumerate(prep.target.tolist()):
        in_a = y not in excluded
        e = 0.0 if y in hard_ids else eps
        k_t = k if convention == "torch" else k - in_a
        assert sm.eps_t[i].item() == pytest.approx(e, abs=0), i
        assert sm.eps_over_kt[i].item() == pytest.approx(e / k_t if e else 0.0, rel=1e-15, abs=0), i
        assert sm.target_in_at[i].item() == (float(in_a) if convention == "torch" else 0.0), i
        assert sm.k_ratio[i].item() == pytest.approx(k / k_t, rel=1e-15), i
    for t in (sm.eps_t, sm.eps_over_kt, sm.target_in_at, sm.k_ratio):
        assert t.dtype == F64 and t.shape == (8,)
    assert sm.eps == eps


def test_hard_targets_default_to_the_excluded_ids():
    prep = _smoothing_case((0, 5))
    sm = prepare_smoothing(prep, 0.2, "torch", None, torch.device("cpu"))
    rows = zip(prep.target.tolist(), sm.eps_t.tolist(), prep.valid.tolist(), strict=True)
    assert [y for y, e, ok in rows if ok and e == 0] == [0, 5]


def test_hard_target_ids_out_of_range_name_the_argument():
    with pytest.raises(LossInputError, match=r"hard_target_ids: class id 6 is outside \[0, V\) with V=6"):
        prepare_smoothing(_smoothing_case(), 0.1, "torch", [6], torch.device("cpu"))
    with pytest.raises(LossInputError, match="hard_target_ids must hold integer class ids"):
        prepare_smoothing(_smoothing_case(), 0.1, "torch", [1.5], torch.device("cpu"))


@pytest.mark.parametrize(
    ("eps", "convention", "k", "needle"),
    [
        (1.0, "torch", 5, r"label_smoothing must be a number in \[0, 1\), got 1.0"),
        (-0.1, "torch", 5, "label_smoothing must be a number in"),
        (True, "torch", 5, "label_smoothing must be a number in"),
        ("0.1", "torch", 5, "label_smoothing must be a number in"),
        (0.1, "hf", 5, "smoothing_convention must be one of 'torch', 'fairseq', got 'hf'"),
        (0.1, "torch", 0, "smoothing_exclude leaves K=0 class"),
        (0.1, "fairseq", 1, r"smoothing_exclude leaves K=1 class\(es\).*needs K >= 2"),
    ],
)
def test_check_label_smoothing_names_the_argument(eps, convention, k, needle):
    with pytest.raises(LossInputError, match=needle):
        check_label_smoothing(eps, convention, k)


def test_check_label_smoothing_returns_a_float():
    got = check_label_smoothing(0, "fairseq", 1)  # no smoothing mass: any K is fine
    assert got == 0.0 and type(got) is float
    assert check_label_smoothing(0.25, "fairseq", 2) == 0.25
