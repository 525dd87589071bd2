"""nanoGPT-style entry point: ``python train.py [config/x.py] [--key=value ...]`` equals ``losskit train ...``.

Kept at the repository root because seed 000 (Loss Modifiers System) runs ``python train.py ...``.
"""

import sys

from losskit.train.cli import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
