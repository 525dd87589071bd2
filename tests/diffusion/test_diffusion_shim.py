"""Acceptance 16 of spec/diffusion.md: the root ``train.py`` shim, cross-process determinism, the budget script.

Every run here is a child process, as a user starts it: ``python train.py --task=diffusion ...`` from the
repository root, the ``losskit`` console script, and ``python benchmarks/bench_diffusion_train.py``. The runs are
tiny (a 32-wide MLP, 20 iterations); the full default run of the budget is the lead's, on an idle machine.
"""

from __future__ import annotations

import csv
import math
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from losskit.bench import diffusion_train as bench
from losskit.train.sinks import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY_ARGS = [
    "--task=diffusion",
    "--model_width=32",
    "--model_depth=1",
    "--batch_size=32",
    "--sample_steps=5",
    "--max_iters=20",
    "--log_interval=10",
    "--eval_interval=10",
    "--loss_weighting=min_snr",
]


def losskit_command() -> list[str]:
    """The installed ``losskit`` console script (next to this interpreter), else ``python -m losskit``."""
    script = pathlib.Path(sys.executable).parent / "losskit"
    found = str(script) if script.is_file() else shutil.which("losskit")
    return [found] if found else [sys.executable, "-m", "losskit"]


def run_child(cmd: list[str], out_dir: pathlib.Path) -> str:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run(
        [*cmd, f"--out_dir={out_dir}"],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.replace(str(out_dir), "<out_dir>")


def test_train_py_shim_logs_the_same_metrics_as_losskit_train(tmp_path):
    """``python train.py --task=diffusion`` and ``losskit train --task=diffusion``, one seed, two processes: the
    JSONL rows, the resolved config and the console output are identical (bit-identical across processes)."""
    shim_dir, cli_dir = tmp_path / "shim", tmp_path / "cli"
    shim_out = run_child([sys.executable, "train.py", *TINY_ARGS], shim_dir)
    cli_out = run_child([*losskit_command(), "train", *TINY_ARGS], cli_dir)

    shim_rows, cli_rows = read_metrics(shim_dir), read_metrics(cli_dir)
    assert shim_rows == cli_rows
    keys = set().union(*shim_rows)
    assert {"train/loss", "train/loss_raw", "val/loss", "eval/x0_mse"} <= keys
    assert "loss_modifiers/SNRWeightModifier.mean_weight" in keys
    assert any(k.startswith("diffusion/bucket_") for k in keys)
    assert [r["step"] for r in shim_rows if "train/loss" in r] == [10, 20]

    def config_text(d: pathlib.Path) -> str:
        return (d / "config.yaml").read_text().replace(str(d), "<out_dir>")

    assert config_text(shim_dir) == config_text(cli_dir)
    assert shim_out == cli_out and "eval x0-MSE" in shim_out
    for name in ("buckets.json", "buckets.png", "samples.png"):
        assert (shim_dir / name).read_bytes() == (cli_dir / name).read_bytes(), name


def test_bench_script_smoke(tmp_path):
    """``benchmarks/bench_diffusion_train.py`` with overrides: one timed child run, a report and one CSV row."""
    csv_path = tmp_path / "bench.csv"
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/bench_diffusion_train.py",
            f"--csv={csv_path}",
            *[a for a in TINY_ARGS if a != "--task=diffusion"],
        ],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "iters/s" in out and "eval x0-MSE final" in out
    assert "budget 120 s on a 2-core CPU: met (overrides given" in out
    with csv_path.open() as fh:
        (row,) = list(csv.DictReader(fh))
    assert list(row) == list(bench.CSV_COLUMNS)
    assert row["max_iters"] == "20" and row["budget_met"] == "true"
    wall, rate = float(row["wall_s"]), float(row["iters_per_s"])
    assert 0 < wall < 120 and rate == pytest.approx(20 / wall, rel=1e-3)
    first, final = float(row["eval_x0_mse_step0"]), float(row["eval_x0_mse_final"])
    assert math.isfinite(final) and 0 < final < first
    assert row["status"].startswith("ok") and row["git_commit"] and row["torch"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["max_iters=20"], "expected --key=value"),
        (["--max_iters"], "expected --key=value"),
        (["--out_dir=x"], "--keep DIR"),
    ],
)
def test_bench_script_rejects_bad_overrides(argv, message, capsys):
    assert bench.main(argv) == 2
    assert message in capsys.readouterr().err


def _result(code=0, wall=30.0, overrides=()):
    return bench.Result(tuple(overrides), code, wall, 3000, 26.4, 0.1, 0.5)


def test_bench_budget_verdicts():
    assert _result().budget_met() and bench.status_of(_result(), 120) == "ok"
    assert not _result(wall=121).budget_met() and bench.status_of(_result(wall=121), 120) == "over budget"
    assert not _result(code=1).budget_met() and bench.status_of(_result(code=1), 120) == "error: exit code 1"
    assert bench.status_of(_result(overrides=["--max_iters=20"]), 120).startswith("ok (overrides")
    assert _result(wall=40).iters_per_s == 75.0
    assert bench.eval_summary([{"step": 0, "eval/x0_mse": 2.0}, {"step": 5, "train/loss": 1.0},
                               {"step": 9, "eval/x0_mse": 0.5}]) == (9, 2.0, 0.5)  # fmt: skip
    assert bench.eval_summary([{"step": 1, "train/loss": 1.0}]) == (None, None, None)
