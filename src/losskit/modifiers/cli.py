"""``losskit modifiers``: print every loss-modifier config key with its type, default, range and meaning."""

from __future__ import annotations

import argparse

from losskit.modifiers.config_keys import MODIFIER_CONFIG_KEYS, MODIFIER_KEY_PATTERNS
from losskit.modifiers.factory import registered_modifiers

__all__ = ["keys_table", "main"]

_HEADER = ("key", "type", "default", "constraint", "meaning")


def keys_table() -> str:
    """The config keys of ``MODIFIER_CONFIG_KEYS`` (canonical order) as an aligned plain-text table."""
    rows = [(s.name, s.type, repr(s.default), s.constraint or (" | ".join(s.choices) if s.choices else "-"), s.help)
            for s in MODIFIER_CONFIG_KEYS.values()]
    cells = [_HEADER, *rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(_HEADER))]

    def line(r: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()

    return "\n".join([line(_HEADER), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="losskit modifiers",
        description="List every loss-modifier config key (use them as --key=value or in a config file).",
    )
    parser.parse_args(argv)
    print(keys_table())
    print()
    print("Keys matching " + ", ".join(MODIFIER_KEY_PATTERNS) + " must be listed above or under a registered prefix.")
    reg = registered_modifiers()
    if reg:
        print("Registered prefixes: " + ", ".join(f"{p}* -> {c.__name__}" for p, c in reg.items()))
    return 0
