"""The `diffusion` task's time budget (docs/diffusion.md): one default run, timed end to end.

The run is ``python -m losskit train --task=diffusion --out_dir=<temporary directory> [overrides]`` in a child
process, so the wall time includes what a user waits for: interpreter and torch start-up, loading the digits, the
3000 default iterations, every evaluation, sampling and the plots. The budget is 120 s on a 2-core CPU for the
default config; a run with overrides (``--max_iters=20``) is reported but is not the budget run. The device column
describes this (parent) process; the child sets its own thread count (``num_threads``, 1 on CPU by default).

The report gives the wall time, iterations per second (end to end: ``max_iters / wall``), the final and step-0
eval x0-MSE from the run's ``metrics.jsonl``, and whether the budget is met; one CSV row is written, tagged with
date, commit, device and versions like every benchmark of ``losskit bench``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import torch

from losskit.bench import env as bench_env
from losskit.bench.env import Environment, add_csv_option, csv_path, describe
from losskit.bench.report import text_table
from losskit.train.sinks import read_metrics

BUDGET_S = 120.0
DEFAULT_CSV_DIR = bench_env.DEFAULT_CSV_DIR

CSV_COLUMNS: tuple[str, ...] = (
    "date", "git_commit", "device", "torch", "load_avg_1min", "cpu_count", "overrides", "max_iters", "wall_s",
    "iters_per_s", "eval_x0_mse_step0", "eval_x0_mse_final", "budget_s", "budget_met", "status",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Result:
    """One timed run. ``max_iters`` and the eval values are None when the run failed before logging them."""

    overrides: tuple[str, ...]
    returncode: int
    wall_s: float
    max_iters: int | None
    eval_x0_mse_step0: float | None
    eval_x0_mse_final: float | None
    load_avg_1min: float

    @property
    def iters_per_s(self) -> float | None:
        return None if not self.max_iters or self.wall_s <= 0 else self.max_iters / self.wall_s

    @property
    def is_default(self) -> bool:
        """The time budget is about the default config only."""
        return not self.overrides

    def budget_met(self, budget_s: float = BUDGET_S) -> bool:
        return self.returncode == 0 and self.wall_s <= budget_s


def train_command(out_dir: pathlib.Path, overrides: Sequence[str]) -> list[str]:
    """The child's argv: the default diffusion config into ``out_dir``, then the user's overrides."""
    return [sys.executable, "-m", "losskit", "train", "--task=diffusion", f"--out_dir={out_dir}", *overrides]


def eval_summary(rows: list[dict]) -> tuple[int | None, float | None, float | None]:
    """``(last eval step, step-0 eval x0-MSE, final eval x0-MSE)`` from the rows of ``metrics.jsonl``.

    The task evaluates at step 0 and at the end (``max_iters``), so the last eval row's step is ``max_iters``.
    """
    evals = [(r["step"], r["eval/x0_mse"]) for r in rows if r.get("eval/x0_mse") is not None]
    if not evals:
        return None, None, None
    return evals[-1][0], evals[0][1], evals[-1][1]


def time_run(overrides: Sequence[str], *, out_dir: pathlib.Path | None = None) -> Result:
    """Run the task once in a child process (output streamed to this console) and time it end to end."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with tempfile.TemporaryDirectory(prefix="losskit-bench-diffusion-") as tmp:
        run_dir = out_dir if out_dir is not None else pathlib.Path(tmp) / "run"
        cmd = train_command(run_dir, overrides)
        start = time.perf_counter()
        code = subprocess.run(cmd, check=False).returncode
        wall = time.perf_counter() - start
        try:
            steps, first, final = eval_summary(read_metrics(run_dir))
        except FileNotFoundError:
            steps, first, final = None, None, None
    return Result(tuple(overrides), code, wall, steps, first, final, load)


def status_of(result: Result, budget_s: float) -> str:
    """The CSV's status cell: an error, "over budget", or "ok" (noting when overrides make it no budget run)."""
    if result.returncode != 0:
        return f"error: exit code {result.returncode}"
    if not result.is_default:
        return "ok (overrides: not the budget run)"
    return "ok" if result.budget_met(budget_s) else "over budget"


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def report_lines(result: Result, env: Environment, budget_s: float = BUDGET_S) -> list[str]:
    """The console report: identity lines, a one-row table and the budget verdict."""
    met = result.budget_met(budget_s)
    table = text_table(
        ["run", "iters", "wall s", "iters/s", "eval x0-MSE step 0", "eval x0-MSE final", "status"],
        [[
            "default" if result.is_default else " ".join(result.overrides),
            "" if result.max_iters is None else str(result.max_iters),
            f"{result.wall_s:.1f}",
            _fmt(result.iters_per_s, ".1f"),
            _fmt(result.eval_x0_mse_step0, ".4g"),
            _fmt(result.eval_x0_mse_final, ".4g"),
            status_of(result, budget_s),
        ]],
    )  # fmt: skip
    verdict = "met" if met else "NOT met"
    scope = "" if result.is_default else " (overrides given: the budget is defined for the default config)"
    return [
        f"device: {env.device}   torch {env.torch}   commit {env.git_commit}   date {env.date}",
        f"CPUs: {os.cpu_count()}   1-min load average before the run: {result.load_avg_1min:.2f}",
        "",
        table,
        "",
        f"wall time {result.wall_s:.1f} s; budget {budget_s:.0f} s on a 2-core CPU: {verdict}{scope}",
    ]


def write_csv(path: pathlib.Path, result: Result, env: Environment, budget_s: float = BUDGET_S) -> None:
    """One row with ``CSV_COLUMNS`` (creating the parent directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "date": env.date, "git_commit": env.git_commit, "device": env.device, "torch": env.torch,
        "load_avg_1min": f"{result.load_avg_1min:.2f}", "cpu_count": str(os.cpu_count()),
        "overrides": " ".join(result.overrides),
        "max_iters": "" if result.max_iters is None else str(result.max_iters),
        "wall_s": f"{result.wall_s:.3f}", "iters_per_s": _fmt(result.iters_per_s, ".4g"),
        "eval_x0_mse_step0": _fmt(result.eval_x0_mse_step0, ".6g"),
        "eval_x0_mse_final": _fmt(result.eval_x0_mse_final, ".6g"),
        "budget_s": f"{budget_s:g}", "budget_met": str(result.budget_met(budget_s)).lower(),
        "status": status_of(result, budget_s),
    }  # fmt: skip
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerow(record)


CSV_STEM = "bench_diffusion_train"


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Time one default `losskit train --task=diffusion` run end to end (docs/diffusion.md). "
        "Any --key=value not listed below is passed to `losskit train` (e.g. --max_iters=20 for a smoke run).",
    )
    add_csv_option(parser, CSV_STEM)
    parser.add_argument("--budget", type=float, default=BUDGET_S, metavar="S",
                        help=f"wall-time budget in seconds (default {BUDGET_S:g})")
    parser.add_argument("--keep", type=pathlib.Path, default=None, metavar="DIR",
                        help="run into DIR and keep it (default: a temporary directory, removed afterwards)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the default run misses the budget")
    return parser


def main(argv: list[str] | None = None, prog: str = "bench_diffusion_train.py") -> int:
    """Time one run for ``argv``; exit status: the run's own when it fails, 1 with ``--strict`` when the default
    run misses the budget, 2 for bad arguments, else 0."""
    parser = build_parser(prog)
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    bad = [a for a in overrides if not (a.startswith("--") and "=" in a)]
    if bad or any(a.startswith("--out_dir=") for a in overrides):
        parser.print_usage(sys.stderr)
        what = bad or ["--out_dir (use --keep DIR)"]
        print(f"{prog}: error: expected --key=value overrides for losskit train, got {what}", file=sys.stderr)
        return 2
    shown = " ".join(["python", *train_command(pathlib.Path("<tmp>"), overrides)[1:]])
    print(f"losskit bench diffusion_train: {shown}")
    result = time_run(overrides, out_dir=args.keep)
    device = next((a.split("=", 1)[1] for a in overrides if a.startswith("--device=")), "auto")
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    env = describe(torch.device("cuda" if use_cuda else "cpu"))
    print()
    print("\n".join(report_lines(result, env, args.budget)))
    path = csv_path(args, CSV_STEM)
    write_csv(path, result, env, args.budget)
    print(f"\nCSV: {path}")
    if result.returncode != 0:
        return result.returncode
    return 1 if args.strict and result.is_default and not result.budget_met(args.budget) else 0
