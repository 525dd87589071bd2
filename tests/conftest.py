"""Test-wide set-up.

TRITON_INTERPRET must be set before anything imports triton (the flag is read when kernels are decorated),
so it is set here, at collection time, whenever no CUDA device is present.
"""

import os
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The Triton interpreter evaluates both branches of tl.where, so numpy warns about overflow in the branch that
# is discarded; those warnings say nothing about the result.
warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\..*")
warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"numpy\..*")


def pytest_configure(config):
    # pytest runs each test under its own warning filters (the ini list), so the filters above cover import time
    # only; the same two go into the per-test list here.
    config.addinivalue_line("filterwarnings", r"ignore::RuntimeWarning:triton\..*")
    config.addinivalue_line("filterwarnings", r"ignore::RuntimeWarning:numpy\..*")
