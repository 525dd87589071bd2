"""Device-side metric accumulation over a logging interval, averaged across DDP ranks at log time.

Inside the step every metric is a detached 0-d tensor; the trainer keeps device sums
and counts per key and averages each over the logging interval (so ``min_*``/``max_*`` show the mean
per-step extreme). At log time one packed ``all_reduce`` sums ``[sums..., counts...]`` over the ranks, and
only then are the values converted to floats (the one sync). Plain-torch equivalent of ``compute()`` on one
rank: ``{k: torch.stack(values_k).mean().item()}``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class MetricAccumulator:
    """Sums and counts of 0-d metric tensors, keyed by name; ``compute()`` returns interval means as floats."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}

    def add(self, metrics: Mapping[str, torch.Tensor | float]) -> None:
        """Add one value per key (no sync: tensors stay on their device)."""
        for key, value in metrics.items():
            v = value.detach().reshape(()).to(torch.float64) if isinstance(value, torch.Tensor) else \
                torch.tensor(float(value), dtype=torch.float64)
            self._sums[key] = self._sums[key] + v if key in self._sums else v
            self._counts[key] = self._counts.get(key, 0) + 1

    def __len__(self) -> int:
        return len(self._sums)

    def keys(self) -> list[str]:
        """The metric names seen since the last ``reset()``, sorted (the key order ``compute`` uses by default)."""
        return sorted(self._sums)

    def compute(self, *, group=None, keys: list[str] | None = None) -> dict[str, float]:
        """Interval means as floats, averaged over DDP ranks when a process group is initialised.

        Under DDP every rank must call this with the same key set (``keys`` fixes the order; a key that a
        rank never saw counts 0 there).
        """
        import torch.distributed as dist

        names = self.keys() if keys is None else list(keys)
        if not names:
            return {}
        device = next(iter(self._sums.values())).device if self._sums else torch.device("cpu")
        zero = torch.zeros((), dtype=torch.float64, device=device)
        sums = torch.stack([self._sums.get(k, zero).to(device) for k in names])
        counts = torch.tensor([float(self._counts.get(k, 0)) for k in names], dtype=torch.float64, device=device)
        packed = torch.cat([sums, counts])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        n = len(names)
        values = packed.tolist()  # the one host read of the interval
        return {k: values[i] / values[n + i] for i, k in enumerate(names) if values[n + i] > 0}

    def reset(self) -> None:
        self._sums.clear()
        self._counts.clear()
