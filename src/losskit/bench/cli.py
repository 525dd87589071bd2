"""``losskit bench`` (and ``python benchmarks/bench_cross_entropy.py``): the cross-entropy benchmark.

Prints the run's identity (device, versions, torch threads, commit, copy bandwidth), one table per run, the T5
line per shape (CPU), and writes a CSV with the columns of docs/losses.md ("Benchmarks"). Exit status 1 when an entry failed
with an error (OOM and skipped rows are results, not failures), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import sys

import torch

from losskit.bench import cross_entropy, env, report
from losskit.contract import ConfigError

CSV_STEM = "bench_cross_entropy"  # the default CSV is bench_results/<CSV_STEM>_<date>.csv

DEFAULT_CSV_DIR = env.DEFAULT_CSV_DIR
CPU_FULL_REPS = 5


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"512x32000,128x128256"`` -> ``[(512, 32000), (128, 128256)]``.

    Raises:
        ConfigError: a part is not ``NxV`` with positive integers.
    """
    shapes = []
    for part in text.split(","):
        try:
            n, v = (int(s) for s in part.strip().lower().split("x"))
        except ValueError:
            raise ConfigError(f"--shapes must be comma-separated NxV pairs such as 512x32000, got {part!r}") from None
        if n < 1 or v < 2:
            raise ConfigError(f"--shapes needs N >= 1 and V >= 2, got N={n}, V={v}")
        shapes.append((n, v))
    return shapes


def losskit_impls() -> list[str]:
    """The losskit implementations this installation can run (``triton`` only where its module imports)."""
    from losskit.kernels.dispatch import triton_available

    return ["torch", "chunked"] + (["triton"] if triton_available() else [])


def build_parser(prog: str = "losskit bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Benchmark cross-entropy implementations side by side, fwd+bwd: torch F.cross_entropy, torch.compile "
            "and Liger-Kernel where installed, the seed pipelines, and losskit's "
            f"{'/'.join(losskit_impls())} impls (method: docs/losses.md, \"Benchmarks\"). Prints a table and "
            "writes a CSV tagged with device, versions and commit."
        ),
    )
    parser.add_argument("--cpu", action="store_true",
                        help="CPU mode (the default without CUDA): fp32, perf_counter, entries interleaved")
    parser.add_argument("--quick", action="store_true",
                        help="CPU: N=512,V=32000 and N=128,V=128256 with 5 reps (CI, < 60 s); GPU: 5 reps")
    parser.add_argument("--check", action="store_true",
                        help="add max_err: error on the first 64 rows against each entry's fp64 oracle")
    parser.add_argument("--big-vocab", action="store_true", help="GPU: add the report-only N=8192, V=256000 shape")
    env.add_csv_option(parser, CSV_STEM)
    parser.add_argument("--reps", type=int, default=None, metavar="N",
                        help="timed repetitions per entry (default: GPU 20, CPU 5)")
    parser.add_argument("--shapes", type=str, default=None, metavar="NxV[,NxV...]",
                        help="replace the mode's shapes (N must be a multiple of min(N, 2048))")
    return parser


def _options(args: argparse.Namespace) -> cross_entropy.Options:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if args.reps is not None and args.reps < 1:
        raise ConfigError(f"--reps must be >= 1, got {args.reps}")
    if device.type == "cuda":
        shapes = list(cross_entropy.GPU_SHAPES) + ([cross_entropy.GPU_BIG_VOCAB] if args.big_vocab else [])
        reps = 5 if args.quick else cross_entropy.GPU_REPS
        warmup = cross_entropy.GPU_WARMUP
    else:
        shapes = list(cross_entropy.CPU_QUICK_SHAPES if args.quick else cross_entropy.CPU_SHAPES)
        reps = cross_entropy.CPU_REPS if args.quick else CPU_FULL_REPS
        warmup = cross_entropy.CPU_WARMUP
    if args.shapes:
        shapes = parse_shapes(args.shapes)
    for n, _ in shapes:
        cross_entropy.sequence_shape(n)
    return cross_entropy.Options(
        device=device, shapes=shapes, reps=args.reps or reps, warmup=warmup, check=args.check, quick=args.quick
    )


def default_csv_path(now: datetime.datetime | None = None) -> pathlib.Path:
    """``bench_results/bench_cross_entropy_<UTC date and time>.csv``."""
    return env.dated_csv_path(CSV_STEM, now)


def main(argv: list[str] | None = None, prog: str = "losskit bench") -> int:
    """Run the benchmark for ``argv``; the exit status is 0, 1 (an entry failed) or 2 (bad arguments)."""
    parser = build_parser(prog)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        options = _options(args)
    except ConfigError as exc:
        parser.print_usage(sys.stderr)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    run_env = env.describe(options.device)
    mode = "GPU" if options.device.type == "cuda" else "CPU"
    print(f"losskit bench cross_entropy ({mode} mode, {options.reps} reps after {options.warmup} warm-up)")
    bandwidth = cross_entropy.measure_bandwidth(options.device)
    for line in report.header_lines(run_env, bandwidth):
        print(line)
    rows: list[cross_entropy.Row] = []
    for n, v in options.shapes:
        rows += cross_entropy.run_shape(options, n, v, bandwidth, print)
        if options.device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    print(report.result_table(rows, gib=options.device.type == "cuda"))
    first = cross_entropy.first_call_seconds()
    if first:
        print("\nfirst call (compile or build, in the untimed warm-up round): "
              + "; ".join(f"{name} {seconds:.1f} s" for name, seconds in first.items()))
    targets = report.t5_lines(rows) if options.device.type == "cpu" else report.gpu_target_lines(rows)
    if targets:
        print()
        print("\n".join(targets))
    path = args.csv or default_csv_path()
    report.write_csv(path, run_env, bandwidth, rows)
    print(f"\nCSV: {path}")
    failed = [r for r in rows if r.status.startswith("error")]
    for r in failed:
        print(f"FAILED: {r.name} N={r.N} V={r.V}: {r.status}", file=sys.stderr)
    return 1 if failed else 0
