"""``kernels.columns``: the smoothing support A = [0, V) \\ E and the member sets, their cached indicators, and the
one validator of class-id lists."""

from __future__ import annotations

import pytest
import torch

from losskit.contract import LossInputError
from losskit.kernels.columns import ColumnSet, ids_tensor, member_set, normalize_ids, support_set

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        (None, ()),
        ([], ()),
        ([3, 1, 3, 0], (0, 1, 3)),
        ((4,), (4,)),
        ({2, 0}, (0, 2)),
        (range(2, 5), (2, 3, 4)),
        (torch.tensor([4, 4, 2]), (2, 4)),
        (torch.tensor(1), (1,)),
        (torch.tensor([1, 0], dtype=torch.int32), (0, 1)),
    ],
)
def test_normalize_ids_sorts_and_deduplicates(ids, expected):
    got = normalize_ids(ids, 5, "smoothing_exclude")
    assert got == expected and type(got) is tuple and all(type(i) is int for i in got)


@pytest.mark.parametrize(
    ("ids", "needle"),
    [
        ([5], r"my_ids: class id 5 is outside \[0, V\) with V=5; expected ids in \[0, 5\)"),
        ([0, -1], r"my_ids: class id -1 is outside \[0, V\) with V=5"),
        ([1.0], r"my_ids must hold integer class ids, got 1.0 \(float\)"),
        ([True], "my_ids must hold integer class ids, got True"),
        (["1"], "my_ids must hold integer class ids, got '1'"),
        ("01", "my_ids must be a list, tuple, set or 1-D tensor of class ids, got str"),
        (3, "my_ids must be a list, tuple, set or 1-D tensor of class ids, got int"),
        (torch.tensor([0.0, 1.0]), "my_ids must hold integer class ids, got a tensor of dtype torch.float32"),
        (torch.tensor([True]), "my_ids must hold integer class ids, got a tensor of dtype torch.bool"),
        (torch.zeros(2, 2, dtype=torch.long), r"my_ids must be a 1-D tensor of class ids, got shape \(2, 2\)"),
    ],
)
def test_normalize_ids_errors_name_the_argument(ids, needle):
    with pytest.raises(LossInputError, match=needle):
        normalize_ids(ids, 5, "my_ids")


@pytest.mark.parametrize("num_classes", [0, -3, 2.0, True])
def test_normalize_ids_needs_a_positive_class_count(num_classes):
    with pytest.raises(LossInputError, match="num_classes must be a positive int"):
        normalize_ids([0], num_classes, "smoothing_exclude")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("v", "excluded"), [(2, ()), (7, (0, 6)), (100, (3, 50, 51, 99)), (4, (0, 1, 2, 3))])
def test_support_and_member_sets(dtype, v, excluded):
    sup = support_set(excluded, v, CPU, dtype)
    mem = member_set(excluded, v, CPU, dtype)
    want_support = torch.tensor([0.0 if i in excluded else 1.0 for i in range(v)], dtype=dtype)
    assert isinstance(sup, ColumnSet) and sup.ids == excluded and sup.count == v - len(excluded)
    assert torch.equal(sup.indicator, want_support) and sup.indicator.dtype == dtype
    assert sup.indicator.sum().item() == sup.count
    assert mem.ids == excluded and mem.count == len(excluded)
    assert torch.equal(mem.indicator, 1.0 - want_support)
    assert sup.indicator.device == mem.indicator.device == CPU


def test_indicators_are_cached_per_ids_classes_device_and_dtype():
    a = support_set((1, 2), 9, CPU, torch.float32)
    assert support_set((1, 2), 9, CPU, torch.float32).indicator is a.indicator  # no allocation on a repeat call
    assert support_set((1, 2), 9, CPU, torch.float64).indicator is not a.indicator
    assert support_set((1, 2), 10, CPU, torch.float32).indicator is not a.indicator
    assert support_set((1, 3), 9, CPU, torch.float32).indicator is not a.indicator
    m = member_set((1, 2), 9, CPU, torch.float32)
    assert m.indicator is not a.indicator and member_set((1, 2), 9, CPU, torch.float32).indicator is m.indicator
    assert torch.equal(m.indicator + a.indicator, torch.ones(9))


def test_ids_tensor_is_built_once_per_ids_and_device():
    t = ids_tensor((0, 4, 7), CPU)
    assert t.dtype == torch.int64 and t.tolist() == [0, 4, 7]
    assert ids_tensor((0, 4, 7), CPU) is t
    assert ids_tensor((0, 4), CPU) is not t
