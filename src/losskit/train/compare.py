"""`losskit compare [CONFIG] --variant 'NAME:key=value;key=value' ... [--key=value ...]`.

Trains every variant on the same data and seed (the shared config plus that variant's pairs; pairs are
separated by ``;`` because list values contain commas), then writes ``compare.md`` / ``compare.csv`` (final and
best ``val/loss``, the task's primary validation metric, and throughput) and ``compare.png`` (all val curves).
This is seed 000's "enable one modifier at a time" advice as one command.
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import sys

from losskit.config import build_train_config, load_config
from losskit.contract import ConfigError, LossInputError
from losskit.train.sinks import read_metrics, series


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


def _fmt(v) -> str:
    return "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def run_compare(config_args: list[str], variants: list[str], out_dir: str | pathlib.Path) -> list[dict]:
    """Train each variant into ``out_dir/NAME`` and write the table and the plot; returns the table rows."""
    from losskit.train.cli import registered_prefixes
    from losskit.train.tasks import run_task

    out = pathlib.Path(out_dir)
    parsed = [parse_variant(v) for v in variants]
    names = [n for n, _ in parsed]
    if len(set(names)) != len(names):
        raise ConfigError(f"--variant names must be unique, got {names}")
    base = load_config(config_args)
    # validate every variant before training any, so a typo in the last one fails fast
    configs = []
    for name, pairs in parsed:
        raw = {**base, **pairs, "out_dir": str(out / name), "init_from": "scratch"}
        configs.append((name, build_train_config(raw, prefixes=registered_prefixes())))
    rows = []
    for name, cfg in configs:
        print(f"=== variant {name} ===", flush=True)
        summary = run_task(cfg) or {}
        metrics = read_metrics(cfg.out_dir)
        _, vals = series(metrics, "val/loss")
        _, tps = series(metrics, "train/tokens_per_sec")
        rows.append({
            "variant": name, "final val/loss": vals[-1] if vals else None,
            "best val/loss": min(vals) if vals else None,
            "tokens/s": sum(tps[1:]) / len(tps[1:]) if len(tps) > 1 else (tps[0] if tps else None),
            "wall s": summary.get("wall_s"), "run_dir": str(cfg.out_dir),
        })
    header = list(rows[0])
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "compare.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(_fmt(r[h]) for h in header) + " |" for r in rows]
    (out / "compare.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    _plot_val_curves(configs, out / "compare.png")
    return rows


def _plot_val_curves(configs, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, cfg in configs:
        xs, ys = series(read_metrics(cfg.out_dir), "val/loss")
        ax.plot(xs, ys, marker="o", markersize=3, label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel("val/loss")
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
    parser.add_argument("--out_dir", default="out/compare", help="where the variant runs and the table go")
    args, rest = parser.parse_known_args(argv)
    try:
        run_compare(list(args.config) + rest, args.variant, args.out_dir)
    except (ConfigError, LossInputError) as exc:
        print(f"losskit compare: error: {exc}", file=sys.stderr)
        return 2
    return 0
