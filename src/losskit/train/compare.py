"""`losskit compare [CONFIG] --variant 'NAME:key=value;key=value' ... [--key=value ...]`.

Trains every variant on the same data and seed (the shared config plus that variant's pairs; pairs are
separated by ``;`` because list values contain commas), then writes ``compare.md`` / ``compare.csv`` (final and
best ``val/loss``, the task's primary validation metric, and throughput) and ``compare.png`` (all val curves).
This is seed 000's "enable one modifier at a time" advice as one command.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import pathlib
import sys
import time

from losskit.config import load_config
from losskit.contract import ConfigError, LossInputError
from losskit.train.sinks import read_metrics, series
from losskit.train.tasks import build_train_config, run_task


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """``'NAME:key=value;key=value'`` -> ``(NAME, {key: value})``; ``'NAME'`` or ``'NAME:'`` has no pairs."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name or not name.replace("-", "_").replace(".", "_").isidentifier():
        raise ConfigError(f"--variant must look like 'NAME:key=value;key=value' with a simple NAME, got {text!r}")
    pairs: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(";"))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--variant {name!r}: {item!r} must have the form key=value")
        pairs[key.strip().removeprefix("--")] = value.strip()
    return name, pairs


def _fmt(key: str, v) -> str:
    """Table cells: losses to 4 decimals, tokens/s as a whole number with separators, seconds to 0.1 s."""
    if v is None:
        return ""
    if key == "tokens/s":
        return f"{v:,.0f}"
    if key == "wall s":
        return f"{v:.1f}"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _round(key: str, v):
    """The CSV keeps what is meaningful: tokens/s to the token, seconds to 0.1 s, losses to 1e-6."""
    if v is None:
        return None
    if key == "tokens/s":
        return round(v)
    if key == "wall s":
        return round(v, 1)
    return round(v, 6) if isinstance(v, float) else v


def run_compare(config_args: list[str], variants: list[str], out_dir: str | pathlib.Path | None) -> list[dict]:
    """Train each variant into ``ROOT/NAME`` and write the table and the plot there; returns the table rows.

    ``ROOT`` is ``out_dir`` when given (it must not hold these variants' runs already), else a new numbered
    ``out/compare/run-N`` (``out/compare/latest`` points at it). Every variant trains from scratch into its own
    directory, so ``out_dir`` keys are replaced and ``init_from=resume`` is an error. Every variant is validated
    before any trains.
    """
    from losskit.train.cli import registered_prefixes
    from losskit.train.rundir import claim_run_dir, resolve_out_dir, task_folder

    parsed = [parse_variant(v) for v in variants]
    names = [n for n, _ in parsed]
    if len(set(names)) != len(names):
        raise ConfigError(f"--variant names must be unique, got {names}")
    base = load_config(config_args)
    # validate every variant before training any, so a typo in the last one fails fast
    configs = []
    for name, pairs in parsed:
        raw = {**base, **pairs}
        raw.pop("out_dir", None)
        if str(raw.get("init_from", "scratch")).strip() != "scratch":
            raise ConfigError(f"--variant {name!r}: losskit compare trains every variant from scratch, got "
                              f"init_from={raw['init_from']!r}")
        cfg = build_train_config(raw, prefixes=registered_prefixes())
        if out_dir is not None:
            resolve_out_dir(cfg.task, str(pathlib.Path(out_dir) / name), "scratch")  # refuses to replace a run
        configs.append((name, cfg))
    tasks = sorted({cfg.task for _, cfg in configs})
    if len(tasks) > 1:
        raise ConfigError(f"--variant runs must share one task (their val/loss units differ), got tasks {tasks}")
    root = pathlib.Path(out_dir) if out_dir is not None else claim_run_dir(task_folder("compare"))
    configs = [(name, dataclasses.replace(cfg, out_dir=str(root / name))) for name, cfg in configs]
    rows = []
    for name, cfg in configs:
        print(f"=== variant {name} ===", flush=True)
        started = time.perf_counter()
        run_task(cfg)
        wall = time.perf_counter() - started
        metrics = read_metrics(cfg.out_dir)
        _, vals = series(metrics, "val/loss")
        _, tps = series(metrics, "train/tokens_per_sec")
        row = {
            "variant": name, "final val/loss": vals[-1] if vals else None,
            "best val/loss": min(vals) if vals else None,
            "tokens/s": sum(tps[1:]) / len(tps[1:]) if len(tps) > 1 else (tps[0] if tps else None),
            "wall s": wall, "run_dir": str(cfg.out_dir),
        }
        rows.append({k: _round(k, v) for k, v in row.items()})
    header = list(rows[0])
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "compare.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(_fmt(h, r[h]) for h in header) + " |" for r in rows]
    (root / "compare.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    _plot_val_curves(configs, root / "compare.png")
    print(f"compare: {root / 'compare.md'}, {root / 'compare.csv'}, {root / 'compare.png'}", flush=True)
    return rows


def _plot_val_curves(configs, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from losskit.train.plot import PANELS, VAL_LOSS_LABEL, spans_decades

    task = configs[0][1].task
    fig, ax = plt.subplots(figsize=(7, 4.5))
    values: list[float] = []
    for name, cfg in configs:
        xs, ys = series(read_metrics(cfg.out_dir), "val/loss")
        values += ys
        ax.plot(xs, ys, marker="o", markersize=3, label=name)
    if spans_decades(values):
        ax.set_yscale("log")
    ax.set_xlabel(PANELS[task][0])
    ax.set_ylabel(VAL_LOSS_LABEL[task])
    ax.set_title("validation loss by variant")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="losskit compare", allow_abbrev=False,
        description="Train variants of one config on the same data and seed; write a table and a PNG of val "
        "curves. Extra --key=value arguments apply to every variant.",
    )
    parser.add_argument("config", nargs="*", help="config files (python or YAML)")
    parser.add_argument("--variant", action="append", required=True,
                        help="'NAME:key=value;key=value' (pairs separated by ';'); repeat per variant")
    parser.add_argument("--out_dir", default=None,
                        help="where the variant runs (OUT_DIR/NAME) and the table go (default: a new out/compare/run-N)")
    args, rest = parser.parse_known_args(argv)
    try:
        run_compare(list(args.config) + rest, args.variant, args.out_dir)
    except (ConfigError, LossInputError) as exc:
        print(f"losskit compare: error: {exc}", file=sys.stderr)
        return 2
    return 0
