"""Task `temporal`: a leaky recurrent conv net on the digits, CE + energy regularisation (docs/temporal.md).

Seed 003 (DynVision) end to end: static 8×8 digits are presented over ``n_timesteps`` steps following a
presentation pattern (null steps are 0), labels are masked at null steps and inside reaction windows
(``PresentationSchedule``), and the loss is seed 003's YAML ``criterion:`` list, a ``CombinedLoss`` of the
temporal ``CrossEntropyLoss`` (mean over valid (sample, t) pairs) and ``EnergyLoss`` recorded by forward hooks.

One step: ``with loss_fn.recording(model): logits = model(x)``; ``out = loss_fn(logits, y,
return_components=True)``; backward; Adam. No host sync inside the step (the CE runs with
``input_checks="deferred"``); metrics stay on the device and are read once per epoch, where the table is
printed and the seed's "warning signs" are checked.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import pathlib
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from losskit import registry
from losskit.combined import CombinedLoss
from losskit.contract import EMPTY_BATCH_MESSAGE, ConfigError, EmptyBatchWarning, LossInputError
from losskit.functional.temporal import PresentationSchedule, parse_pattern
from losskit.losses import CrossEntropyLoss, EnergyLoss
from losskit.train.config import train_config_to_dict
from losskit.train.rundir import prepare_run_dir, resolve_out_dir
from losskit.train.runtime import cpu_threads, resolve_device, save_resolved_config
from losskit.train.sinks import open_sinks

__all__ = [
    "DEFAULT_CRITERION",
    "EpochRow",
    "TemporalDigitsNet",
    "format_header",
    "format_row",
    "load_digits_data",
    "resolve_criterion",
    "run",
    "warning_signs",
]

IGNORE_INDEX = -1
NUM_CLASSES = 10
#: The task's default ``criterion``: seed 003's YAML, with the readout layer excluded from the energy.
DEFAULT_CRITERION: list[dict[str, Any]] = [
    {"name": "cross_entropy_loss", "weight": 1.0, "kwargs": {"reduction": "mean", "ignore_index": IGNORE_INDEX}},
    {"name": "energy_loss", "weight": 0.05, "kwargs": {"reduction": "mean", "p": 1, "exclude": ["readout"]}},
]
ENERGY_ACT_LIMIT = 10.0  # the seed's "activation magnitudes > 10"
ENERGY_RAW_LIMIT = 1.0  # the seed's "raw energy > 1.0"


# ------------------------------------------------------------------------------------------------------------
# Model and data
# ------------------------------------------------------------------------------------------------------------


class TemporalDigitsNet(nn.Module):
    """Leaky recurrent conv net: ``h_t = (1−α)·h_{t−1} + α·tanh(conv_in(x_t) + conv_rec(h_{t−1}))``.

    ``logits_t = readout(avg_pool2d(h_t, 2).flatten(1))``, ``h_0 = 0``. Input ``(B, T, 1, 8, 8)``, output
    ``(B, T, 10)``. 5,050 parameters at ``channels = 16``. tanh and the leak bound the state, so the energy and
    the activations stay small (a ReLU net without leak showed the seed's warning signs within a few epochs).
    """

    def __init__(self, channels: int = 16, alpha: float = 0.5) -> None:
        super().__init__()
        if not 0 < alpha <= 1:
            raise ConfigError(f"leak alpha = dt/tau must be in (0, 1], got {alpha}")
        self.alpha = float(alpha)
        self.conv_in = nn.Conv2d(1, channels, 3, padding=1)
        self.conv_rec = nn.Conv2d(channels, channels, 3, padding=1)
        self.readout = nn.Linear(channels * 4 * 4, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise LossInputError(f"x must have shape (B, T, 1, H, W), got {tuple(x.shape)}")
        batch, steps = x.shape[:2]
        h = x.new_zeros(batch, self.conv_rec.in_channels, *x.shape[3:])
        outputs = []
        # A Python loop over T: T is small, and the hooks then see one call per module per timestep.
        for t in range(steps):
            drive = torch.tanh(self.conv_in(x[:, t]) + self.conv_rec(h))
            h = (1 - self.alpha) * h + self.alpha * drive
            outputs.append(self.readout(F.avg_pool2d(h, 2).flatten(1)))
        return torch.stack(outputs, dim=1)


@dataclasses.dataclass(frozen=True)
class DigitsData:
    x_train: torch.Tensor  # (N, 1, 8, 8) float32 in [0, 1]
    y_train: torch.Tensor  # (N,) int64
    x_val: torch.Tensor
    y_val: torch.Tensor


def load_digits_data(seed: int, device: torch.device) -> DigitsData:
    """scikit-learn's bundled digits / 16, stratified 80/20 split (1437 train, 360 validation), on ``device``."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise ConfigError("task 'temporal' needs scikit-learn's digits: pip install 'losskit[vision]'") from exc
    digits = load_digits()
    images = digits.images.astype("float32") / 16.0
    x_tr, x_va, y_tr, y_va = train_test_split(
        images, digits.target, test_size=0.2, random_state=seed, stratify=digits.target
    )

    def tensor(a, dtype):
        return torch.as_tensor(a, dtype=dtype, device=device)

    return DigitsData(
        tensor(x_tr, torch.float32).unsqueeze(1),
        tensor(y_tr, torch.int64),
        tensor(x_va, torch.float32).unsqueeze(1),
        tensor(y_va, torch.int64),
    )


def present(
    schedule: PresentationSchedule, images: torch.Tensor, labels: torch.Tensor, noise_std: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images over time with fresh N(0, σ²) noise per stimulus step (null steps exactly 0), masked labels."""
    steps = schedule.n_timesteps
    x = images.unsqueeze(1).expand(images.shape[0], steps, *images.shape[1:])
    if noise_std > 0:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x + noise_std * noise
    return schedule.apply(x, labels, ignore_index=IGNORE_INDEX, inputs_have_time=True)


# ------------------------------------------------------------------------------------------------------------
# Criterion
# ------------------------------------------------------------------------------------------------------------


def _is_energy(name: str) -> bool:
    try:
        return registry.get(name).name == "energy_loss"
    except ConfigError:
        return False


def resolve_criterion(criterion: Sequence[Mapping[str, Any]] | None, energy_weight: float | None) -> list[dict]:
    """The criterion list a run uses: the default or the configured one, with ``energy_weight`` applied.

    ``energy_weight`` overrides the weight of the ``energy_loss`` entry (every entry resolving to it); without
    such an entry it is a ``ConfigError``. Entries are deep-copied, so the caller's config is not modified.
    """
    entries = copy.deepcopy(list(DEFAULT_CRITERION if criterion is None else criterion))
    if energy_weight is not None:
        targets = [e for e in entries if isinstance(e, Mapping) and _is_energy(str(e.get("name", "")))]
        if not targets:
            raise ConfigError(
                f"energy_weight={energy_weight!r} needs an energy_loss entry in criterion, got "
                f"{[e.get('name') if isinstance(e, Mapping) else e for e in entries]}"
            )
        for entry in targets:
            entry["weight"] = energy_weight
    return entries


def build_criterion(entries: list[dict]) -> CombinedLoss:
    """``CombinedLoss`` from the entries, with the trainer's settings: no-sync CE checks, activity tracking."""
    entries = copy.deepcopy(entries)
    for entry in entries:
        if isinstance(entry, dict) and _is_energy(str(entry.get("name", ""))):
            kwargs = dict(entry.get("kwargs") or {})
            kwargs.setdefault("track_activity", True)  # act_max feeds warning sign 3
            entry["kwargs"] = kwargs
    criterion = CombinedLoss.from_config(entries)
    criterion.set_input_checks("deferred")
    return criterion


def _roles(criterion: CombinedLoss) -> tuple[str | None, str | None]:
    """Labels of the CE column and the Energy column of the table (first of each kind)."""
    ce = next((s.label for s, m in zip(criterion.specs, criterion.criteria) if isinstance(m, CrossEntropyLoss)), None)
    energy = next((s.label for s, m in zip(criterion.specs, criterion.criteria) if isinstance(m, EnergyLoss)), None)
    return ce, energy


# ------------------------------------------------------------------------------------------------------------
# Table and warning signs (pure, host side)
# ------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EpochRow:
    """One epoch's train row (means over its batches) as host floats."""

    epoch: int
    ce: float
    energy: float
    total: float
    act_max: Mapping[str, float] = dataclasses.field(default_factory=dict)


def warning_signs(history: Sequence[EpochRow], weight: float) -> list[str]:
    """Seed 003's warning signs for the last row of ``history``, as messages.

    1. raw energy ``E_e > 1.0`` and ``E_e > E_{e−1}`` (from the second row);
    2. ``weight · E_e > CE_e`` (energy dominates the loss);
    3. a module with ``act_max > 10`` (each one named);
    4. CE and energy both rose at each of the last two epoch boundaries (from the third row; one rise is noise).
    """
    if not history:
        return []
    row = history[-1]
    out = []
    if len(history) >= 2 and row.energy > ENERGY_RAW_LIMIT and row.energy > history[-2].energy:
        out.append(
            f"raw energy {row.energy:.4f} > {ENERGY_RAW_LIMIT:g} and still growing (was {history[-2].energy:.4f})"
        )
    if weight * row.energy > row.ce:
        out.append(f"weighted energy {weight * row.energy:.5g} > CrossEntropy {row.ce:.5g} (energy dominates the loss)")
    for name, value in row.act_max.items():
        if value > ENERGY_ACT_LIMIT:
            out.append(f"activation magnitude of module {name!r} reached {value:.3g} > {ENERGY_ACT_LIMIT:g}")
    if len(history) >= 3:
        a, b, c = history[-3:]
        if b.ce > a.ce and c.ce > b.ce and b.energy > a.energy and c.energy > b.energy:
            out.append("CrossEntropy and energy both rose over each of the last two epochs")
    return out


def _column_names(weight: float) -> list[str]:
    return ["Epoch", "CrossEntropy", "Energy", f"Weighted Energy ({weight:g})", "Total Loss", "Val Acc"]


def format_header(weight: float) -> tuple[str, str]:
    """The table header (energy weight printed with ``g``) and its separator line."""
    names = _column_names(weight)
    header = " | ".join(names)
    rule = "|".join("-" * (len(n) + (1 if i in (0, len(names) - 1) else 2)) for i, n in enumerate(names))
    return header, rule


def format_row(epoch: int, ce: float, energy: float, weight: float, total: float, val_acc: float) -> str:
    """One table row, each cell right-aligned to the width of its header."""
    widths = [len(n) for n in _column_names(weight)]
    cells = [f"{epoch:>{widths[0]}d}", f"{ce:>{widths[1]}.4f}", f"{energy:>{widths[2]}.4f}",
             f"{weight * energy:>{widths[3]}.5f}", f"{total:>{widths[4]}.4f}", f"{val_acc:>{widths[5]}.3f}"]
    return " | ".join(cells)


# ------------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------------


class _EpochSums:
    """Device sums of detached 0-d metrics plus running maxima of ``act_max`` (no sync until ``read``)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.maxima: dict[str, torch.Tensor] = {}
        self.steps = 0

    def add(self, metrics: Mapping[str, torch.Tensor], act_max: Mapping[str, torch.Tensor]) -> None:
        for key, value in metrics.items():
            value = value.detach().to(torch.float64)
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        for name, value in act_max.items():
            key = f"act_max/{name}"
            self.maxima[key] = torch.maximum(self.maxima[key], value) if key in self.maxima else value
        self.steps += 1

    def read(self) -> dict[str, float]:
        keys = list(self.sums) + list(self.maxima)
        if not keys:
            return {}
        values = torch.stack([self.sums[k] / self.steps for k in self.sums]
                             + [self.maxima[k].to(torch.float64) for k in self.maxima]).tolist()
        return dict(zip(keys, values))


def _step_metrics(out, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    metrics = out.metrics()
    valid = target != IGNORE_INDEX
    hits = (logits.detach().argmax(-1) == target) & valid
    metrics["correct"] = hits.sum().to(torch.float64)
    metrics["valid"] = valid.sum().to(torch.float64)
    return metrics


def _energy_stats(criterion: CombinedLoss, label: str | None) -> Mapping[str, torch.Tensor]:
    if label is None:
        return {}
    stats = criterion.criterion(label).last_stats
    return {} if stats is None else stats.act_max


def run(cfg: Any) -> dict:
    """Train per ``cfg`` (a ``TemporalTrainConfig``); print the table, write the files; return a summary.

    On CPU the run uses ``cfg.num_threads`` intra-op threads (None: torch's setting; the default 1 is why
    ``NumThreadsConfig`` says) and restores torch's setting afterwards.
    """
    device = resolve_device(cfg.device)
    with cpu_threads(device, cfg.num_threads):
        return _run(cfg, device)


def _run(cfg: Any, device: torch.device) -> dict:
    cfg = dataclasses.replace(cfg, out_dir=resolve_out_dir("temporal", cfg.out_dir))
    pattern = parse_pattern(cfg.pattern)  # TypeError for an int pattern: "quote the pattern"
    alpha = cfg.dt / cfg.tau
    if not 0 < alpha <= 1:
        raise ConfigError(f"dt/tau (the leak alpha) must be in (0, 1], got dt={cfg.dt}, tau={cfg.tau}: {alpha:g}")
    entries = resolve_criterion(cfg.criterion, cfg.energy_weight)
    criterion = build_criterion(entries).to(device)
    ce_label, energy_label = _roles(criterion)
    ce_module = criterion.criterion(ce_label) if ce_label else None  # its last_flags are read every step
    energy_weight = criterion.weights.get(energy_label, 0.0) if energy_label else 0.0
    schedule = PresentationSchedule.build(
        "".join(map(str, pattern)), cfg.n_timesteps, dt=cfg.dt, loss_reaction_time=cfg.loss_reaction_time,
        device=device,
    )
    if ce_label is not None and not cfg.allow_no_supervision and not bool(schedule.label_valid.any()):
        raise ConfigError(
            f"no timestep has a label: pattern {cfg.pattern!r} stretched to n_timesteps={cfg.n_timesteps} with "
            f"loss_reaction_time={cfg.loss_reaction_time} and dt={cfg.dt} masks every stimulus step "
            f"(k={schedule.k} reaction steps per onset), so the cross-entropy would be 0 for every batch; shorten "
            "loss_reaction_time, lengthen the stimulus chunks, or pass --allow_no_supervision=True"
        )
    data = load_digits_data(cfg.seed, device)

    out_dir = prepare_run_dir("temporal", cfg.out_dir)
    cfg = dataclasses.replace(cfg, out_dir=str(out_dir))
    config_dict = train_config_to_dict(cfg)
    config_dict["criterion"] = entries
    save_resolved_config(out_dir, config_dict, print_it=False)

    torch.manual_seed(cfg.seed)
    model = TemporalDigitsNet(cfg.channels, alpha).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    val_generator = torch.Generator(device=device)
    sinks = open_sinks(cfg, config_dict)

    header, rule = format_header(energy_weight)
    print(header, flush=True)
    print(rule, flush=True)
    history: list[EpochRow] = []
    csv_rows: list[dict[str, Any]] = []
    signs_total = 0
    n_train = data.x_train.shape[0]
    started = time.perf_counter()
    try:
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            model.train()
            sums = _EpochSums()
            flags = torch.zeros(2, dtype=torch.int64, device=device)  # steps with bad input / no valid label
            order = torch.randperm(n_train, generator=generator, device=device)
            for start in range(0, n_train, cfg.batch_size):  # the last partial batch is kept
                idx = order[start : start + cfg.batch_size]
                x, y = present(schedule, data.x_train[idx], data.y_train[idx], cfg.noise_std, generator)
                with criterion.recording(model):
                    logits = model(x)
                out = criterion(logits, y, return_components=True)
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                optimizer.step()
                sums.add(_step_metrics(out, logits, y), _energy_stats(criterion, energy_label))
                if ce_module is not None and ce_module.last_flags is not None:
                    flags = flags + torch.stack([ce_module.last_flags["bad"], ce_module.last_flags["empty"]]).long()
            train = sums.read()  # the epoch's one host read of training metrics
            bad_steps, empty_steps = flags.tolist()
            if bad_steps:
                raise LossInputError(
                    f"epoch {epoch}: {bad_steps} step(s) had out-of-range targets or non-finite logits at valid "
                    "timesteps"
                )
            if empty_steps:
                warnings.warn(EmptyBatchWarning(f"{EMPTY_BATCH_MESSAGE} ({empty_steps} step(s) of epoch {epoch})"))
            train_seconds = time.perf_counter() - t0

            t1 = time.perf_counter()
            val = evaluate(model, criterion, schedule, data, cfg, val_generator, energy_label)
            val_seconds = time.perf_counter() - t1

            train_acc = train.pop("correct") / max(train.pop("valid"), 1.0)
            ce = train.get(f"loss/{ce_label}", 0.0) if ce_label else 0.0
            energy = train.get(f"loss/{energy_label}", 0.0) if energy_label else 0.0
            total = train["loss/total"]
            act = {k.split("/", 1)[1]: v for k, v in train.items() if k.startswith("act_max/")}
            history.append(EpochRow(epoch, ce, energy, total, act))
            print(format_row(epoch, ce, energy, energy_weight, total, val["acc"]), flush=True)
            signs = warning_signs(history, energy_weight)
            for message in signs:
                # printed once, on stdout next to the table (a logging call as well printed it twice)
                print(f"! warning sign (epoch {epoch}): {message}", flush=True)
            signs_total += len(signs)

            train_row = {"epoch": epoch, "split": "train", **train, "acc": train_acc,
                         "seconds": train_seconds, "warnings": " / ".join(signs)}
            val_row = {"epoch": epoch, "split": "val", **val, "seconds": val_seconds,
                       "warnings": ""}
            csv_rows += [train_row, val_row]
            logged = {"train/loss": total, "val/loss": val.get(f"loss/{ce_label}", val["loss/total"]),
                      "train/lr": cfg.learning_rate}  # Adam's constant rate: the plot's learning-rate panel
            logged.update({f"train/{k}": v for k, v in train_row.items() if k not in ("epoch", "split", "warnings")})
            logged.update({f"val/{k}": v for k, v in val_row.items() if k not in ("epoch", "split", "warnings")})
            sinks.log(epoch, logged)
    finally:
        sinks.close()
    wall = time.perf_counter() - started
    last = history[-1]
    share = energy_weight * last.energy / last.total if last.total else 0.0
    print(
        f"energy share of the total loss in the last epoch: w*E/total = {100 * share:.2f}% "
        "(the seed: typically < 5%)",
        flush=True,
    )
    _write_csv(out_dir / "metrics.csv", csv_rows)
    _plot(out_dir / "temporal_losses.png", csv_rows, ce_label, energy_label, energy_weight)
    final_val = csv_rows[-1]
    return {
        "val_loss": final_val.get(f"loss/{ce_label}", final_val["loss/total"]),
        "val_acc": final_val["acc"],
        "val_acc_last": final_val["acc_last"],
        "train_ce": last.ce,
        "train_energy": last.energy,
        "energy_share": share,
        "warning_signs": signs_total,
        "seconds": wall,
    }


@torch.no_grad()
def evaluate(
    model: TemporalDigitsNet, criterion: CombinedLoss, schedule: PresentationSchedule, data: DigitsData, cfg: Any,
    generator: torch.Generator, energy_label: str | None,
) -> dict[str, float]:
    """Validation as one batch with fixed noise (generator reseeded with ``seed + 1``): losses and accuracies."""
    model.eval()
    generator.manual_seed(cfg.seed + 1)
    x, y = present(schedule, data.x_val, data.y_val, cfg.noise_std, generator)
    with criterion.recording(model):  # energy is still recorded without grad
        logits = model(x)
    out = criterion(logits, y, return_components=True)
    metrics = _step_metrics(out, logits, y)
    last_hits = (logits[:, -1].argmax(-1) == data.y_val).sum()
    metrics["acc_last"] = last_hits.to(torch.float64) / y.shape[0]
    metrics.update({f"act_max/{k}": v for k, v in _energy_stats(criterion, energy_label).items()})
    keys = list(metrics)
    values = dict(zip(keys, torch.stack([metrics[k].to(torch.float64) for k in keys]).tolist()))
    values["acc"] = values.pop("correct") / max(values.pop("valid"), 1.0)
    return values


def _write_csv(path: pathlib.Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def _plot(path: pathlib.Path, rows: list[dict[str, Any]], ce_label: str | None, energy_label: str | None,
          weight: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(split: str, key: str) -> tuple[list[int], list[float]]:
        pts = [(r["epoch"], r[key]) for r in rows if r["split"] == split and key in r and r[key] != ""]
        return [p[0] for p in pts], [float(p[1]) for p in pts]

    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    ce_key = f"loss/{ce_label}" if ce_label else "loss/total"
    for split in ("train", "val"):
        left.plot(*series(split, ce_key), marker="o", markersize=3, label=f"{split} CE")
    left.set_xlabel("epoch")
    left.set_ylabel("cross-entropy (nats per valid timestep)")
    left.set_title("CrossEntropy")
    left.legend()
    if energy_label:
        for split in ("train", "val"):
            right.plot(*series(split, f"loss/{energy_label}"), marker="o", markersize=3, label=f"{split} energy (raw)")
        right.plot(*series("train", f"loss_weighted/{energy_label}"), "--", label=f"train weighted energy (w={weight:g})")
        right.legend()
    right.set_xlabel("epoch")
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_ylabel("energy")
    right.set_title("Energy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
