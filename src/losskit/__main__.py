"""`python -m losskit ...` (also what `torchrun -m losskit train ...` runs)."""

from losskit.cli import main

raise SystemExit(main())
