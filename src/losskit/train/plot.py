"""`losskit plot RUN_DIR... [--out PNG]`: training curves of one or more runs of one task, from metrics.jsonl.

Each task is drawn in its own units (``PANELS``): lm losses in nats/token against optimizer steps; diffusion's
weighted and raw MSE and its eval x0-MSE (per pixel, also per timestep bucket) against steps; temporal's
cross-entropy, energy, total loss and accuracy against epochs. Every task gets a learning-rate panel and one panel
per logged modifier metric (``loss_modifiers/...``). A panel whose positive values span a factor of 10 or more
uses a log axis. Runs of different tasks have different units, so plotting them together is refused. A RUN_DIR
may be a task folder such as ``out/lm`` (its latest run). Matplotlib's Agg backend; 100 dpi.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import re
import sys

from losskit.contract import ConfigError
from losskit.train.rundir import find_run_dir
from losskit.train.sinks import read_metrics, series

__all__ = ["PANELS", "VAL_LOSS_LABEL", "Panel", "main", "panels_for", "plot_runs", "run_task_name", "spans_decades"]


@dataclasses.dataclass(frozen=True)
class Panel:
    """One subplot: its title, y label and the metric keys drawn in it (a key may be a regular expression)."""

    title: str
    ylabel: str
    keys: tuple[str, ...]
    pattern: bool = False
    log_when_spanning: bool = True  # a log axis when the values span a factor of 10 or more


# A schedule reads best on a linear axis (warm-up from near 0 would otherwise dominate a log one).
LR = Panel("learning rate", "learning rate", ("train/lr",), log_when_spanning=False)

#: task -> (x label, panels); modifier-metric panels are added from the logged keys.
PANELS: dict[str, tuple[str, tuple[Panel, ...]]] = {
    "lm": ("step (optimizer steps completed)", (
        Panel("loss", "cross-entropy (nats/token)", ("train/loss", "train/loss_raw", "val/loss")),
        LR,
        Panel("gradient norm", "global L2 norm (before clipping)", ("train/grad_norm",)),
    )),
    "diffusion": ("step (optimizer steps completed)", (
        Panel("training loss", "MSE per element (train/loss: weighted)", ("train/loss", "train/loss_raw")),
        Panel("eval x0-MSE", "x0-MSE per pixel (val/loss)", ("val/loss",)),
        Panel("eval x0-MSE per timestep bucket", "x0-MSE per pixel", (r"eval/x0_mse/bucket_\d+",), pattern=True),
        LR,
    )),
    "temporal": ("epoch", (
        Panel("cross-entropy", "nats per valid timestep", ("train/loss/cross_entropy_loss", "val/loss")),
        Panel("energy", "energy loss (raw)", (r"(train|val)/loss/energy\w*",), pattern=True),
        Panel("total loss", "CE + weighted energy", ("train/loss", "val/loss/total")),
        Panel("accuracy", "fraction correct", ("train/acc", "val/acc", "val/acc_last")),
        LR,
    )),
}


#: What ``val/loss`` measures in each task (the y label of ``losskit compare``'s plot).
VAL_LOSS_LABEL: dict[str, str] = {
    "lm": "val/loss (cross-entropy, nats/token)",
    "diffusion": "val/loss (eval x0-MSE per pixel)",
    "temporal": "val/loss (cross-entropy, nats per valid timestep)",
}


def run_task_name(run_dir: pathlib.Path) -> str:
    """The ``task`` of a run (from its ``config.yaml``; ``lm`` when the file is missing)."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return "lm"
    data = yaml.safe_load(path.read_text()) or {}
    return str(data.get("task", "lm"))


def panels_for(task: str, keys: set[str]) -> tuple[str, list[tuple[Panel, list[str]]]]:
    """The x label and the non-empty panels of ``task`` with the logged keys each one draws."""
    xlabel, panels = PANELS.get(task, PANELS["lm"])
    out = []
    for panel in panels:
        if panel.pattern:
            drawn = sorted(k for k in keys if any(re.fullmatch(p, k) for p in panel.keys))
        else:
            drawn = [k for k in panel.keys if k in keys]
        if drawn:
            out.append((panel, drawn))
    for key in sorted(k for k in keys if k.startswith("loss_modifiers/")):
        name = key.split("/", 1)[1]
        out.append((Panel(name, name.rsplit(".", 1)[-1], (key,)), [key]))
    return xlabel, out


def spans_decades(values: list[float]) -> bool:
    """True when every value is positive and the largest is at least 10 times the smallest (use a log axis)."""
    positive = [v for v in values if v is not None and v > 0]
    return len(positive) == len([v for v in values if v is not None]) and bool(positive) and \
        max(positive) >= 10 * min(positive)


def plot_runs(run_dirs: list[str], out: str | pathlib.Path) -> pathlib.Path:
    """Write the PNG and return its path.

    Raises:
        FileNotFoundError: a path is neither a run directory nor a task folder with runs.
        ConfigError: the runs belong to different tasks, or none logged anything plottable.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    dirs = [find_run_dir(d) for d in run_dirs]
    tasks = {d: run_task_name(d) for d in dirs}
    if len(set(tasks.values())) > 1:
        listing = ", ".join(f"{d} ({t})" for d, t in tasks.items())
        raise ConfigError(f"cannot plot runs of different tasks together (their units differ): {listing}; "
                          "plot each task separately")
    task = next(iter(tasks.values()))
    names = _short_names(dirs)
    runs = [(names[d], read_metrics(d)) for d in dirs]
    keys = {k for _, rows in runs for r in rows for k in r if k != "step"}
    xlabel, panels = panels_for(task, keys)
    if not panels:
        raise ConfigError(f"nothing to plot: {', '.join(map(str, dirs))} logged no known metric yet")
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
    for ax, (panel, drawn) in zip(axes.flat, panels):
        values: list[float] = []
        for name, rows in runs:
            for key in drawn:
                xs, ys = series(rows, key)
                if not xs:
                    continue
                values += ys
                short = key.rsplit("/", 1)[-1] if panel.pattern and len(drawn) > 3 else key  # e.g. bucket_03
                label = short if len(runs) == 1 else f"{name}: {short}"
                marker = "o" if key.startswith(("val/", "eval/")) or task == "temporal" else None
                ax.plot(xs, ys, marker=marker, markersize=3, label=label)
        if panel.log_when_spanning and spans_decades(values):
            ax.set_yscale("log")
        ax.set_title(panel.title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and epochs are whole numbers
        if ax.lines:
            ax.legend(fontsize=6 if len(ax.lines) > 4 else 7, ncol=2 if len(ax.lines) > 4 else 1)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"task {task}: " + ", ".join(names[d] for d in dirs), fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))  # room for the title above the panels
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _short_names(dirs: list[pathlib.Path]) -> dict[pathlib.Path, str]:
    """``run-3`` alone, or ``lm/run-3`` when two runs share a last component."""
    last = [d.name for d in dirs]
    return {d: (d.name if last.count(d.name) == 1 else f"{d.parent.name}/{d.name}") for d in dirs}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="losskit plot",
        description="PNG training curves of losskit train runs of one task, in that task's units.",
    )
    parser.add_argument("run_dirs", nargs="+",
                        help="run directories, or task folders such as out/lm (their latest run)")
    parser.add_argument("--out", default=None, help="output PNG (default: curves.png in the first run directory)")
    args = parser.parse_args(argv)
    try:
        out = args.out or str(find_run_dir(args.run_dirs[0]) / "curves.png")
        path = plot_runs(args.run_dirs, out)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"losskit plot: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
