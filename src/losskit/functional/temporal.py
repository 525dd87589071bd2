"""Temporal building blocks of seed 003 (DynVision losses): presentation patterns, reaction masks, energy.

Pure functions and one frozen schedule object; they are the oracle the temporal losses and the ``temporal``
training task are tested against. Host-side work (pattern parsing, chunk
listing, warnings) uses only Python strings, ints and tensor shapes; the tensor functions never sync.

Source: seed 003 ("Temporal Masking and Presentation Patterns", "EnergyLoss"), and
rgutzen/DynVision, whose behaviour docs/temporal.md corrects where noted.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import torch

__all__ = [
    "PresentationSchedule",
    "combine_energy",
    "energy_term",
    "find_chunks",
    "parse_pattern",
    "reaction_mask",
    "reaction_steps",
    "stretch_pattern",
    "unit_count",
]

# Tolerance of the reaction-step rounding: 2.1 / 0.3 = 7.000000000000001 in floating point must give 7, not 8.
_K_TOLERANCE = 1e-9


# ------------------------------------------------------------------------------------------------------------
# Patterns (host side)
# ------------------------------------------------------------------------------------------------------------


def parse_pattern(pattern: str | Sequence[int | bool]) -> tuple[int, ...]:
    """Parse a presentation pattern into a tuple of 0/1 ints.

    Args:
        pattern: a string of ``0``/``1`` characters (``"1011"``) or a sequence of 0/1 ints or bools.

    Returns:
        The base pattern, length L >= 1, containing at least one 1.

    Raises:
        TypeError: for an int (YAML reads ``0101`` as the octal 65 and ``0011`` as 9, so an int pattern is
            almost always a quoting mistake) or any other non-sequence type.
        ValueError: empty, a character or element other than 0/1, or no 1 at all.
    """
    if isinstance(pattern, (bool, int)):
        raise TypeError(
            f"pattern must be a string of 0/1 or a sequence of 0/1, got the int {pattern!r}; quote the pattern "
            "(YAML reads 0101 as the octal number 65 and 0011 as 9)"
        )
    if isinstance(pattern, str):
        bad = sorted(set(pattern) - {"0", "1"})
        if bad:
            raise ValueError(f"pattern must contain only '0' and '1', got {pattern!r} (bad characters {bad})")
        base = tuple(int(c) for c in pattern)
    elif isinstance(pattern, Sequence):
        base = []
        for i, v in enumerate(pattern):
            if isinstance(v, bool) or (isinstance(v, int) and v in (0, 1)):
                base.append(int(v))
            else:
                raise ValueError(f"pattern[{i}] must be 0, 1, True or False, got {v!r}")
        base = tuple(base)
    else:
        raise TypeError(f"pattern must be a string of 0/1 or a sequence of 0/1, got {type(pattern).__name__}")
    if not base:
        raise ValueError("pattern must not be empty; expected e.g. '1011'")
    if 1 not in base:
        raise ValueError(f"pattern must contain at least one 1 (a stimulus step), got {pattern!r}")
    return base


def stretch_pattern(base: Sequence[int], n_timesteps: int, *, warn: bool = True) -> tuple[int, ...]:
    """Stretch a base pattern of length L to T steps: ``present[t] = base[floor(t * L / T)]``.

    When T is a multiple of L each entry repeats T/L times; otherwise the same rule applies and one
    ``UserWarning`` states T, L and the result (``"1011"``, T = 10 -> ``1110011111``). L = 1 broadcasts.

    Args:
        base: the parsed pattern (``parse_pattern``).
        n_timesteps: T >= 1.
        warn: emit the not-a-multiple warning.

    Returns:
        The stretched pattern as a tuple of T ints.
    """
    if isinstance(n_timesteps, bool) or not isinstance(n_timesteps, int) or n_timesteps < 1:
        raise ValueError(f"n_timesteps must be an int >= 1, got {n_timesteps!r}")
    length = len(base)
    out = tuple(int(base[(t * length) // n_timesteps]) for t in range(n_timesteps))
    if warn and n_timesteps % length:
        warnings.warn(_stretch_message(base, out), UserWarning, stacklevel=2)
    return out


def _stretch_message(base: Sequence[int], stretched: Sequence[int]) -> str:
    """The not-a-multiple warning of ``stretch_pattern`` (also issued by ``PresentationSchedule.build``)."""
    return (
        f"n_timesteps={len(stretched)} is not a multiple of the pattern length L={len(base)}; the pattern "
        f"{''.join(map(str, base))!r} is stretched by present[t] = base[floor(t*L/T)] to "
        f"{''.join(map(str, stretched))!r}"
    )


def find_chunks(present: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Stimulus chunks of a stretched pattern: maximal runs of 1s as ``(onset, length)`` pairs.

    The onset is the rising edge (with an implicit 0 before t = 0); adjacent 1s never split a chunk
    (``"0110"`` is one chunk, ``11001111`` has chunks ``(0, 2)`` and ``(4, 4)``).
    """
    chunks: list[tuple[int, int]] = []
    start = None
    for t, v in enumerate(list(present) + [0]):
        if v and start is None:
            start = t
        elif not v and start is not None:
            chunks.append((start, t - start))
            start = None
    return tuple(chunks)


def reaction_steps(loss_reaction_time: float, dt: float) -> int:
    """Reaction window length in steps: ``k = ceil(loss_reaction_time / dt - 1e-9)``, and 0 when the time is 0.

    Both arguments are in the same unit (ms in the seed); only the ratio matters. The tolerance keeps float
    noise out: (2.1, 0.3) -> 7, not 8. Examples: (6, 2) -> 3, (5, 2) -> 3, (1, 2) -> 1, (0, 2) -> 0.

    Raises:
        ValueError: negative or non-finite reaction time, or ``dt <= 0``.
    """
    rt, step = float(loss_reaction_time), float(dt)
    if not math.isfinite(step) or step <= 0:
        raise ValueError(f"dt must be a finite number > 0, got {dt!r}")
    if not math.isfinite(rt) or rt < 0:
        raise ValueError(f"loss_reaction_time must be a finite number >= 0, got {loss_reaction_time!r}")
    if rt == 0:
        return 0
    return max(0, math.ceil(rt / step - _K_TOLERANCE))


# ------------------------------------------------------------------------------------------------------------
# Masks (device side, no syncs)
# ------------------------------------------------------------------------------------------------------------


def reaction_mask(present: torch.Tensor, k: int) -> torch.Tensor:
    """Reaction windows of a (batch of) presentation pattern(s), without ``nonzero`` or boolean indexing.

    ``reaction[t] = (o(t) >= 0) and (t - o(t) < k)``, where ``o(t)`` is the last onset <= t (-1 if none), i.e.
    one ``cummax`` over ``where(onset, arange(T), -1)``. This equals the union of the windows ``[e, e + k)``
    over the onsets e, clipped at T (the reference's definition), which in plain torch, per pattern row, is::

        out = torch.zeros(T, dtype=torch.bool)
        for e in range(T):
            if present[e] and (e == 0 or not present[e - 1]):
                out[e:e + k] = True

    Args:
        present: bool (or 0/1) tensor of shape ``(..., T)``.
        k: reaction steps (``reaction_steps``), >= 0.

    Returns:
        bool tensor of the shape of ``present``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be an int >= 0, got {k!r}")
    present = present.to(torch.bool)
    n_steps = present.shape[-1]
    previous = torch.nn.functional.pad(present[..., :-1], (1, 0), value=False)
    onset = present & ~previous
    steps = torch.arange(n_steps, device=present.device)
    last_onset = torch.where(onset, steps, torch.full_like(steps, -1)).cummax(dim=-1).values
    return (last_onset >= 0) & (steps - last_onset < k)


@dataclasses.dataclass(frozen=True)
class PresentationSchedule:
    """A stretched presentation pattern with its reaction windows and label mask.

    Built once per (pattern, T, dt, reaction time, device) by ``build`` (cached) and then applied to every
    batch with two broadcast ``torch.where`` calls.

    Attributes:
        present: bool ``(T,)``, stimulus (1) or null input (0) per step.
        reaction: bool ``(T,)``, steps inside a reaction window ``[onset, onset + k)``.
        label_valid: bool ``(T,)``, ``present & ~reaction``: steps whose label is kept.
        k: reaction steps.
        chunks: ``(onset, length)`` of every stimulus chunk.
    """

    present: torch.Tensor
    reaction: torch.Tensor
    label_valid: torch.Tensor
    k: int
    chunks: tuple[tuple[int, int], ...]

    @property
    def n_timesteps(self) -> int:
        return int(self.present.shape[0])

    @staticmethod
    def build(
        pattern: str | Sequence[int | bool],
        n_timesteps: int,
        *,
        dt: float = 1.0,
        loss_reaction_time: float = 0.0,
        device: torch.device | str | None = None,
    ) -> PresentationSchedule:
        """Parse, stretch and mask a pattern (cached per arguments and device).

        Warnings, once per build (host side): T not a multiple of L; every chunk whose length is <= k (the
        window covers the whole chunk, so that stimulus gets no supervised step); no valid label at all.

        Example (the seed's): ``build("1000111000", 10, dt=2, loss_reaction_time=6)`` gives k = 3, chunks
        ``((0, 1), (4, 3))``, reaction ``1110111000`` and no valid label (both chunks are wholly masked).
        """
        base = parse_pattern(pattern)
        dev = torch.device("cpu") if device is None else torch.device(device)
        k = reaction_steps(loss_reaction_time, dt)
        stretched = stretch_pattern(base, n_timesteps, warn=False)
        if n_timesteps % len(base):
            # Issued here rather than by stretch_pattern so that it points at the caller of build.
            warnings.warn(_stretch_message(base, stretched), UserWarning, stacklevel=2)
        chunks = find_chunks(stretched)
        covered = [(onset, length) for onset, length in chunks if k >= length]
        if covered:
            listed = ", ".join(f"t={onset} (length {length})" for onset, length in covered)
            warnings.warn(
                f"loss_reaction_time={loss_reaction_time} with dt={dt} gives k={k} reaction steps, which cover "
                f"the whole stimulus chunk(s) at {listed}: these stimuli get no supervised step",
                UserWarning,
                stacklevel=2,
            )
        if len(covered) == len(chunks):
            # A label survives exactly where a chunk is longer than its reaction window.
            warnings.warn(
                f"no timestep has a valid label (pattern {''.join(map(str, stretched))!r}, k={k}): "
                "CrossEntropyLoss will be 0 for every batch",
                UserWarning,
                stacklevel=2,
            )
        # Warnings above are host work and repeat on every build; only the device tensors are cached.
        key = (stretched, k, str(dev))
        cached = _SCHEDULE_CACHE.get(key)
        if cached is not None:
            return cached
        present = torch.tensor(stretched, dtype=torch.bool, device=dev)
        reaction = reaction_mask(present, k)
        schedule = PresentationSchedule(present, reaction, present & ~reaction, k, chunks)
        _SCHEDULE_CACHE[key] = schedule
        return schedule

    def apply(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        *,
        null_value: float = 0.0,
        ignore_index: int = -1,
        inputs_have_time: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Expand static inputs over time and mask inputs and labels (no in-place writes, no syncs).

        Plain torch equivalent (static inputs ``(B, *F)``, labels ``(B,)``)::

            x_T = torch.stack([x if present[t] else torch.full_like(x, null_value) for t in range(T)], 1)
            y_T = torch.stack([y if label_valid[t] else torch.full_like(y, ignore_index) for t in range(T)], 1)

        Args:
            inputs: ``(B, *F)``, or ``(B, T, *F)`` with ``inputs_have_time=True`` (then masked the same way).
            labels: ``(B,)`` or ``(B, T)`` integer class ids.
            null_value: input value at null steps.
            ignore_index: label at null steps and inside reaction windows.
            inputs_have_time: inputs already carry the time axis.

        Returns:
            ``(inputs_T, labels_T)`` of shapes ``(B, T, *F)`` and ``(B, T)``.
        """
        n_steps = self.n_timesteps
        if inputs.dim() < 1:
            raise ValueError(f"inputs must have a batch dimension, got shape {tuple(inputs.shape)}")
        if inputs_have_time:
            if inputs.dim() < 2 or inputs.shape[1] != n_steps:
                raise ValueError(
                    f"inputs must have shape (B, T={n_steps}, ...) with inputs_have_time=True, got "
                    f"{tuple(inputs.shape)}"
                )
            expanded = inputs
        else:
            expanded = inputs.unsqueeze(1).expand(inputs.shape[0], n_steps, *inputs.shape[1:])
        present = self.present.to(inputs.device).view(1, n_steps, *([1] * (expanded.dim() - 2)))
        inputs_t = torch.where(present, expanded, torch.tensor(null_value, dtype=inputs.dtype, device=inputs.device))
        if labels.dim() == 1:
            labels = labels.unsqueeze(1)
        elif labels.dim() != 2 or labels.shape[1] != n_steps:
            raise ValueError(f"labels must have shape (B,) or (B, T={n_steps}), got {tuple(labels.shape)}")
        if labels.shape[0] != inputs.shape[0]:
            raise ValueError(
                f"labels must have the batch size of inputs ({inputs.shape[0]}), got {labels.shape[0]}"
            )
        label_valid = self.label_valid.to(labels.device).view(1, n_steps)
        fill = torch.tensor(ignore_index, dtype=labels.dtype, device=labels.device)
        labels_t = torch.where(label_valid, labels, fill).expand(labels.shape[0], n_steps)
        return inputs_t, labels_t.contiguous()


_SCHEDULE_CACHE: dict[tuple, PresentationSchedule] = {}


# ------------------------------------------------------------------------------------------------------------
# Energy
# ------------------------------------------------------------------------------------------------------------

UNIT_NORMS: tuple[str, ...] = ("n_units", "root")


def unit_count(shape: Sequence[int]) -> int:
    """n_units of one sample: every element of the output except the batch dim (``prod(shape[1:])``)."""
    return int(math.prod(shape[1:]))


def energy_term(activation: torch.Tensor, p: float = 1.0, unit_norm: str = "n_units") -> torch.Tensor:
    """Per-sample energy of one hook call: ``e[b] = ||a[b]||_p / d(n)`` in float32 (float64 for float64
    activations), shape ``(B,)``.

    ``n = prod(a.shape[1:])``; ``d(n) = n`` for ``unit_norm="n_units"`` (the seed's documented
    ``||activation||_p / n_units``) and ``d(n) = n ** (1/p)`` for ``"root"`` (the reference code's divisor). The
    norm runs over all non-batch elements. Plain torch equivalent::

        a.flatten(1).double().abs().pow(p).sum(1).pow(1 / p) / d(n)

    The p = 1 path is an abs-sum (same value, no extra activation-sized tensor kept for backward); other p use
    ``torch.linalg.vector_norm``, whose gradient at an all-zero activation is 0 (a hand-written
    ``sqrt(sum(a**2))`` would give NaN).
    """
    if unit_norm not in UNIT_NORMS:
        raise ValueError(f"unit_norm must be one of {UNIT_NORMS}, got {unit_norm!r}")
    if activation.dim() < 1:
        raise ValueError(f"activation must have a batch dimension, got shape {tuple(activation.shape)}")
    n_units = unit_count(activation.shape)
    dims = tuple(range(1, activation.dim()))
    # float32 for fp16/bf16/fp32 activations; float64 ones are not narrowed (they are the test oracle's dtype).
    dtype = torch.promote_types(activation.dtype, torch.float32)
    if not dims:
        norm = activation.abs().to(dtype)
    elif p == 1:
        norm = activation.abs().sum(dim=dims, dtype=dtype)
    else:
        norm = torch.linalg.vector_norm(activation, ord=p, dim=dims, dtype=dtype)
    if n_units == 0:
        return norm
    divisor = float(n_units) if unit_norm == "n_units" else float(n_units) ** (1.0 / p)
    return norm / divisor


def combine_energy(sums: Sequence[torch.Tensor], counts: Sequence[int]) -> torch.Tensor:
    """Combine per-module running sums: ``E[b] = (1/M) * sum_m (1/T_m) * sums[m][b]``.

    ``sums[m]`` is ``sum_c e_{m,c}`` over module m's calls and ``counts[m] = T_m``. Modules are summed in the
    given order, so a fixed order is bitwise reproducible. With every ``T_m = T`` this is the seed's
    ``sum_t sum_m (||a||_p / n_units) / (M * T)``.
    """
    if not sums or len(sums) != len(counts):
        raise ValueError(f"sums and counts must be non-empty and of equal length, got {len(sums)}, {len(counts)}")
    total = sums[0] / counts[0]
    for running, count in zip(sums[1:], counts[1:]):
        total = total + running / count
    return total / len(sums)
