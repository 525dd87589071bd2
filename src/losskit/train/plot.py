"""`losskit plot RUN_DIR... [--out PNG]`: training curves of one or more runs from their metrics.jsonl.

Panels: losses (``train/loss``, ``train/loss_raw``, ``val/loss``), learning rate (``train/lr``) and every
modifier metric (``loss_modifiers/...``), one line per run. Matplotlib's Agg backend; 100 dpi.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from losskit.train.sinks import read_metrics, series

LOSS_KEYS = ("train/loss", "train/loss_raw", "val/loss")


def plot_runs(run_dirs: list[str], out: str | pathlib.Path) -> pathlib.Path:
    """Write the PNG and return its path; raises FileNotFoundError for a directory without metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(pathlib.Path(d).name or str(d), read_metrics(d)) for d in run_dirs]
    mod_keys = sorted({k for _, rows in runs for r in rows for k in r if k.startswith("loss_modifiers/")})
    panels = [("loss (nats/token)", LOSS_KEYS), ("learning rate", ("train/lr",))]
    panels += [(k.split("/", 1)[1], (k,)) for k in mod_keys]
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for name, rows in runs:
            for key in keys:
                xs, ys = series(rows, key)
                if xs:
                    label = key if len(runs) == 1 else f"{name}: {key}"
                    ax.plot(xs, ys, marker="o" if key == "val/loss" else None, markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        if ax.lines:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="losskit plot", description="PNG training curves of losskit train runs.")
    parser.add_argument("run_dirs", nargs="+", help="run directories (each with metrics.jsonl)")
    parser.add_argument("--out", default=None, help="output PNG (default: RUN_DIR/curves.png of the first run)")
    args = parser.parse_args(argv)
    out = args.out or str(pathlib.Path(args.run_dirs[0]) / "curves.png")
    try:
        path = plot_runs(args.run_dirs, out)
    except FileNotFoundError as exc:
        print(f"losskit plot: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
