"""Training-service benchmark (docs/service.md): HTTP overhead of forward_backward and a concurrent load test.

Usage: ``python benchmarks/bench_service.py [--reps N] [--clients 8] [--steps 30] [--skip-load] [--csv PATH]``
(``--help`` lists every flag). The code lives in ``src/losskit/bench/service.py``.
"""

import sys

from losskit.bench.service import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:], prog="bench_service.py"))
