"""Smoke tests of the cross-entropy benchmark (`losskit bench`, `benchmarks/bench_cross_entropy.py`).

spec/kernels.md §8 item 7: CPU quick mode writes a CSV with every §6 column; the rows are present and competitors
that cannot run here are marked ``skipped: <reason>``. The in-process run uses a test-only shape override
(``--shapes``) so it stays within a few seconds; the real ``--cpu --quick`` run is the slow test at the end.
"""

from __future__ import annotations

import csv
import math
import os
import pathlib
import subprocess
import sys
import time

import pytest

from losskit.bench import cli, cross_entropy, report

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_cross_entropy.py"

SECTION6_COLUMNS = [
    "date", "git_commit", "device", "capability", "torch", "triton", "cuda", "liger", "cut_cross_entropy",
    "copy_tb_s", "name", "impl", "mode", "inplace", "N", "V", "D", "dtype", "ms_median", "ms_min", "ms_max",
    "reps", "floor_ms", "x_floor", "peak_extra_gib", "max_err", "status",
]
CPU_TORCH_ROWS = {
    "memcpy of the logits (read + write)",
    "torch.compile CE label_smoothing=0.1",
    "torch F.cross_entropy (plain)",
    "torch F.cross_entropy label_smoothing=0.1",
    "seed pipeline naive",
    "torch pipeline careful",
}
CPU_LOSSKIT_ROWS = {
    "losskit chunked label_smoothing=0.1",
    "losskit chunked seed-000 pipeline (smoothing 0.1 + H(q) weight)",
    "losskit chunked modifier pipeline (seed 000, no z-loss)",
    "losskit torch all features (pipeline)",
    "losskit chunked all features (pipeline)",
    "losskit chunked all features (pipeline, in place)",
    "losskit chunked all features (eager)",
    "losskit chunked all features (eager, in place)",
}


def kernels_available() -> bool:
    try:
        from losskit.kernels import fused_token_loss, token_stats  # noqa: F401
    except ImportError:
        return False
    return True


def read_csv(path: pathlib.Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "out.csv"
    shapes = [(64, 1000), (32, 4099)]
    wall, cpu = time.perf_counter(), time.process_time()
    code = cli.main(
        ["--cpu", "--quick", "--check", "--reps", "2", "--csv", str(path),
         "--shapes", ",".join(f"{n}x{v}" for n, v in shapes)]
    )
    # CPU time bounds the idle wall time of this CPU-bound run; wall time alone grows with other jobs' load.
    return code, path, shapes, min(time.perf_counter() - wall, time.process_time() - cpu)


def test_exit_code_and_budget(tiny_run):
    code, _, _, seconds = tiny_run
    assert code == 0
    assert seconds < 30


def test_csv_has_every_section6_column(tiny_run):
    _, path, _, _ = tiny_run
    header, rows = read_csv(path)
    assert header == SECTION6_COLUMNS == list(report.CSV_COLUMNS)
    for r in rows:
        for col in ("date", "git_commit", "device", "capability", "torch", "copy_tb_s", "name", "impl", "mode",
                    "inplace", "N", "V", "dtype", "reps", "floor_ms", "status"):
            assert r[col] != "", (col, r["name"])
        assert float(r["copy_tb_s"]) > 0
        assert r["dtype"] == "float32" and r["D"] == ""
        assert r["inplace"] in ("true", "false")


def test_every_entry_has_a_row_per_shape(tiny_run):
    _, path, shapes, _ = tiny_run
    _, rows = read_csv(path)
    names = [e.name for e in cross_entropy.ENTRIES]
    assert [(int(r["N"]), int(r["V"]), r["name"]) for r in rows] == [(n, v, name) for n, v in shapes for name in names]
    assert CPU_TORCH_ROWS | CPU_LOSSKIT_ROWS <= set(names)


def test_statuses(tiny_run):
    _, path, _, _ = tiny_run
    _, rows = read_csv(path)
    expected_ok = CPU_TORCH_ROWS | (CPU_LOSSKIT_ROWS if kernels_available() else set())
    for r in rows:
        name, status = r["name"], r["status"]
        if name in expected_ok:
            assert status == "ok", (name, status)
        else:
            assert status.startswith("skipped: ") and len(status) > len("skipped: "), (name, status)
        if name.startswith("liger"):
            assert status in ("skipped: liger_kernel not installed", "skipped: CPU mode (liger_kernel needs CUDA)")
        if "triton" in name:
            assert status.startswith(("skipped: triton impl not available", "skipped: CPU mode",
                                      "skipped: losskit.kernels not available"))
        if name.startswith("torch.compile") and name not in expected_ok:
            assert status.startswith("skipped: --quick")  # the compiled pipelines: too long to compile there
        if name in CPU_LOSSKIT_ROWS and not kernels_available():
            assert status.startswith("skipped: losskit.kernels not available")


def test_measured_values_are_consistent(tiny_run):
    _, path, _, _ = tiny_run
    _, rows = read_csv(path)
    for r in rows:
        if r["status"] != "ok":
            assert r["ms_median"] == r["ms_min"] == r["ms_max"] == r["x_floor"] == "" and r["reps"] == "0"
            continue
        lo, med, hi = float(r["ms_min"]), float(r["ms_median"]), float(r["ms_max"])
        assert 0 < lo <= med <= hi
        assert r["reps"] == "2"
        assert math.isclose(float(r["x_floor"]), med / float(r["floor_ms"]), rel_tol=1e-3)
        assert float(r["peak_extra_gib"]) >= 0
        # --check: every fp32 entry within fp32 accuracy of its fp64 oracle on the first 64 rows
        assert float(r["max_err"]) < 1e-4, (r["name"], r["max_err"])


def test_t5_line_is_printed(tiny_run, capsys):
    if not kernels_available():
        pytest.skip("losskit.kernels not available yet")
    code = cli.main(["--cpu", "--reps", "1", "--shapes", "32x1000", "--csv", str(tiny_run[1].with_name("t5.csv"))])
    out = capsys.readouterr().out
    assert code == 0
    assert "T5 N=32 V=1000:" in out and "(target <= 1.2:" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shapes", "100x"], "--shapes must be comma-separated NxV pairs"),
        (["--shapes", "3000x1000"], "N must be a multiple of the sequence length 2048"),
        (["--shapes", "8x1"], "N >= 1 and V >= 2"),
        (["--reps", "0"], "--reps must be >= 1, got 0"),
    ],
)
def test_bad_arguments_exit_2(argv, message, capsys):
    assert cli.main(["--cpu", *argv]) == 2
    assert message in capsys.readouterr().err


def test_default_csv_path_is_dated_under_bench_results():
    import datetime

    path = cli.default_csv_path(datetime.datetime(2025, 3, 4, 5, 6, 7, tzinfo=datetime.UTC))
    assert path == pathlib.Path("bench_results/bench_cross_entropy_2025-03-04T050607Z.csv")


def test_script_help():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: bench_cross_entropy.py")
    for flag in ("--cpu", "--quick", "--check", "--big-vocab", "--csv", "--reps"):
        assert flag in out.stdout


def test_losskit_bench_help():
    out = subprocess.run([sys.executable, "-m", "losskit", "bench", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: losskit bench")


@pytest.mark.slow
def test_script_cpu_quick_runs_the_ci_command(tmp_path):
    """The real CI command on the pinned quick shapes: its CSV and its target lines.

    Its time is a measurement, not an assertion (a shared machine's wall clock says nothing about 2 idle cores):
    the run prints it, and ``benchmarks/RESULTS.md`` records it.
    """
    path = tmp_path / "quick.csv"
    start = time.perf_counter()
    out = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--quick", "--csv", str(path)],
                         capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - start
    assert out.returncode == 0, out.stderr[-2000:]
    header, rows = read_csv(path)
    assert header == SECTION6_COLUMNS
    assert {(int(r["N"]), int(r["V"])) for r in rows} == set(cross_entropy.CPU_QUICK_SHAPES)
    assert all(r["reps"] == "5" for r in rows if r["status"] == "ok")
    assert "T5 N=512 V=32000:" in out.stdout or not kernels_available()
    print(f"--cpu --quick: {wall:.1f} s wall (load average {os.getloadavg()[0]:.1f})")


@pytest.mark.skipif(not kernels_available(), reason="losskit.kernels not available yet")
def test_in_place_memory_is_not_charged_a_gradient_copy():
    """The step hands the gradient on (autograd.grad), so an in-place entry costs no gradient buffer (spec §5)."""
    import torch

    from losskit.bench import memory

    if not memory.rss_supported():
        pytest.skip("needs Linux procfs clear_refs")
    problem = cross_entropy.make_problem(256, 32000, device=torch.device("cpu"), dtype=torch.float32)
    problem.eager_weights()
    grad_bytes = 256 * 32000 * 4
    by_name = {e.name: e for e in cross_entropy.ENTRIES}
    for name, inplace in (("losskit chunked all features (eager)", False),
                          ("losskit chunked all features (eager, in place)", True),
                          ("losskit chunked all features (pipeline, in place)", True)):
        peak = cross_entropy._peak_extra(cross_entropy.BenchCase(by_name[name], problem), torch.device("cpu"))
        if inplace:
            assert peak <= 4 * 4 * memory.MIB + 16 * memory.MIB, (name, peak)
        else:
            assert grad_bytes <= peak <= grad_bytes + 4 * 4 * memory.MIB + 16 * memory.MIB, (name, peak)
