"""Running the server: one uvicorn process (the state lives in memory), on a pre-bound socket so that ``--port 0``
can print the port it got.

``serve(settings)`` runs in the foreground (``losskit serve``). ``BackgroundServer`` runs the same server in a
thread of the current process (tests, benchmarks, notebooks)::

    with BackgroundServer(make_settings(port=0)) as server:
        client = TinkerClient(server.url)
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import socket
import sys
import threading
import time
from typing import Self

from losskit.service.settings import ServeSettings

log = logging.getLogger("losskit.serve")


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only for such sockets, and without
    # it a keep-alive reply waits ~40 ms for a delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def url_of(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        try:
            fields = json.loads(message) if message.startswith("{") else {"message": message}
        except ValueError:
            fields = {"message": message}
        return json.dumps({"time": round(record.created, 3), "level": record.levelname.lower(),
                           "logger": record.name, **fields})


def configure_logging(settings: ServeSettings) -> None:
    """One handler on stderr for the ``losskit.serve`` loggers (plain text or one JSON object per line)."""
    logger = logging.getLogger("losskit.serve")
    logger.setLevel(settings.log_level.upper())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if settings.log_json else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.handlers[:] = [handler]
    logger.propagate = False


def _uvicorn_server(app, settings: ServeSettings):
    import uvicorn

    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", log_level=settings.log_level,
                            timeout_keep_alive=30, timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def prepare_process(settings: ServeSettings) -> None:
    """Process-wide settings: offline Hugging Face, torch threads, deterministic algorithms."""
    from losskit.service.models import set_offline_environment

    set_offline_environment()
    import torch

    from losskit.service.settings import physical_cores

    torch.set_num_threads(settings.cpu_threads or physical_cores())
    if settings.deterministic:
        torch.use_deterministic_algorithms(True)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is part of the serve extra
        pass


class BackgroundServer:
    """The server in a thread of this process, on ``settings.host`` and a free port when ``settings.port`` is 0."""

    def __init__(self, settings: ServeSettings, *, warm_up: bool = True) -> None:
        self.settings = settings
        self.warm_up = warm_up
        self.service = None
        self.app = None
        self._server = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        return url_of(self.settings.host, self.port)

    @property
    def engine(self):
        return self.service.engine

    def start(self) -> Self:
        from losskit.service.app import create_app
        from losskit.service.operations import Service

        prepare_process(self.settings)
        self.service = Service(self.settings)
        self.service.start(warm_up=self.warm_up)
        self.app = create_app(self.service)
        sock = bind_socket(self.settings.host, self.settings.port)
        self.port = sock.getsockname()[1]
        self._server = _uvicorn_server(self.app, self.settings)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name="losskit-http")
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            if self._thread is not None:
                self._thread.join(10)
        if self.service is not None:
            self.service.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(settings: ServeSettings, *, banner) -> int:
    """Run the server in the foreground until SIGINT/SIGTERM. ``banner(url)`` prints the startup banner."""
    from losskit.service.app import create_app
    from losskit.service.operations import Service

    prepare_process(settings)
    try:
        sock = bind_socket(settings.host, settings.port)
    except OSError as exc:
        print(f"losskit serve: error: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr)
        return 1
    service = Service(settings)
    service.start()
    app = create_app(service)
    banner(url_of(settings.host, sock.getsockname()[1]))
    server = _uvicorn_server(app, settings)
    # Our own SIGINT/SIGTERM handling: a graceful stop, then exit 0 (uvicorn's handlers re-raise the signal after
    # shutting down, which would end the process with the signal's status before the engine is stopped).
    server.capture_signals = contextlib.nullcontext
    stop = lambda *_: setattr(server, "should_exit", True)
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        service.stop()
    return 0
