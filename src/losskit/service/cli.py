"""``losskit serve``: parse the flags, refuse unsafe configurations, check the SDK, print the banner, serve.

The role of the seed's ``python src/app.py`` is played by ``losskit serve``. Exit codes: 0 after a clean stop (or
``--prepare-only``), 1 when the port cannot be bound, 2 for a configuration error: a bad flag, a non-loopback
``--host`` without an API key (unless ``--allow-unauthenticated``), ``--workers`` above 1, or (with
``--tinker-version-check strict``) a ``tinker`` SDK outside the supported range or with a different wire schema.
"""

from __future__ import annotations

import logging
import sys

from losskit import __version__
from losskit.contract import ConfigError
from losskit.service.settings import ServeSettings, parse_cli

log = logging.getLogger("losskit.serve")

THREAT_WARNING = (
    "WARNING: --allow-pickled-code is on. Any holder of an API key can upload a pickled function that this server "
    "runs as ordinary Python code: it can read and write files, environment variables and credentials, other users' "
    "models and checkpoints, open network connections and start processes, with this server's privileges. Give keys "
    "only to people you would give a shell on this machine."
)


def _error(message: str) -> int:
    print(f"losskit serve: error: {message}", file=sys.stderr)
    return 2


def check_configuration(settings: ServeSettings) -> str | None:
    """The reason to refuse starting, or None."""
    if not settings.loopback and not settings.api_keys and not settings.allow_unauthenticated:
        return (f"--host {settings.host} is not a loopback address and no API key is configured: anyone who can reach "
                "this machine could train and sample models. Pass --api-key KEY (or LOSSKIT_API_KEY), or "
                "--allow-unauthenticated to accept that")
    if settings.allow_pickled_code and not settings.api_keys:
        log.warning("--allow-pickled-code has no effect without an API key: pickled uploads stay disabled")
    return None


def banner(settings: ServeSettings, url: str, sdk: str, device: str) -> str:
    parts = [("native (/v1, /list_loss_functions, /register_custom_loss)", settings.native_surface),
             ("tinker (/api/v1, the official tinker SDK)", settings.tinker_surface)]
    surfaces = ", ".join(name for name, on in parts if on) or "none"
    auth = f"{len(settings.api_keys)} API key(s)" if settings.api_keys else "none (no API key configured)"
    pickled = settings.allow_pickled_code and bool(settings.api_keys)
    lines = [
        f"losskit serve {__version__} listening on {url}",
        f"  surfaces:   {surfaces}",
        f"  tinker SDK: {sdk}",
        f"  base model: {settings.default_base_model} (default; {device})",
        f"  auth:       {auth}",
        "  pickled code: " + ("ENABLED (unsafe)" if pickled else "disabled; custom losses are allowlisted torch.fx "
                                                                 "graphs that the server never evaluates"),
        f"  state dir:  {settings.resolved_state_dir}",
    ]
    if pickled:
        lines.append(THREAT_WARNING)
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    try:
        settings, _ = parse_cli(argv)
    except ConfigError as exc:
        return _error(str(exc))
    refusal = check_configuration(settings)
    if refusal:
        return _error(refusal)
    from losskit.service.server import configure_logging, prepare_process

    configure_logging(settings)
    for key in settings.api_keys:
        if not key.startswith("tml-"):
            log.warning("an API key (%s...) does not start with tml-: the Tinker SDK refuses such keys locally",
                        key[:3])
    sdk = "not checked (--no-tinker-surface)"
    if settings.tinker_surface:
        from losskit.service.sdk_check import check_sdk

        result = check_sdk()
        if not result.ok:
            if settings.tinker_version_check == "strict":
                return _error(f"{result.problem} (use --tinker-version-check warn to start anyway, or "
                              "--no-tinker-surface)")
            log.warning("%s; starting anyway (--tinker-version-check warn)", result.problem)
            sdk = f"MISMATCH ({result.problem})"
        else:
            sdk = f"tinker {result.version} (schema checked)"
    if settings.prepare_only:
        prepare_process(settings)
        from losskit.service.models import materialize_tiny_lm

        path = materialize_tiny_lm()
        print(f"losskit/tiny-lm is ready in the Hugging Face cache: {path}")
        return 0
    from losskit.service.server import serve

    def show(url: str) -> None:
        import torch

        device = settings.device if settings.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        print(banner(settings, url, sdk, device), flush=True)

    return serve(settings, banner=show)
