"""`losskit` command line: one subcommand per job, each implemented in its own module.

Every subcommand module exposes ``main(argv: list[str]) -> int`` and builds its own argument parser (with
``prog="losskit <name>"``), so ``losskit <name> --help`` explains every flag. The modules are imported only
when their subcommand runs, so ``losskit --help`` stays fast and optional extras stay optional.
"""

from __future__ import annotations

import importlib
import sys

# name -> ("module:function" taking argv and returning an exit code, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("losskit.bench.cli:main", "benchmark the cross-entropy implementations side by side (table + CSV)"),
    "losses": ("losskit.cli:losses_main", "list the loss registry: name, required inputs, description"),
    "modifiers": ("losskit.modifiers.cli:main", "list every loss-modifier config key: type, default, meaning"),
    "train": ("losskit.train.cli:main", "train a model (task lm: byte-level Llama on an embedded corpus; temporal; diffusion)"),
    "plot": ("losskit.train.plot:main", "PNG training curves of run directories (losses, LR, modifier metrics)"),
    "compare": ("losskit.train.compare:main", "train config variants on the same data and seed; table + val-curve PNG"),
    "sample": ("losskit.train.sample:main", "generate text from a trained lm run"),
    "export": ("losskit.service.tinker_export:main", "write a trained lm run, or a tinker:// checkpoint of losskit serve (merged), as a Hugging Face model"),
    "serve": ("losskit.service.cli:main", "start the training server (LoRA on HF causal LMs, built-in and custom losses)"),
}


def _usage() -> str:
    width = max(len(n) for n in SUBCOMMANDS)
    lines = [
        "usage: losskit <command> [options]",
        "",
        "losskit: loss functions and loss modifiers for PyTorch.",
        "",
        "commands:",
    ]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `losskit <command> --help` for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from losskit import __version__

        print(f"losskit {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"losskit: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, function_name = SUBCOMMANDS[name][0].split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    return int(function(rest) or 0)


def losses_main(argv: list[str]) -> int:
    """`losskit losses`: print the loss registry as a table."""
    import argparse

    from losskit.registry import REGISTRY

    parser = argparse.ArgumentParser(
        prog="losskit losses", description="List every registered loss: name, required inputs, description."
    )
    parser.parse_args(argv)
    rows = [(s.name, ", ".join(s.required_inputs), s.description) for s in REGISTRY.values()]
    print(format_table(("name", "required inputs", "description"), rows))
    return 0


def format_table(header: tuple[str, ...], rows: list[tuple]) -> str:
    """A plain-text console table with aligned columns."""
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


if __name__ == "__main__":
    raise SystemExit(main())
