"""Report formatting (losskit/bench/report.py): CSV records, tables, header and the T5 verdict."""

from __future__ import annotations

import csv

import pytest

from losskit.bench import report
from losskit.bench.cross_entropy import MEMCPY_NAME, T5_BASELINE, T5_NAME, T5P_NAME, Row
from losskit.bench.env import Environment
from losskit.bench.memory import MIB

ENV = Environment(
    date="2025-01-01T00:00:00+00:00", git_commit="abc+dirty", device="Test CPU (2 torch threads)",
    capability="AVX2", torch="2.x", triton="3.6.0", cuda="", liger="", cut_cross_entropy="", threads=2,
)


def row(name, ms, *, n=100, v=1000, peak=None, status="ok", floor=1.0):
    return Row(
        name=name, impl="x", mode="m", inplace=False, N=n, V=v, D="", dtype="float32", ms_median=ms,
        ms_min=None if ms is None else ms * 0.9, ms_max=None if ms is None else ms * 1.1,
        reps=0 if ms is None else 5, floor_ms=floor, x_floor=None if ms is None else ms / floor,
        peak_extra_bytes=peak, max_err=None, status=status,
    )


def test_csv_round_trip(tmp_path):
    rows = [row("a", 2.0, peak=3 * 1024**3), row("b", None, status="skipped: no library")]
    path = tmp_path / "sub" / "out.csv"
    report.write_csv(path, ENV, 11.5e9, rows)
    with path.open() as fh:
        got = list(csv.DictReader(fh))
    assert list(got[0]) == list(report.CSV_COLUMNS)
    assert got[0]["peak_extra_gib"] == "3.000000" and got[0]["copy_tb_s"] == "0.0115"
    assert got[0]["git_commit"] == "abc+dirty" and got[0]["inplace"] == "false"
    assert got[1]["ms_median"] == "" and got[1]["peak_extra_gib"] == "" and got[1]["status"] == "skipped: no library"


def test_result_table_units():
    rows = [row("alpha", 12.3456, peak=5 * MIB)]
    cpu = report.result_table(rows, gib=False)
    assert "peak extra MiB" in cpu and "5.0" in cpu and "12.346" in cpu and "12.35" in cpu
    gpu = report.result_table(rows, gib=True)
    assert "peak extra GiB" in gpu and "0.00" in gpu
    md = report.result_table(rows, gib=False, markdown=True).splitlines()
    assert md[0].startswith("| name | N | V | ms |") and md[1] == "|---|---|---|---|---|---|---|---|"


def test_header_lines():
    lines = report.header_lines(ENV, 10e9)
    assert lines[0] == "device: Test CPU (2 torch threads) [AVX2]"
    assert "CUDA n/a" in lines[1] and "triton 3.6.0" in lines[1]
    assert lines[2] == "torch threads: 2" and "abc+dirty" in lines[3] and "10.00 GB/s" in lines[4]


@pytest.mark.parametrize(
    "ours, peak, verdict, mem",
    [(9.0, 1000 * 400 * 4, "met", "met"), (11.0, 1000 * 400 * 4 + 33 * MIB, "MISSED", "MISSED")],
)
def test_t5_verdicts(ours, peak, verdict, mem):
    rows = [row(T5_BASELINE, 10.0, n=1000, v=400), row(T5_NAME, ours, n=1000, v=400, peak=peak)]
    (line,) = report.t5_lines(rows)
    assert line.startswith(f"T5 N=1000 V=400: {ours:.3f} ms / 10.000 ms ({T5_BASELINE}) = {ours / 10:.2f}x")
    assert f"(target <= 1.0: {verdict})" in line and line.endswith(f"({mem})")


def test_t5p_and_stretch_lines():
    rows = [row(T5_BASELINE, 10.0), row(T5_NAME, 9.0), row(T5P_NAME, 11.5), row(MEMCPY_NAME, 5.0)]
    lines = report.t5_lines(rows)
    assert [ln.split(" N=")[0] for ln in lines] == ["T5", "T5p", "T5 stretch"]
    assert "= 1.15x (target <= 1.2: met)" in lines[1]
    assert f"({MEMCPY_NAME}) = 1.80x (target <= 1.5: MISSED)" in lines[2]


def test_t5_not_measured():
    rows = [row(T5_BASELINE, 10.0), row(T5_NAME, None, status="skipped: losskit.kernels not available")]
    assert report.t5_lines(rows) == [
        f"T5 N=100 V=1000: not measured ({T5_NAME}: skipped: losskit.kernels not available; baseline: ok)"
    ]
    assert report.t5_lines([row("other", 1.0)]) == []


def test_cpu_table_shows_the_ratio_to_the_compiled_ce():
    table = report.result_table([row(T5_BASELINE, 10.0), row(T5_NAME, 8.0)], gib=False)
    header, _, first, second = table.splitlines()
    assert "x compiled CE" in header and first.split()[-3] == "1.00" or "1.00" in first
    assert "0.80" in second
    assert "x compiled CE" not in report.result_table([row(T5_NAME, 8.0)], gib=False)


def test_gpu_target_lines():
    n, v = 8192, 128256
    grad = n * v * 2
    rows = [
        row("losskit triton all features (pipeline)", 2.5, n=n, v=v, peak=grad + 10 * MIB),
        row("losskit triton all features (eager)", 2.0, n=n, v=v, peak=grad + 100 * MIB),
        row("seed pipeline naive", 62.0, n=n, v=v, peak=23 * 1024**3),
    ]
    inplace = Row(**{**row("losskit triton all features (eager, in place)", 1.5, n=n, v=v, peak=32 * MIB).__dict__,
                     "inplace": True})
    lines = report.gpu_target_lines(rows + [inplace])
    text = "\n".join(lines)
    assert "T1 losskit triton all features (pipeline) N=8192 V=128256: 2.500 ms (target <= 2.66 ms: met)" in text
    assert "T1s losskit triton all features (eager) N=8192 V=128256: 2.000 ms (target <= 1.82 ms: MISSED)" in text
    assert "T4 losskit triton all features (pipeline) N=16384 V=32000: not measured" in text
    assert any(line.startswith("T2 losskit triton all features (pipeline):") and line.endswith("met)")
               for line in lines)
    assert any(line.startswith("T2 losskit triton all features (eager):") and line.endswith("MISSED)")
               for line in lines)
    assert any(line.startswith("T2 losskit triton all features (eager, in place): 0.031 GiB") for line in lines)
    assert "T3 seed naive / triton eager in place: 41.3x faster (target >= 20: met); 736.0x less" in text
