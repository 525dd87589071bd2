"""``losskit.kernels``: every cross-entropy-family statistic from one streaming pass over the logits.

Public functions (``api.py``): ``token_stats`` → ``TokenStats``; ``fused_token_loss`` → ``FusedLoss``;
``cross_entropy`` (``functional.cross_entropy``'s signature on the fast path); ``resolve_impl`` (which
implementation serves a call, ``dispatch.py``); ``smoothed_nll`` (the one closed form of label-smoothed CE
from the statistics, ``rowmath.py``).

Layout, top-down: ``api`` (public functions) → ``call`` (one validated call description and its dispatch) →
the implementations ``reference`` (``"torch"``, the readable oracle), ``chunked/`` (pure torch, memory bounded
by a chunk) and ``triton/`` (GPU kernels, imported only when chosen) → ``rowmath`` (per-row closed forms),
``prepare`` / ``columns`` (per-row inputs and column sets), ``fields`` (the per-row outputs).
"""

from losskit.kernels.api import cross_entropy, fused_token_loss, token_stats
from losskit.kernels.dispatch import resolve_impl
from losskit.kernels.rowmath import smoothed_nll

__all__ = ["cross_entropy", "fused_token_loss", "resolve_impl", "smoothed_nll", "token_stats"]
