"""Forward-hook recording of activation energy for ``losskit.losses.EnergyLoss``.

``EnergyRecorder`` selects modules, installs forward hooks on them, keeps per module one float32 ``(B,)``
running sum of the per-call energy term (``functional.temporal.energy_term``) plus a Python call count, and
combines them at the loss call (``functional.temporal.combine_energy``). It never holds activations and never
syncs: the batch size, ``n_units`` and the counts are shapes and Python ints.

Two ways to record (seed 003 and losskit's scoped mode):

* ``register_hooks(model)``: hooks stay until ``remove_hooks()``; every forward accumulates until the next
  loss call (the seed's usage).
* ``with recorder.recording(model): ...``: hooks live only inside the block; an exception inside it clears
  the accumulators and, like a normal exit, removes every hook.

Hooks hold only weak references to the recorder and to their module, so dropping the loss removes them, and a
hook copied along with a ``copy.deepcopy`` of the model ignores the copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import math
import warnings
import weakref
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from losskit.contract import LossInputError
from losskit.functional.temporal import UNIT_NORMS, combine_energy, energy_term

__all__ = [
    "ENERGY_MODULE_TYPES",
    "EnergyRecorder",
    "EnergyStats",
    "monitor_energy",
    "select_modules",
]

# The seed's Conv2d, Linear and ConvTranspose2d, plus Conv1d and Conv3d.
ENERGY_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)
SELECTS: tuple[str, ...] = ("auto", "marked")
_MARK = "_losskit_monitor_energy"
# The reference's ActivityLoss opt-in attribute.
_REFERENCE_MARK = "_activity_monitor"


def monitor_energy(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Mark ``module`` for energy recording (``enabled=True``) or exclude it (``False``); returns the module.

    Under ``select="auto"`` a mark adds a module of any type and ``False`` removes one of the default types;
    under ``select="marked"`` only marked modules are recorded.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    setattr(module, _MARK, bool(enabled))
    return module


def _mark_of(name: str, module: nn.Module) -> bool | None:
    """True/False if ``module`` is marked in or out, None if unmarked."""
    mark = getattr(module, _MARK, None)
    if mark is not None:
        return bool(mark)
    reference = getattr(module, _REFERENCE_MARK, None)
    if reference is None or reference is False:
        return None
    if reference == "absolute" or reference is True:
        return True
    if reference == "signed":
        raise ValueError(
            f"module {name!r} has _activity_monitor='signed'; EnergyLoss records absolute activity only "
            "(expected 'absolute' or no attribute)"
        )
    raise ValueError(f"module {name!r} has _activity_monitor={reference!r}; expected 'absolute'")


def select_modules(
    model: nn.Module, select: str = "auto", exclude: Sequence[str] = ()
) -> list[tuple[str, nn.Module]]:
    """The ``(qualified name, module)`` pairs to hook, in ``named_modules()`` order.

    ``"auto"``: instances of ``ENERGY_MODULE_TYPES`` plus ``monitor_energy``-marked modules, minus modules
    marked ``False``; ``"marked"``: marked modules only. Either way minus names matching an fnmatch pattern
    of ``exclude``. The root module's name is ``""``.
    """
    if select not in SELECTS:
        raise ValueError(f"select must be one of {SELECTS}, got {select!r}")
    chosen = []
    for name, module in model.named_modules():
        mark = _mark_of(name, module)
        wanted = bool(mark) if select == "marked" or mark is not None else isinstance(module, ENERGY_MODULE_TYPES)
        if wanted and not any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude):
            chosen.append((name, module))
    return chosen


@dataclasses.dataclass(frozen=True)
class EnergyStats:
    """What one loss call recorded (all tensors detached; they stay on device until logged).

    Attributes:
        energy: per module, the batch mean of ``(1/T_m) * sum_c e_{m,c}[b]``.
        calls: per module, the number of hook calls ``T_m`` in the window.
        act_max: per module, ``max |a|`` over the window (``track_activity=True``), else empty.
    """

    energy: dict[str, torch.Tensor]
    calls: dict[str, int]
    act_max: dict[str, torch.Tensor]


def _make_hook(recorder: EnergyRecorder, name: str, module: nn.Module):
    recorder_ref = weakref.ref(recorder)
    module_ref = weakref.ref(module)

    def hook(mod: nn.Module, args, output) -> None:
        # A deepcopy of a hooked model copies this closure into the copy's hook dict: ignore the copy.
        if module_ref() is not mod:
            return
        owner = recorder_ref()
        if owner is not None:
            owner._accumulate(name, output)

    return hook


class EnergyRecorder:
    """Hook management and accumulation behind ``EnergyLoss``.

    Args:
        p: norm order, a finite number >= 1.
        unit_norm: ``"n_units"`` (divide by n, the seed's documented formula) or ``"root"`` (n^(1/p)).
        select: ``"auto"`` or ``"marked"`` (``select_modules``).
        exclude: fnmatch patterns of qualified module names never hooked.
        track_activity: also keep ``max |a|`` per module (one extra reduction per call).
        owner: the name used in messages.
    """

    def __init__(
        self,
        p: float = 1,
        *,
        unit_norm: str = "n_units",
        select: str = "auto",
        exclude: Sequence[str] = (),
        track_activity: bool = False,
        owner: str = "EnergyLoss",
    ) -> None:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p < 1:
            raise ValueError(f"p must be a finite number >= 1, got {p!r}")
        if unit_norm not in UNIT_NORMS:
            raise ValueError(f"unit_norm must be one of {UNIT_NORMS}, got {unit_norm!r}")
        if select not in SELECTS:
            raise ValueError(f"select must be one of {SELECTS}, got {select!r}")
        if isinstance(exclude, str):
            exclude = (exclude,)
        self.p = p
        self.unit_norm = unit_norm
        self.select = select
        self.exclude = tuple(str(e) for e in exclude)
        self.track_activity = bool(track_activity)
        self.owner = owner
        self.hooked_modules: tuple[str, ...] = ()
        self.last_stats: EnergyStats | None = None
        self._handles: list = []
        self._scoped = False
        self._anchor: weakref.ref | None = None
        self._seen_counts: set[tuple[int, ...]] = set()
        self._skip_warned: set[str] = set()
        self.clear()

    # -- accumulators ---------------------------------------------------------------------------------------

    def clear(self) -> None:
        """Forget everything recorded in the current window."""
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._act_max: dict[str, torch.Tensor] = {}
        self._grad_modes: set[bool] = set()
        self._batch: int | None = None

    @property
    def recorded(self) -> bool:
        """Whether anything was recorded in the current window."""
        return bool(self._counts)

    def _accumulate(self, name: str, output) -> None:
        if isinstance(output, (tuple, list)):
            output = output[0] if output else None
        if not isinstance(output, torch.Tensor) or not output.is_floating_point() or output.dim() < 1:
            if name not in self._skip_warned:
                self._skip_warned.add(name)
                kind = type(output).__name__ if not isinstance(output, torch.Tensor) else f"{output.dtype} tensor"
                warnings.warn(
                    f"{self.owner}: module {name!r} returned {kind} (expected a floating-point tensor with a batch "
                    "dimension, or a tuple whose element 0 is one); its calls are skipped",
                    UserWarning,
                    stacklevel=3,
                )
            return
        batch = output.shape[0]
        if self._batch is None:
            self._batch = batch
        elif batch != self._batch:
            raise LossInputError(
                f"{self.owner}: module {name!r} output has batch size {batch}, expected {self._batch} (fixed by "
                "the first call in this window); was another forward pass run inside the window?"
            )
        term = energy_term(output, self.p, self.unit_norm)
        previous = self._sums.get(name)
        self._sums[name] = term if previous is None else previous + term
        self._counts[name] = self._counts.get(name, 0) + 1
        self._grad_modes.add(torch.is_grad_enabled())
        if self.track_activity and output.numel():
            low, high = torch.aminmax(output.detach())
            peak = torch.maximum(high.abs(), low.abs()).to(torch.float32)
            seen = self._act_max.get(name)
            self._act_max[name] = peak if seen is None else torch.maximum(seen, peak)

    # -- hooks ------------------------------------------------------------------------------------------------

    def _install(self, model: nn.Module) -> None:
        chosen = select_modules(model, self.select, self.exclude)
        self.hooked_modules = tuple(name for name, _ in chosen)
        self._anchor = None
        for name, module in chosen:
            self._handles.append(module.register_forward_hook(_make_hook(self, name, module)))
            if self._anchor is None:
                first = next(module.parameters(recurse=True), None)
                if first is not None:
                    self._anchor = weakref.ref(first)
        if not chosen:
            rule = (
                "select='marked': modules marked with losskit.hooks.monitor_energy(module)"
                if self.select == "marked"
                else "select='auto': Conv1d, Conv2d, Conv3d, ConvTranspose2d, Linear or monitor_energy-marked modules"
            )
            warnings.warn(
                f"{self.owner}: no module of {type(model).__name__} is selected ({rule}, minus exclude="
                f"{list(self.exclude)}); nothing will be recorded and the loss will be 0",
                UserWarning,
                stacklevel=3,
            )

    def register_hooks(self, model: nn.Module) -> None:
        """Seed mode: replace this recorder's hooks with hooks on ``model``; a new window starts."""
        if self._scoped:
            raise RuntimeError(f"{self.owner}.register_hooks() called inside recording(); leave the block first")
        self.remove_hooks()
        self.clear()
        self._install(model)

    def remove_hooks(self) -> None:
        """Remove every hook this recorder installed (idempotent)."""
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    @contextlib.contextmanager
    def recording(self, model: nn.Module, value=None) -> Iterator:
        """Scoped mode: hooks live only inside the block; an exception also clears the accumulators."""
        if self._scoped:
            raise RuntimeError(f"{self.owner}.recording() is already active; recording() cannot be nested")
        if self._handles:
            raise RuntimeError(
                f"{self.owner}.recording() while register_hooks() hooks are live; call remove_hooks() first"
            )
        self.clear()
        self._scoped = True
        completed = False
        try:
            self._install(model)
            yield value
            completed = True
        finally:
            self.remove_hooks()
            self._scoped = False
            if not completed:
                self.clear()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # a destructor must never raise
            self.remove_hooks()

    # -- combination -------------------------------------------------------------------------------------------

    def zero(self, shape: tuple[int, ...] = ()) -> torch.Tensor:
        """A zero of ``shape`` connected to the first hooked parameter (when one exists), so backward works."""
        param = self._anchor() if self._anchor is not None else None
        # A sum over an empty slice is an exact 0 (never NaN, even for a non-finite parameter) with a grad_fn.
        empty = torch.zeros(0) if param is None else param.reshape(-1)[:0].to(torch.float32)
        if shape == (0,):
            return empty
        if shape != ():
            raise ValueError(f"shape must be () or (0,), got {shape}")
        return empty.sum()

    def take(self) -> torch.Tensor | None:
        """Combine the window into per-sample energy ``E (B,)`` and start a new window.

        Returns None when nothing was recorded. Sets ``last_stats``. The accumulators are cleared also when
        this raises.
        """
        try:
            if not self._counts:
                return None
            order = [n for n in self.hooked_modules if n in self._counts]
            device = self._sums[order[0]].device
            # Differentiable moves: the regulariser's gradient must reach modules on other devices.
            sums = [self._sums[n].to(device) for n in order]
            counts = [self._counts[n] for n in order]
            if len(set(counts)) > 1 and tuple(counts) not in self._seen_counts:
                self._seen_counts.add(tuple(counts))
                listed = ", ".join(f"{n}={c}" for n, c in zip(order, counts))
                warnings.warn(
                    f"{self.owner}: hooked modules were called unequal numbers of times in one window ({listed}); "
                    "each module is averaged over its own calls",
                    UserWarning,
                    stacklevel=3,
                )
            if len(self._grad_modes) > 1:
                warnings.warn(
                    f"{self.owner}: calls with and without grad were recorded in one window (did an eval forward "
                    "leak into a training loss?)",
                    UserWarning,
                    stacklevel=3,
                )
            energy = combine_energy(sums, counts)
            self.last_stats = EnergyStats(
                energy={n: (s / c).detach().mean() for n, s, c in zip(order, sums, counts)},
                calls=dict(zip(order, counts)),
                act_max={n: self._act_max[n] for n in order if n in self._act_max},
            )
            return energy
        finally:
            self.clear()
