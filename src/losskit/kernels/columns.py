"""Column sets of a call: the smoothing support A = {0..V−1} \\ E and the hard-target ids.

Ids are validated on the host from the id list (never from tensor values of the step), and the on-device
indicator of each set is built once and cached per (ids, V, device, dtype), so repeated calls cost no
allocation and no host-to-device copy.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable

import torch

from losskit.functional.cross_entropy import exclude_ids


def normalize_ids(ids: Iterable[int] | torch.Tensor | None, num_classes: int, name: str) -> tuple[int, ...]:
    """Sorted, de-duplicated class ids in ``[0, V)``; ``LossInputError`` naming ``name`` otherwise.

    ``functional.exclude_ids`` under the kernels' argument name, so that a bad id gets the functional call's
    message on every path. A tensor is accepted for convenience; it is read on the host (configuration, not
    step data), so pass a list or tuple on the hot path.
    """
    return exclude_ids(ids, num_classes, name=name)


@dataclasses.dataclass(frozen=True)
class ColumnSet:
    """A set of class ids as a float indicator on the device.

    Attributes:
        ids: the sorted member ids (for the support: the excluded ids E).
        indicator: ``(V,)`` float tensor, 1 on members of the indicated set, else 0.
        count: number of ones in ``indicator``.
    """

    ids: tuple[int, ...]
    indicator: torch.Tensor
    count: int


@functools.lru_cache(maxsize=64)
def _indicator(
    ids: tuple[int, ...], num_classes: int, device: torch.device, dtype: torch.dtype, value: float
) -> torch.Tensor:
    ind = torch.full((num_classes,), 1.0 - value, dtype=dtype)
    if ids:
        ind[torch.tensor(ids, dtype=torch.long)] = value
    return ind.to(device)


def support_set(
    excluded: tuple[int, ...], num_classes: int, device: torch.device, dtype: torch.dtype
) -> ColumnSet:
    """The smoothing support A = all ids minus ``excluded``: indicator 1 on A, 0 on E; ``count = K``."""
    return ColumnSet(
        excluded, _indicator(excluded, num_classes, device, dtype, 0.0), num_classes - len(excluded)
    )


def member_set(ids: tuple[int, ...], num_classes: int, device: torch.device, dtype: torch.dtype) -> ColumnSet:
    """The set ``ids`` itself: indicator 1 on its members (used for ``hard_target_ids``)."""
    return ColumnSet(ids, _indicator(ids, num_classes, device, dtype, 1.0), len(ids))


@functools.lru_cache(maxsize=64)
def ids_tensor(ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The ids as an int64 tensor on ``device``, built once per (ids, device)."""
    return torch.tensor(ids, dtype=torch.long).to(device)
