"""``StatFields``: the flat per-row outputs every implementation returns, and their ``TokenStats`` view.

A container only: each implementation masks its own statistics (0 at invalid rows, NaN at out-of-range targets,
argmax −1 at invalid rows), so the oracle (``reference.py``) shares no masking code with what it judges.
"""

from __future__ import annotations

import dataclasses

import torch

from losskit.contract import TokenStats

__all__ = ["StatFields", "to_token_stats"]


def _outputs(self) -> tuple[torch.Tensor, ...]:
    """The fields in declaration order (the outputs of the autograd Functions)."""
    return tuple(getattr(self, f.name) for f in dataclasses.fields(self))


#: The per-row outputs of one pass, flat ``(n,)``: the fields of ``TokenStats`` without ``valid``, in its order
#: (built from it, so the two cannot drift apart). Float fields (``FLOATS``, ``TokenStats.FLOAT_FIELDS``) are
#: exactly 0 at invalid rows and NaN at valid rows with an out-of-range target; ``outputs()`` gives them all.
StatFields = dataclasses.make_dataclass(
    "StatFields",
    [(f.name, f.type) for f in dataclasses.fields(TokenStats) if f.name != "valid"],
    frozen=True,
    namespace={"FLOATS": TokenStats.FLOAT_FIELDS, "outputs": _outputs},
)
StatFields.__module__ = __name__


def to_token_stats(
    f: StatFields, valid: torch.Tensor, lead_shape: tuple[int, ...], *, detach: bool = False
) -> TokenStats:
    """``TokenStats`` with the leading shape of the logits (``detach``: float fields cut from the graph)."""

    def r(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(lead_shape)
        return x.detach() if detach else x

    return TokenStats(valid=r(valid), **{k.name: r(getattr(f, k.name)) for k in dataclasses.fields(f)})
