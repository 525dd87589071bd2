"""Time budget of the `diffusion` training task (docs/diffusion.md): a thin script.

Usage: ``python benchmarks/bench_diffusion_train.py [--csv PATH] [--budget S] [--keep DIR] [--strict] [--key=value ...]``.
It runs the default ``losskit train --task=diffusion`` once, into a temporary directory, and prints the wall time,
iterations/s, the final eval x0-MSE and whether the 120 s budget (2-core CPU) is met; ``--key=value`` overrides go
to ``losskit train`` (``--max_iters=20`` for a smoke run). The code lives in ``src/losskit/bench/diffusion_train.py``.
"""

import sys

from losskit.bench.diffusion_train import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:], prog="bench_diffusion_train.py"))
