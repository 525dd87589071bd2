"""Shared fixtures of the service tests: an isolated HF cache, real in-process servers, clients, helpers.

Every server is a real ``losskit serve`` (uvicorn) on 127.0.0.1 with a free port, started in this process
(``BackgroundServer``) so that tests can also use the in-process hooks (``engine.debug_gradients``). Nothing
downloads: the built-in ``losskit/tiny-lm`` is generated into a temporary Hugging Face cache.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from losskit.service.settings import make_settings

#: The fixed batch of the end-to-end checks: 8 byte-tokenised sentences (both surfaces train on them).
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Loss functions shape what a model learns.",
    "A small language model fits on a laptop.",
    "Gradients flow backwards through the graph.",
    "Every token counts in a cross entropy sum.",
    "LoRA adapters train a few parameters only.",
    "The optimizer keeps two moments per weight.",
    "Sampling draws one token after another.",
]


#: Two models' different data for the concurrency checks (bytes; the SDK tests shift them).
DATA_A = [list(b"model A learns about foxes."), list(b"and about lazy dogs")]
DATA_B = [list(b"B trains on other text entirely!"), list(b"numbers 0123456789")]


def served_url(proc: subprocess.Popen, timeout_s: float) -> tuple[str | None, list[str]]:
    """The URL a ``losskit serve`` subprocess prints ("listening on URL"), read from its text ``stdout`` until
    ``timeout_s`` passes or the process exits; also every line read. The URL is None when none was printed."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if "listening on " in line:
            return line.split("listening on ", 1)[1].strip(), lines
    return None, lines


def check_parallel_equals_alone(train, datasets: dict[str, list], steps: int = 10) -> None:
    """Two models trained at once in two threads end bitwise equal to each trained alone, and each optimizer
    holds only its own adapter's parameters. ``train(key, data, steps, out)`` trains one fresh model and sets
    ``out[key] = {"adapter": {name: tensor}, "params": {ids}, "optimizer": {ids}}``."""
    import threading

    import torch

    parallel: dict = {}
    threads = [threading.Thread(target=train, args=(key, data, steps, parallel)) for key, data in datasets.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    a, b = datasets
    for key in datasets:
        assert parallel[key]["optimizer"] == parallel[key]["params"]  # each optimizer: its own adapter only
    assert not parallel[a]["params"] & parallel[b]["params"]
    for key, data in datasets.items():
        alone: dict = {}
        train(key, data, steps, alone)
        for name, tensor in parallel[key]["adapter"].items():
            assert torch.equal(alone[key]["adapter"][name], tensor), (key, name)


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory):
    """A fresh ``HF_HOME`` for the session, in the environment and in ``huggingface_hub.constants``.

    The constants are read from the environment once, when ``huggingface_hub`` is first imported, and whichever
    test module imports ``transformers`` first decides when that is; without the patch, a test's own
    ``from_pretrained("losskit/tiny-lm")`` would look in the user's real cache (and pass or fail by what is there).
    """
    import huggingface_hub.constants as hub

    path = tmp_path_factory.mktemp("hf_home")
    saved = {k: os.environ.get(k) for k in ("HF_HOME", "HF_HUB_CACHE")}
    os.environ["HF_HOME"] = str(path)
    os.environ.pop("HF_HUB_CACHE", None)
    patch = pytest.MonkeyPatch()
    patch.setattr(hub, "HF_HOME", str(path))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        patch.setattr(hub, name, str(path / "hub"))
    patch.setattr(hub, "HF_ASSETS_CACHE", str(path / "assets"))
    yield path
    patch.undo()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def start_server(hf_home, tmp_path_factory):
    """A factory of servers (stopped at the end of the session): ``start_server(**flags)``."""
    from losskit.service.server import BackgroundServer

    servers = []

    def start(**flags):
        flags.setdefault("port", 0)
        flags.setdefault("state_dir", str(tmp_path_factory.mktemp("state")))
        server = BackgroundServer(make_settings(**flags)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server):
    """The default server (shared by most tests; each test uses its own session)."""
    return start_server()


@pytest.fixture
def client(server):
    from losskit.client import TinkerClient

    c = TinkerClient(server.url)
    yield c
    c.close()


@pytest.fixture
def http(server):
    import httpx

    with httpx.Client(base_url=server.url, timeout=60) as h:
        yield h


def internal_id(client, alias: str) -> str:
    """The engine's id of a client's model."""
    return f"{client.session_id}:native:{alias}"
