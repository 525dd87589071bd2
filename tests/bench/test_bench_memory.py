"""Memory method and floor (losskit/bench/memory.py): procfs peak RSS, copy bandwidth, floor formula."""

from __future__ import annotations

import pytest
import torch

from losskit.bench import memory


def test_floor_formula():
    # read + write of 1000 x 1000 fp32 at 8 GB/s: 8e6 bytes / 8e9 B/s = 1 ms
    assert memory.floor_ms(1000, 1000, 4, 8e9) == pytest.approx(1.0)
    assert memory.floor_ms(8192, 128256, 2, 3.0e12) == pytest.approx(1.401, abs=1e-3)  # the anchors' floor


def test_copy_bandwidth_is_plausible():
    bw = memory.copy_bandwidth(16 * memory.MIB, "cpu", reps=3)
    assert 1e8 < bw < 1e13


@pytest.mark.skipif(not memory.rss_supported(), reason="needs Linux procfs clear_refs")
def test_peak_rss_sees_a_touched_allocation_and_nothing_else():
    size = 64 * memory.MIB
    kept = []

    def allocate():
        kept.append(torch.ones(size // 4, dtype=torch.float32))  # ones() touches every page

    # Slack below: pages the allocator keeps resident (and the interpreter's own) may absorb a few hundred KiB.
    low, high = size - 4 * memory.MIB, size + 16 * memory.MIB
    extra = memory.host_peak_extra_bytes(allocate)
    assert low <= extra <= high
    kept.clear()
    # A temporary that is freed again still counts: the method reads the peak, not the end state.
    extra_tmp = memory.host_peak_extra_bytes(lambda: torch.ones(size // 4).sum())
    assert low <= extra_tmp <= high
    assert memory.host_peak_extra_bytes(lambda: None) < 4 * memory.MIB
