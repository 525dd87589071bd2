"""Benchmarks of the training service (``losskit serve``), on loopback with the built-in ``losskit/tiny-lm``.

1. **Overhead.** One ``forward_backward`` of a batch of 8 rows x 128 tokens (cross-entropy), through HTTP and
   ``losskit.client``, against the same call in-process: the device work alone (run on the server's device
   worker; the target, <= 10%, is judged against it) and the whole request through the engine from Python (batch,
   loss check, queue, future: what HTTP adds beyond it is HTTP, JSON and the event loop). All three run on one
   in-process server, interleaved, after a warm-up; an overhead is the ratio of the medians minus 1.
2. **Load.** ``--clients`` concurrent clients (8), each with its own session and model, run ``--steps`` (30) steps of
   ``forward_backward`` + ``optim_step`` against a ``losskit serve`` subprocess. Reported: requests per second,
   p50/p99 latency per request, and lost or crossed results: every model is then trained again alone, in
   sequence, on the same server, and both runs' adapters are saved and compared byte for byte from the checkpoint
   files (0 expected).

The machine is shared and noisy: the numbers are one run's measurements, tagged with the load average.
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

from losskit.bench.env import add_csv_option, csv_path, describe
from losskit.bench.report import text_table

OVERHEAD_TARGET = 0.10
CSV_COLUMNS = ("date", "git_commit", "device", "torch", "load_avg_1min", "metric", "value", "unit", "detail")


def _rows(n: int, length: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(length)] for _ in range(n)]


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k]


def measure_overhead(reps: int, state_dir: str, cpu_threads: int = 0) -> dict:
    """Median ms of the HTTP call and of the in-process call, interleaved, and the overhead ratio."""
    import torch

    from losskit.client import TinkerClient
    from losskit.service.batch import build_batch
    from losskit.service.server import BackgroundServer
    from losskit.service.settings import make_settings

    server = BackgroundServer(make_settings(port=0, state_dir=state_dir, cpu_threads=cpu_threads)).start()
    try:
        client = TinkerClient(server.url)
        model = client.create_model("bench", rank=8, seed=0)
        rows = _rows(8, 129, 0)  # shifted by the server: 8 x 128 tokens
        service = server.service
        state = server.engine.find_model(f"{client.session_id}:native:{model}")
        # The engine path numbers its own requests, so it drives a second, identical model.
        other = server.engine.find_model(f"{client.session_id}:native:{client.create_model('engine', rank=8, seed=0)}")
        session = server.engine.session(client.session_id, "anonymous")  # no API key: the anonymous owner
        loss = service.resolve_loss(session, "cross_entropy", {}, {"target_tokens", "weights"}, state.info)
        batch = build_batch(rows, None, state.info, needs_target_tokens=True, max_rows=64, max_len=1024)

        def in_process():
            def run():
                gen = service.backend.forward_backward(state.handle, loss, batch, forward_only=False)
                try:
                    while True:
                        next(gen)
                except StopIteration as stop:
                    return stop.value

            return server.engine.call_on_worker(run)

        def through_engine():
            # The request as a Python caller of this process would make it: batch, loss, queue, future.
            from losskit.service.native import body_hash, dumps

            b = build_batch(rows, None, state.info, needs_target_tokens=True, max_rows=64, max_len=1024)
            resolved = service.resolve_loss(session, "cross_entropy", {}, set(b.inputs), state.info)
            fut = service.forward_backward(session, other.model_id, None, body_hash({"n": next(counter)}),
                                           resolved, b, forward_only=False,
                                           encode=lambda v: (dumps(v, True), "application/json"))
            server.engine.futures.wait_sync(fut, 120)

        def over_http():
            return client.forward_backward(model, rows, "cross_entropy")

        counter = iter(range(1 << 30))
        timings: dict[str, list[float]] = {"http": [], "engine": [], "device": []}
        calls = {"http": over_http, "engine": through_engine, "device": in_process}
        for _ in range(3):  # warm-up
            for fn in calls.values():
                fn()
        for _ in range(reps):
            for name, fn in calls.items():
                t = time.perf_counter()
                fn()
                timings[name].append((time.perf_counter() - t) * 1000)
        client.close()
        med = {k: statistics.median(v) for k, v in timings.items()}
        return {"http_ms": med["http"], "engine_ms": med["engine"], "inprocess_ms": med["device"],
                "overhead": med["http"] / med["device"] - 1, "overhead_vs_engine": med["http"] / med["engine"] - 1,
                "reps": reps, "threads": torch.get_num_threads()}
    finally:
        server.stop()


def _start_subprocess(state_dir: str, cpu_threads: int = 0) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "losskit", "serve", "--port", "0", "--state-dir", state_dir, "--no-tinker-surface",
           "--log-level", "warning", "--cpu-threads", str(cpu_threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "listening on" in line:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # drain the banner
            return proc, line.split("listening on ")[1].strip()
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("losskit serve did not start")


def _train(url: str, alias: str, rows, steps: int, latencies: list[float], paths: dict) -> None:
    from losskit.client import TinkerClient

    with TinkerClient(url) as client:
        model = client.create_model(alias, rank=8, seed=1)
        for _ in range(steps):
            for call in (lambda: client.forward_backward(model, rows, "cross_entropy"),
                         lambda: client.optim_step(model, learning_rate=1e-3)):
                t = time.perf_counter()
                call()
                latencies.append((time.perf_counter() - t) * 1000)
        paths[alias] = client.save_state(model, "final")


def _adapter_bytes(state_dir: str, path: str) -> bytes:
    from losskit.service.checkpoints import StateDir, parse_path

    files, _ = StateDir(state_dir).read(parse_path(path))
    return files["adapter_model.safetensors"]


def measure_load(clients: int, steps: int, state_dir: str, cpu_threads: int = 0) -> dict:
    """Concurrent clients against a server subprocess; then each model alone, and the adapters compared."""
    proc, url = _start_subprocess(state_dir, cpu_threads)
    try:
        data = {f"c{i}": _rows(4, 65, 100 + i) for i in range(clients)}
        latencies: list[float] = []
        paths: dict[str, str] = {}
        threads = [threading.Thread(target=_train, args=(url, alias, rows, steps, latencies, paths))
                   for alias, rows in data.items()]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
        requests = len(latencies)
        alone: dict[str, str] = {}
        for alias, rows in data.items():
            _train(url, alias, rows, steps, [], alone)
        lost = clients - len(paths)
        crossed = sum(1 for a in data if a in paths and a in alone
                      and _adapter_bytes(state_dir, paths[a]) != _adapter_bytes(state_dir, alone[a]))
        return {"requests": requests, "wall_s": wall, "requests_per_s": requests / wall,
                "p50_ms": _percentile(latencies, 0.5), "p99_ms": _percentile(latencies, 0.99),
                "lost": lost, "crossed": crossed, "clients": clients, "steps": steps}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: Sequence[str], prog: str = "bench_service.py") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20, help="interleaved repetitions of the overhead pair")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients of the load test")
    parser.add_argument("--steps", type=int, default=30, help="forward_backward + optim_step steps per client")
    parser.add_argument("--skip-load", action="store_true", help="only the overhead measurement")
    parser.add_argument("--cpu-threads", type=int, default=0,
                        help="the server's torch threads (0: physical cores; 1 helps on a machine shared with other "
                        "CPU-bound jobs)")
    add_csv_option(parser, "service")
    args = parser.parse_args(list(argv))
    import torch

    env = describe(torch.device("cpu"))
    load_avg = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        over = measure_overhead(args.reps, os.path.join(tmp, "overhead"), args.cpu_threads)
        load = None if args.skip_load else measure_load(args.clients, args.steps, os.path.join(tmp, "load"),
                                                        args.cpu_threads)
    rows = [
        ("forward_backward over HTTP (median)", f"{over['http_ms']:.1f}", "ms", f"8x128 tokens, {over['reps']} reps"),
        ("forward_backward in-process (median)", f"{over['inprocess_ms']:.1f}", "ms", "device work on the worker"),
        ("forward_backward through the engine (median)", f"{over['engine_ms']:.1f}", "ms",
         "in-process Python call: batch, loss, queue, future"),
        ("HTTP overhead vs device work", f"{100 * over['overhead']:.1f}", "%",
         f"target <= {100 * OVERHEAD_TARGET:.0f}%: {'met' if over['overhead'] <= OVERHEAD_TARGET else 'missed'}"),
        ("HTTP overhead vs the engine call", f"{100 * over['overhead_vs_engine']:.1f}", "%",
         "HTTP, JSON and the event loop only"),
    ]
    if load is not None:
        rows += [
            ("load: requests per second", f"{load['requests_per_s']:.1f}", "req/s",
             f"{load['clients']} clients x {load['steps']} steps x 2 requests in {load['wall_s']:.1f} s"),
            ("load: latency p50", f"{load['p50_ms']:.1f}", "ms", "per request"),
            ("load: latency p99", f"{load['p99_ms']:.1f}", "ms", "per request"),
            ("load: lost results", str(load["lost"]), "models", "models without a final checkpoint"),
            ("load: crossed results", str(load["crossed"]), "models", "adapter differs from training alone"),
        ]
    print(f"{env.device}, torch {env.torch}, commit {env.git_commit}, {env.date}, 1-min load average {load_avg:.2f}, "
          f"server threads {args.cpu_threads or 'physical cores'}")
    print(text_table(("metric", "value", "unit", "detail"), rows))
    path = csv_path(args, "service")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for metric, value, unit, detail in rows:
            writer.writerow({"date": env.date, "git_commit": env.git_commit, "device": env.device, "torch": env.torch,
                             "load_avg_1min": f"{load_avg:.2f}", "metric": metric, "value": value, "unit": unit,
                             "detail": detail})
    print(f"wrote {path}")
    return 0 if load is None or (load["lost"] == 0 and load["crossed"] == 0) else 1
