"""Configuration sources: python/YAML config files and ``--key=value`` command-line overrides.

This is nanoGPT's configurator made explicit (docs/training.md): ``python train.py [cfg.py|cfg.yaml]
--key=value ...``. Positional arguments are config files, applied in order; ``--key=value`` overrides are applied
after every file. Override values stay strings here; the consumer types the merged result once, key by key, with
:func:`coerce` (the one value coercer of config files and the command line), by each key's *declared* kind.

Sources and their rules:

* **Python file.** Executed in a fresh namespace; its module-level names become values, except names starting
  with ``_``, modules and callables (functions, classes), which are helpers rather than settings.
* **YAML file** (``.yaml``/``.yml``). A flat mapping of the same keys; nested mappings are rejected.
"""

from __future__ import annotations

import pathlib
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from losskit.contract import ConfigError
from losskit.modifiers.config_keys import KeySpec, coerce_value

__all__ = [
    "KINDS",
    "coerce",
    "load_config",
    "load_config_file",
    "merge_config",
    "parse_overrides",
]

_PY_SUFFIXES = (".py",)
_YAML_SUFFIXES = (".yaml", ".yml")


def _load_python(path: pathlib.Path) -> dict[str, Any]:
    source = path.read_text()
    try:
        code = compile(source, str(path), "exec")
    except SyntaxError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid Python: {exc.msg} (line {exc.lineno})") from exc
    namespace: dict[str, Any] = {"__file__": str(path), "__name__": "__losskit_config__"}
    try:
        exec(code, namespace)  # noqa: S102 - executing the user's own config file is the documented contract
    except Exception as exc:
        raise ConfigError(f"config file {str(path)!r} raised {type(exc).__name__}: {exc}") from exc
    return {
        k: v
        for k, v in namespace.items()
        if not k.startswith("_") and not isinstance(v, types.ModuleType) and not callable(v)
    }


def _load_yaml(path: pathlib.Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"config file {str(path)!r} must hold a flat mapping of key: value, got {type(data).__name__}"
        )
    out: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"config file {str(path)!r}: keys must be strings, got {key!r}")
        if isinstance(value, Mapping):
            raise ConfigError(
                f"config file {str(path)!r}: key {key!r} holds a nested mapping; expected a flat mapping of "
                "key: value (scalars or lists)"
            )
        out[key] = value
    return out


def load_config_file(path: str | pathlib.Path) -> dict[str, Any]:
    """Load one python (``.py``) or YAML (``.yaml``/``.yml``) config file as a flat ``{key: value}`` dict.

    Raises:
        ConfigError: the file is missing, has another suffix, does not parse, raises while executing, or (YAML)
            is not a flat mapping.
    """
    p = pathlib.Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found (expected a .py or .yaml file)")
    suffix = p.suffix.lower()
    if suffix in _PY_SUFFIXES:
        return _load_python(p)
    if suffix in _YAML_SUFFIXES:
        return _load_yaml(p)
    raise ConfigError(f"config file {str(p)!r} must end in .py, .yaml or .yml, got {p.suffix!r}")


def parse_overrides(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Split command-line arguments into config file paths and ``--key=value`` overrides.

    Bare positional arguments are config files (nanoGPT's convention); ``--key=value`` sets ``key`` to the string
    ``value`` (an empty value is the empty string); a later override of the same key wins.

    Returns:
        ``(files, overrides)``: file paths in order, and ``{key: raw string value}``.

    Raises:
        ConfigError: an option without ``=`` (``--key value`` or a bare ``--flag``) or a key that is not a valid
            identifier.
    """
    files: list[str] = []
    overrides: dict[str, str] = {}
    for arg in argv:
        if not arg.startswith("-"):
            files.append(arg)
            continue
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"command-line argument {arg!r} must have the form --key=value")
        key, value = arg[2:].split("=", 1)
        if not key.isidentifier():
            raise ConfigError(f"command-line argument {arg!r}: {key!r} is not a valid config key name")
        overrides[key] = value
    return files, overrides


def merge_config(
    files: Iterable[str | pathlib.Path] = (),
    overrides: Mapping[str, Any] | None = None,
    *,
    base: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``base``, then every file in order, then the overrides (later sources win)."""
    merged: dict[str, Any] = dict(base or {})
    for f in files:
        merged.update(load_config_file(f))
    merged.update(overrides or {})
    return merged


def load_config(argv: Sequence[str], *, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``parse_overrides`` + ``merge_config``: the merged, not yet validated config of a command line."""
    files, overrides = parse_overrides(argv)
    return merge_config(files, overrides, base=base)


# ----------------------------------------------------------------------------------------------------------
# The one value coercer: a config file gives Python/YAML objects, the command line gives strings; both
# spellings of a value give the same typed value.
# ----------------------------------------------------------------------------------------------------------

#: The kinds a config key can declare: the modifier table's types (``KeySpec.type``) plus ``list`` (any YAML/JSON
#: list, such as the temporal task's ``criterion``); each may end in ``|None``.
KINDS = ("bool", "int", "float", "str", "list[int]", "list")

def coerce(
    key: str,
    value: Any,
    kind: str,
    *,
    choices: tuple = (),
    check: Callable[[Any], bool] | None = None,
    constraint: str = "",
) -> Any:
    """Type ``value`` by ``key``'s declared ``kind`` and check it: the coercer of every trainer and modifier key.

    Accepted spellings (config-file object / command-line string):

    ========== ===================================================== ==========================================
    kind       from a file                                           from the command line
    ========== ===================================================== ==========================================
    bool       ``True``, ``False``, ``1``, ``0``                     ``true/false/1/0`` in any case
    int        ``3``, ``3.0`` (an integral float)                    ``"3"``
    float      ``2``, ``2.5`` (not NaN)                              ``"2"``, ``"2.5"``, ``"1e-3"``
    str        any string (surrounding spaces dropped)               the same
    list[int]  ``[0, 1, 2]``, ``(0, 1)``, ``5`` (duplicates dropped)  ``"0,1,2"``, ``"[0, 1, 2]"``, ``"5"``, ``""``
    list       a list                                                its YAML/JSON text, ``"[{name: a}]"``
    X|None     ``None`` or an X                                      ``None``, ``none``, ``null``, ``""`` or an X
    ========== ===================================================== ==========================================

    The conversions are ``losskit.modifiers.config_keys.coerce_value``'s, so the library's dict API
    (``parse_modifier_config``) and this edge parse a value alike; this adds the choices and range check of a
    trainer key.

    Args:
        key: the key, for error messages.
        value: the raw value.
        kind: one of ``KINDS``, optionally followed by ``|None``.
        choices: allowed values (empty: any).
        check: predicate on the typed value (not called for None); ``False`` raises quoting ``constraint``.
        constraint: the range ``check`` enforces, as text (``"> 0"``).

    Raises:
        ConfigError: ``"<key> must be <expected>, got <value>"``.
    """
    base = kind.removesuffix("|None")
    if base not in KINDS:  # a programming error in a key declaration
        raise TypeError(f"config key {key!r} declares unknown kind {kind!r}; expected one of {KINDS} (or X|None)")
    out = coerce_value(key, value, KeySpec(key, kind, None, ""))
    if out is None:
        return None
    if choices and out not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    if check is not None and not check(out):
        raise ConfigError(f"{key} must be {constraint}, got {value!r}")
    return out
