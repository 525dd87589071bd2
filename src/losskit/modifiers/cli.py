"""``losskit modifiers``: print every loss-modifier config key with its type, default, range and meaning.

On a terminal the table fits its width (``shutil.get_terminal_size``, which also honours ``COLUMNS``): constraint
and meaning wrap within their columns, and a terminal too narrow even for the other columns gets one block per key.
Piped or redirected output keeps one line per key, for ``grep`` and scripts.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import textwrap

from losskit.modifiers.config_keys import MODIFIER_CONFIG_KEYS, MODIFIER_KEY_PATTERNS
from losskit.modifiers.factory import registered_modifiers

__all__ = ["keys_table", "main"]

_HEADER = ("key", "type", "default", "constraint", "meaning")
_GAP = "  "
#: Below this many columns for the meaning, one block per key reads better than a squeezed table.
_MIN_MEANING = 24
_MIN_CONSTRAINT = 14


def _rows() -> list[tuple[str, ...]]:
    return [(s.name, s.type, repr(s.default), s.constraint or (" | ".join(s.choices) if s.choices else "-"), s.help)
            for s in MODIFIER_CONFIG_KEYS.values()]


def output_width() -> int | None:
    """The terminal's width (``COLUMNS`` wins, as ``shutil.get_terminal_size`` reads it), or None (no wrapping)
    when stdout is not a terminal."""
    if not sys.stdout.isatty():
        return None
    return shutil.get_terminal_size((100, 24)).columns


def keys_table(width: int | None = None) -> str:
    """The config keys of ``MODIFIER_CONFIG_KEYS`` (canonical order) as plain text at most ``width`` columns wide,
    constraint and meaning wrapped within their columns; ``width=None``: one line per key."""
    rows = _rows()
    longest = [max(len(r[i]) for r in [_HEADER, *rows]) for i in range(5)]
    if width is None:
        widths = longest
    else:
        room = width - sum(longest[:3]) - len(_GAP) * 4  # for constraint + meaning
        constraint = min(longest[3], max(_MIN_CONSTRAINT, room * 2 // 5))
        meaning = min(longest[4], room - constraint)
        if meaning < _MIN_MEANING:
            return _blocks(rows, width)
        widths = [*longest[:3], constraint, meaning]

    def lines(cells: tuple[str, ...]) -> list[str]:
        wrapped = [[c] if i < 3 else (textwrap.wrap(c, widths[i], break_on_hyphens=False) or [""])
                   for i, c in enumerate(cells)]
        depth = max(len(w) for w in wrapped)
        return [_GAP.join((w[k] if k < len(w) else "").ljust(widths[i]) for i, w in enumerate(wrapped)).rstrip()
                for k in range(depth)]

    out = [*lines(_HEADER), _GAP.join("-" * w for w in widths)]
    for r in rows:
        out += lines(r)
    return "\n".join(out)


def _blocks(rows: list[tuple[str, ...]], width: int) -> str:
    """One block per key: its name, then type/default/constraint and the meaning, indented and wrapped."""
    out = []
    for name, type_, default, constraint, help_ in rows:
        out.append(name)
        detail = f"{type_}, default {default}, {constraint}"
        for text in (detail, help_):
            out += textwrap.wrap(text, max(width - 4, 20), initial_indent="    ", subsequent_indent="    ",
                                 break_on_hyphens=False)
    return "\n".join(out)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="losskit modifiers",
        description="List every loss-modifier config key (use them as --key=value or in a config file).",
    )
    parser.parse_args(argv)
    width = output_width()
    print(keys_table(width))
    print()
    fill = (lambda text: textwrap.fill(text, width)) if width else (lambda text: text)
    print(fill("Keys matching " + ", ".join(MODIFIER_KEY_PATTERNS) + " must be listed above or under a registered "
               "prefix."))
    reg = registered_modifiers()
    if reg:
        print(fill("Registered prefixes: " + ", ".join(f"{p}* -> {c.__name__}" for p, c in reg.items())))
    return 0
