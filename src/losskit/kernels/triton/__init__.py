"""The ``triton`` implementation of ``losskit.kernels``: jit kernels → launchers → autograd Functions.

Imported only when the Triton path is chosen (it imports ``triton``; an ``ImportError`` here is what makes the
dispatch fall back to ``chunked``). Entry points, drop-in siblings of ``chunked``'s:

* ``TokenStatsFunction.apply(logits, prep, config, inplace)`` (deferred mode) and
  ``FusedTokenLossFunction.apply(logits, token_weight, normalizer, FusedOptions(prep, smoothing, z_loss,
  grad_scale, inplace, config))`` (eager mode), with ``config`` a ``LaunchConfig`` or None (the built-in table);
* the launchers ``token_stats_fwd`` / ``token_stats_bwd`` / ``fused_loss_fwd`` / ``fused_loss_bwd``;
* ``exclusion_bitmask`` (cached per ids, V, device) and ``default_config`` (the configuration table).

On CPU tensors the kernels run in the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported);
that is for tests only.
"""

from losskit.kernels.triton.cross_entropy import (
    FusedOptions,
    FusedTokenLossFunction,
    TokenStatsFunction,
    fused_loss_bwd,
    fused_loss_fwd,
    resolve_config,
    token_stats_bwd,
    token_stats_fwd,
)
from losskit.kernels.triton.launch import LaunchConfig, default_config, exclusion_bitmask

__all__ = [
    "FusedOptions",
    "FusedTokenLossFunction",
    "LaunchConfig",
    "TokenStatsFunction",
    "default_config",
    "exclusion_bitmask",
    "fused_loss_bwd",
    "fused_loss_fwd",
    "resolve_config",
    "token_stats_bwd",
    "token_stats_fwd",
]
