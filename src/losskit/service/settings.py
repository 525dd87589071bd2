"""The flags of ``losskit serve``: one table, read from the command line, ``LOSSKIT_<FLAG>`` or a YAML file.

Precedence, highest first: the command line, the environment (``LOSSKIT_PORT=9000``; lists are comma-separated),
the ``--config`` file (keys are the flag names with underscores), the defaults. Every value is validated once here
and the server receives one frozen ``ServeSettings``.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from losskit.contract import ConfigError

TINY_LM = "losskit/tiny-lm"


def default_state_dir() -> str:
    """``losskit`` under the XDG data directory (``$XDG_DATA_HOME``, else ``~/.local/share``)."""
    base = os.environ.get("XDG_DATA_HOME") or str(pathlib.Path.home() / ".local" / "share")
    return str(pathlib.Path(base) / "losskit")


def physical_cores() -> int:
    """Physical CPU cores: distinct (physical id, core id) pairs of /proc/cpuinfo, else the logical count."""
    logical = os.cpu_count() or 1
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return logical
    pairs, current = set(), {}
    for line in [*text.splitlines(), ""]:
        key, _, value = (p.strip() for p in line.partition(":"))
        if key in ("physical id", "core id"):
            current[key] = value
        elif not line.strip() and current:
            pairs.add((current.get("physical id"), current.get("core id")))
            current = {}
    return len(pairs) if pairs else logical


@dataclasses.dataclass(frozen=True)
class Flag:
    """One flag: ``kind`` is str, int, float, bool (``--x`` / ``--no-x``), list (repeatable) or choice."""

    name: str
    kind: str
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    metavar: str | None = None


FLAGS: tuple[Flag, ...] = (
    Flag("host", "str", "127.0.0.1", "bind address; a non-loopback address needs an API key "
         "(or --allow-unauthenticated)"),
    Flag("port", "int", 8000, "port; 0 picks a free port and prints it", minimum=0),
    Flag("api_key", "list", (), "an accepted API key (repeatable); also LOSSKIT_API_KEY, comma-separated. Keys for "
         "Tinker SDK users must start with tml-", metavar="KEY"),
    Flag("api_keys_file", "str", "", "a file with one accepted API key per line", metavar="PATH"),
    Flag("allow_unauthenticated", "bool", False, "permit a non-loopback bind without API keys"),
    Flag("allow_pickled_code", "bool", False, "accept cloudpickle loss uploads from key holders: this runs "
         "arbitrary code on the server (an API key is also required)"),
    Flag("state_dir", "str", "", "checkpoints and staging (default: losskit under the XDG data directory; also "
         "LOSSKIT_STATE_DIR)", metavar="DIR"),
    Flag("model", "list", (), "serve a local Hugging Face causal-LM directory under NAME (repeatable)",
         metavar="NAME=DIR"),
    Flag("default_base_model", "str", TINY_LM, "the base model of models created without one"),
    Flag("prepare_only", "bool", False, "materialise the built-in tiny model into the HF cache and exit"),
    Flag("device", "str", "auto", "torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:N"),
    Flag("dtype", "choice", "auto", "dtype of the frozen base weights (auto: bfloat16 on CUDA, float32 on CPU); "
         "adapters, optimizer state and logprobs are float32", choices=("auto", "float32", "bfloat16", "float16")),
    Flag("cpu_threads", "int", 0, "torch CPU threads (0: the number of physical cores)", minimum=0),
    Flag("deterministic", "bool", False, "use deterministic torch algorithms"),
    Flag("native_surface", "bool", True, "serve the native /v1 API (and the seed's /list_loss_functions, "
         "/register_custom_loss)"),
    Flag("tinker_surface", "bool", True, "serve the official Tinker SDK's wire protocol (/api/v1), after checking "
         "the installed tinker package (its schema source) at startup; --no-tinker-surface serves neither"),
    Flag("tinker_version_check", "choice", "strict", "on an SDK version or schema mismatch: strict exits with code 2, "
         "warn logs and starts", choices=("strict", "warn")),
    Flag("tinker_custom_loss", "choice", "server", "where the Tinker SDK runs losses made with create_custom_loss: "
         "server (uploaded as checked torch.fx graphs and run here) or client (the SDK runs them itself)",
         choices=("server", "client")),
    Flag("telemetry_log", "str", "", "append the Tinker SDK's telemetry batches to this file as JSON lines "
         "(default: accepted and discarded)", metavar="PATH"),
    Flag("auto_create", "bool", True, "native: a forward_backward on an unknown model alias creates it on the default "
         "base model (--no-auto-create: 404 instead)"),
    Flag("max_request_mb", "float", 64.0, "largest request body (MiB)", minimum=0.001),
    Flag("max_json_mb", "float", 8.0, "largest JSON request body (MiB)", minimum=0.001),
    Flag("max_datums_per_request", "int", 1024, "most rows (datums) in one request", minimum=1),
    Flag("max_seq_len", "int", 0, "longest row in tokens (0: the model's context length)", minimum=0),
    Flag("max_tokens_per_step", "int", 16384, "padded tokens in one micro-batch: the fairness unit of the device "
         "worker", minimum=1),
    Flag("max_pending_per_model", "int", 256, "how far ahead of the next runnable seq_id a request may be (then 429)",
         minimum=1),
    Flag("max_sessions", "int", 256, "open sessions", minimum=1),
    Flag("max_models", "int", 64, "training models over all sessions", minimum=1),
    Flag("decode_slice", "int", 32, "tokens decoded per fairness unit while sampling", minimum=1),
    Flag("max_sample_tokens", "int", 4096, "largest max_tokens of a sample request", minimum=1),
    Flag("max_num_samples", "int", 64, "largest num_samples of a sample request", minimum=1),
    Flag("max_graph_nodes", "int", 2000, "largest custom-loss graph (nodes)", minimum=1),
    Flag("loss_time_limit_s", "float", 60.0, "time limit of one custom-loss run (seconds)", minimum=0.001),
    Flag("long_poll_s", "float", 25.0, "how long a retrieve waits for a result before answering pending",
         minimum=0.0),
    Flag("future_ttl_s", "float", 900.0, "how long finished results are kept", minimum=0.0),
    Flag("future_store_mb", "float", 1024.0, "memory budget of finished results (MiB); oldest evicted first",
         minimum=0.001),
    Flag("seq_gap_timeout_s", "float", 300.0, "requests blocked behind a missing seq_id fail after this long",
         minimum=0.001),
    Flag("session_timeout_s", "float", 1800.0, "a session without requests for this long is closed",
         minimum=0.001),
    Flag("workers", "int", 1, "HTTP worker processes; the server's state lives in memory, so only 1 is accepted",
         minimum=1),
    Flag("log_level", "choice", "info", "log level", choices=("debug", "info", "warning", "error")),
    Flag("log_json", "bool", False, "log one JSON object per line"),
)
FLAG_BY_NAME = {f.name: f for f in FLAGS}


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """Validated settings of one server (see ``FLAGS`` for the meaning of each field)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    allow_unauthenticated: bool = False
    allow_pickled_code: bool = False
    state_dir: str = ""
    models: tuple[tuple[str, str], ...] = ()
    default_base_model: str = TINY_LM
    prepare_only: bool = False
    device: str = "auto"
    dtype: str = "auto"
    cpu_threads: int = 0
    deterministic: bool = False
    native_surface: bool = True
    tinker_surface: bool = True
    tinker_version_check: str = "strict"
    tinker_custom_loss: str = "server"
    telemetry_log: str = ""
    auto_create: bool = True
    max_request_mb: float = 64.0
    max_json_mb: float = 8.0
    max_datums_per_request: int = 1024
    max_seq_len: int = 0
    max_tokens_per_step: int = 16384
    max_pending_per_model: int = 256
    max_sessions: int = 256
    max_models: int = 64
    decode_slice: int = 32
    max_sample_tokens: int = 4096
    max_num_samples: int = 64
    max_graph_nodes: int = 2000
    loss_time_limit_s: float = 60.0
    long_poll_s: float = 25.0
    future_ttl_s: float = 900.0
    future_store_mb: float = 1024.0
    seq_gap_timeout_s: float = 300.0
    session_timeout_s: float = 1800.0
    workers: int = 1
    log_level: str = "info"
    log_json: bool = False

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    @property
    def resolved_state_dir(self) -> pathlib.Path:
        return pathlib.Path(self.state_dir or os.environ.get("LOSSKIT_STATE_DIR") or default_state_dir())


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (``localhost`` counts)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _coerce(flag: Flag, value: Any, source: str) -> Any:
    where = f"--{flag.name.replace('_', '-')} ({source})"
    if flag.kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.strip().lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{where} must be a bool (true/false), got {value!r}")
    if flag.kind == "list":
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"{where} must be a list of strings, got {value!r}")
    if flag.kind in ("int", "float"):
        try:
            number = int(value) if flag.kind == "int" else float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be {'an int' if flag.kind == 'int' else 'a number'}, got {value!r}") \
                from None
        if isinstance(value, bool) or (flag.kind == "int" and isinstance(value, float) and value != int(value)):
            raise ConfigError(f"{where} must be an int, got {value!r}")
        if flag.minimum is not None and number < flag.minimum:
            raise ConfigError(f"{where} must be >= {flag.minimum:g}, got {value!r}")
        return number
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    if flag.kind == "choice" and value not in flag.choices:
        raise ConfigError(f"{where} must be one of {', '.join(flag.choices)}, got {value!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One argparse option per flag (``--x`` / ``--no-x`` for bools); every default is None (= not given)."""
    parser.add_argument("--config", metavar="PATH", help="YAML file of flag values (keys: flag names with "
                        "underscores, e.g. max_tokens_per_step: 4096)")
    for f in FLAGS:
        opt = "--" + f.name.replace("_", "-")
        default = f.default if f.kind != "list" else "none"
        if f.name == "cpu_threads":
            default = "0 = physical cores"
        if f.kind == "bool":
            parser.add_argument(opt, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{f.help} (default: {'on' if f.default else 'off'})")
        elif f.kind == "list":
            parser.add_argument(opt, dest=f.name, action="append", default=None, metavar=f.metavar,
                                help=f"{f.help}")
        else:
            metavar = f.metavar or {"int": "N", "float": "X", "str": "VALUE"}.get(f.kind)
            parser.add_argument(opt, dest=f.name, default=None, metavar=metavar,
                                choices=f.choices or None, help=f"{f.help} (default: {default})")


def _env_values(env: Mapping[str, str]) -> dict[str, str]:
    return {f.name: env[f"LOSSKIT_{f.name.upper()}"] for f in FLAGS if f"LOSSKIT_{f.name.upper()}" in env}


def build_settings(args: argparse.Namespace | Mapping[str, Any], env: Mapping[str, str] | None = None) -> ServeSettings:
    """Merge command line (``args``), environment and ``--config`` file over the defaults, validate, freeze.

    Raises:
        ConfigError: an unknown config-file key, a bad value, ``--workers`` above 1, a malformed ``--model``, an
            unreadable ``--api-keys-file``.
    """
    from losskit.config import load_config_file

    env = os.environ if env is None else env
    given = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
    values: dict[str, Any] = {}
    config_path = given.pop("config", None)
    if config_path:
        raw = load_config_file(config_path)
        for key, value in raw.items():
            if key not in FLAG_BY_NAME:
                import difflib

                close = difflib.get_close_matches(key, list(FLAG_BY_NAME), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"config file {config_path!r}: unknown key {key!r}{hint}")
            values[key] = _coerce(FLAG_BY_NAME[key], value, f"config file {config_path}")
    for key, value in _env_values(env).items():
        values[key] = _coerce(FLAG_BY_NAME[key], value, f"LOSSKIT_{key.upper()}")
    for key, value in given.items():
        if value is None or key not in FLAG_BY_NAME:
            continue
        values[key] = _coerce(FLAG_BY_NAME[key], value, "command line")
    merged = {f.name: values.get(f.name, f.default) for f in FLAGS}
    if merged["workers"] != 1:
        raise ConfigError(f"--workers must be 1: the server keeps its state in memory (one process), got "
                          f"{merged['workers']}")
    keys = list(merged.pop("api_key"))
    keys_file = merged.pop("api_keys_file")
    if keys_file:
        try:
            keys += [line.strip() for line in pathlib.Path(keys_file).read_text().splitlines()
                     if line.strip() and not line.startswith("#")]
        except OSError as exc:
            raise ConfigError(f"--api-keys-file {keys_file!r} cannot be read: {exc}") from None
    models = []
    for spec in merged.pop("model"):
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--model must be NAME=DIR, got {spec!r}")
        models.append((name, path))
    return ServeSettings(api_keys=tuple(dict.fromkeys(keys)), models=tuple(models), **merged)


def make_settings(**overrides: Any) -> ServeSettings:
    """``ServeSettings`` from keyword values, validated like command-line values and ignoring the environment
    (for embedding the server in a program, tests and benchmarks)."""
    return build_settings(overrides, env={})


def parse_cli(argv: Sequence[str], env: Mapping[str, str] | None = None) -> tuple[ServeSettings, argparse.ArgumentParser]:
    """Parse ``losskit serve`` arguments into settings (argparse errors exit 2 as usual)."""
    parser = make_parser()
    return build_settings(parser.parse_args(list(argv)), env), parser


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="losskit serve",
        description="Start the losskit training server: Hugging Face causal LMs with LoRA adapters, built-in and "
        "custom losses, sampling and checkpoints, behind a JSON API (losskit.client) and the official Tinker SDK's "
        "wire protocol (tinker.ServiceClient). Every flag can also be set as "
        "LOSSKIT_<FLAG> (e.g. LOSSKIT_PORT=9000) or as a key of --config FILE.",
    )
    add_arguments(parser)
    return parser
