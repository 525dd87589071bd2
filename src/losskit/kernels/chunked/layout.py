"""How the ``chunked`` implementation cuts a call: rows per chunk, vocab blocks, the reused workspace.

Rows per chunk = ``max(1, chunk_bytes // (4·V))``; a row wider than the budget is split into vocab blocks merged
with the streaming rule (``rowmath.merge_states``). Chunks are views of the caller's tensor, never copies:
2-D logits, viewable 3-D logits and shifted 3-D views (``x[:, :-1]``, whose rows are not one stride apart
across the batch) are all cut without materialising anything.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Iterator

import torch

from losskit.contract import LossInputError
from losskit.kernels.columns import ids_tensor

__all__ = [
    "DEFAULT_CHUNK_BYTES_CPU",
    "DEFAULT_CHUNK_BYTES_CUDA",
    "GROUP",
    "Chunk",
    "ColumnBlocks",
    "Plan",
    "Workspace",
    "check_chunk_bytes",
    "chunks",
    "default_chunk_bytes",
    "load",
    "rows_view",
    "set_target",
]

DEFAULT_CHUNK_BYTES_CPU = 4 * 1024 * 1024
DEFAULT_CHUNK_BYTES_CUDA = 256 * 1024 * 1024
# argmax over a row is done in two stages (max of 64-column groups, then inside the winning group): torch's
# argmax kernel is ~10x slower than amax on CPU, so the workspace width is padded to a multiple of this.
GROUP = 64


def default_chunk_bytes(device: torch.device) -> int:
    """4 MiB on CPU (cache-sized, yet ≥ 1M elements per op), 256 MiB on CUDA."""
    return DEFAULT_CHUNK_BYTES_CUDA if device.type == "cuda" else DEFAULT_CHUNK_BYTES_CPU


def check_chunk_bytes(chunk_bytes, device: torch.device) -> int:
    """``chunk_bytes`` or the device default; ``LossInputError`` unless a positive int."""
    if chunk_bytes is None:
        return default_chunk_bytes(device)
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
        raise LossInputError(f"chunk_bytes must be a positive int (bytes) or None, got {chunk_bytes!r}")
    return chunk_bytes


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Rows ``[r0, r1)`` of the flattened leading dims; ``view(t)`` returns them from any tensor shaped like
    the logits (2-D ``(rows, V)`` or 3-D ``(b, t, V)``), without a copy."""

    r0: int
    r1: int
    view: Callable[[torch.Tensor], torch.Tensor]

    @property
    def rows(self) -> int:
        return self.r1 - self.r0

    @property
    def span(self) -> slice:
        return slice(self.r0, self.r1)


def chunks(logits: torch.Tensor, rows_per_chunk: int) -> Iterator[Chunk]:
    """The chunks of ``logits`` in row order."""
    v = logits.shape[-1]
    n = logits.numel() // v if v else 0
    flat_ok = True
    if logits.dim() == 3:
        try:
            logits.view(-1, v)
        except RuntimeError:  # e.g. logits[:, :-1]: rows are not one stride apart across the batch
            flat_ok = False
    if flat_ok:
        for r0 in range(0, n, rows_per_chunk):
            r1 = min(n, r0 + rows_per_chunk)
            yield Chunk(r0, r1, lambda t, r0=r0, r1=r1: t.view(-1, t.shape[-1])[r0:r1])
        return
    b, t_len = logits.shape[0], logits.shape[1]
    if t_len <= rows_per_chunk:
        per = rows_per_chunk // t_len
        for b0 in range(0, b, per):
            b1 = min(b, b0 + per)
            yield Chunk(b0 * t_len, b1 * t_len, lambda t, b0=b0, b1=b1: t[b0:b1])
    else:
        for bi in range(b):
            for t0 in range(0, t_len, rows_per_chunk):
                t1 = min(t_len, t0 + rows_per_chunk)
                yield Chunk(bi * t_len + t0, bi * t_len + t1, lambda t, bi=bi, t0=t0, t1=t1: t[bi, t0:t1])


@dataclasses.dataclass(frozen=True)
class Plan:
    """Rows per chunk and vocab blocks for one call."""

    rows_per_chunk: int
    blocks: tuple[tuple[int, int], ...]  # column ranges [c0, c1)
    width: int  # workspace width: the widest block padded to a multiple of GROUP

    @staticmethod
    def make(num_classes: int, dtype: torch.dtype, chunk_bytes: int) -> Plan:
        item = torch.finfo(dtype).bits // 8
        rows = max(1, chunk_bytes // (item * num_classes))
        block = num_classes if chunk_bytes >= item * num_classes else max(1, chunk_bytes // item)
        blocks = tuple((c0, min(num_classes, c0 + block)) for c0 in range(0, num_classes, block))
        width = -(-block // GROUP) * GROUP
        return Plan(rows, blocks, width)

    @property
    def single(self) -> bool:
        """Whether every row fits one block (no merge of partial states)."""
        return len(self.blocks) == 1


class ColumnBlocks:
    """The excluded column ids of a call, looked up per vocab block (host-side, from the id list).

    ``support_count(c0, c1)`` is the number of support columns in ``[c0, c1)``; ``excluded(c0, c1)`` the
    block-local excluded ids as a cached int64 device tensor (None when the block holds none).
    """

    def __init__(self, excluded: tuple[int, ...], device: torch.device):
        self._ids = excluded
        self._all = ids_tensor(excluded, device) if excluded else None
        self._cache: dict[tuple[int, int], torch.Tensor | None] = {}

    def _range(self, c0: int, c1: int) -> tuple[int, int]:
        return bisect.bisect_left(self._ids, c0), bisect.bisect_left(self._ids, c1)

    def support_count(self, c0: int, c1: int) -> int:
        lo, hi = self._range(c0, c1)
        return (c1 - c0) - (hi - lo)

    def excluded(self, c0: int, c1: int) -> torch.Tensor | None:
        if self._all is None:
            return None
        key = (c0, c1)
        if key not in self._cache:
            lo, hi = self._range(c0, c1)
            self._cache[key] = self._all[lo:hi] - c0 if hi > lo else None
        return self._cache[key]


class Workspace:
    """The two reused ``(rows_per_chunk, width)`` buffers of a call (fp32, or fp64 for fp64 input)."""

    def __init__(self, plan: Plan, n: int, dtype: torch.dtype, device: torch.device):
        rows = min(plan.rows_per_chunk, max(n, 1))
        self.a = torch.empty(rows, plan.width, dtype=dtype, device=device)
        self.b = torch.empty(rows, plan.width, dtype=dtype, device=device)


def rows_view(ws2d: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The 2-D workspace slice ``ws2d`` seen with the leading shape of the chunk ``like``."""
    return ws2d.view(*like.shape[:-1], ws2d.shape[-1])


def load(src: torch.Tensor, ws: torch.Tensor, op: Callable[..., torch.Tensor], **kw) -> None:
    """``ws[:] = op(src.to(ws.dtype), **kw)`` in one pass when the dtypes agree, else copy then op in place."""
    dst = rows_view(ws, src)
    if src.dtype == ws.dtype:
        op(src, out=dst, **kw)
    else:
        dst.copy_(src)
        op(dst, out=dst, **kw)


def set_target(ws: torch.Tensor, local: torch.Tensor, in_block: torch.Tensor | None, value) -> None:
    """Write ``value`` (scalar or per row) at each row's target column, only for rows whose target is in this
    block (``in_block`` None: all rows)."""
    idx = local[:, None]
    if not isinstance(value, torch.Tensor):
        value = torch.full((ws.shape[0], 1), value, dtype=ws.dtype, device=ws.device)
    else:
        value = value[:, None].to(ws.dtype)
    if in_block is not None:
        value = torch.where(in_block[:, None], value, ws.gather(1, idx))
    ws.scatter_(1, idx, value)
