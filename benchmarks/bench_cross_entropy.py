"""Cross-entropy benchmark (method in docs/losses.md): a thin script around ``losskit bench``.

Usage: ``python benchmarks/bench_cross_entropy.py [--cpu] [--quick] [--check] [--big-vocab] [--csv PATH] [--reps N]``
(``--help`` lists every flag). The code lives in ``src/losskit/bench/``.
"""

import sys

from losskit.bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:], prog="bench_cross_entropy.py"))
