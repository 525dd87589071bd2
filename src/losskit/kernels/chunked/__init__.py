"""The ``chunked`` implementation: pure torch, custom autograd, memory bounded by one chunk.

The logits are streamed in chunks of ``max(1, chunk_bytes // (4·V))`` rows (``layout``); each chunk is copied
into one reused fp32 workspace (fp64 for fp64 logits; the caller's tensor is never written unless
``inplace_grad``) and reduced to per-row streaming states by a few in-place ops (``passes``); the closed forms of
``rowmath`` give every statistic, and the autograd Functions (``functions``) write the gradient in one more
pass (deferred) or during the forward (eager).

What it equals, in plain torch (the oracle the tests use is ``reference.py``)::

    lsm = logits.double().log_softmax(-1)
    nll = -lsm.gather(-1, target[..., None])[..., 0]
    entropy = -(lsm.exp() * lsm).sum(-1)
    ...and autograd for the gradients.
"""

from losskit.kernels.chunked import native, passes, sweeps
from losskit.kernels.chunked.functions import (
    FusedOptions,
    FusedTokenLossFunction,
    TokenStatsFunction,
    finish,
    fused_token_terms,
)
from losskit.kernels.chunked.layout import Plan, check_chunk_bytes, default_chunk_bytes
from losskit.kernels.fields import StatFields

__all__ = [
    "FusedOptions",
    "FusedTokenLossFunction",
    "Plan",
    "StatFields",
    "TokenStatsFunction",
    "check_chunk_bytes",
    "default_chunk_bytes",
    "finish",
    "fused_token_terms",
    "native",
    "passes",
    "sweeps",
]
