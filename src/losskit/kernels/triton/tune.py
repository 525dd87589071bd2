"""Sweep launch configurations of the Triton kernels on a CUDA device and print the timings.

``python -m losskit.kernels.triton.tune [--shapes 8192x128256,16384x32000] [--dtype bfloat16] [--budget-s 150]``

For each shape it times, per candidate ``LaunchConfig``, the three streaming kernels on the benchmark's
all-features inputs (``randn·2`` logits, every 7th target ignored, ε = 0.1 excluding the last 256 ids, λ = 1e-4,
per-token weights): ``_fused_loss_kernel`` (eager: 2 reads + 1 write of the logits), ``_token_stats_kernel``
(1 read) and ``_token_grad_kernel`` with the pipeline's upstream fields (nll, support gap, H(q): 1 read + 1 write).
Medians from ``triton.testing.do_bench``; the effective bandwidth counts the bytes each kernel must move. No
autotuning happens at call time: the winners go into ``launch.default_config`` by hand.
"""

from __future__ import annotations

import argparse
import time

import torch
import triton
import triton.testing

from losskit.kernels.prepare import prepare, prepare_smoothing
from losskit.kernels.triton import launch
from losskit.kernels.triton.launch import LaunchConfig

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def candidates(num_classes: int) -> list[LaunchConfig]:
    """Configs worth timing for V: the table's entry first, then tiles of 1–8k elements at 4–32 warps whose
    pass-1 state (6 arrays) fits the register file (≤ 16 elements per thread per array)."""
    first = launch.default_config(num_classes, torch.bfloat16, "cuda")
    out = [first]
    pow2 = triton.next_power_of_2(num_classes)
    blocks = [b for b in (1024, 2048, 4096, 8192) if b <= max(pow2, 1024)]
    for block in blocks:
        rows_options = [1] if block >= pow2 or num_classes > 4096 else [1, 2, 4, 8]
        for rows in rows_options:
            for warps in (4, 8, 16, 32):
                per_thread = block * rows // (32 * warps)
                if not 4 <= per_thread <= 16:
                    continue
                for stages in (2, 3):
                    cfg = LaunchConfig(block_v=block, rows=rows, num_warps=warps, num_stages=stages)
                    if cfg not in out:
                        out.append(cfg)
    # most promising first (4096-wide tiles, more warps), so a time budget cuts the long shots
    out[1:] = sorted(out[1:], key=lambda c: (abs(c.block_v.bit_length() - 13), -c.num_warps, c.num_stages))
    return out


def _inputs(n: int, v: int, dtype: torch.dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(n, v, generator=g, device="cuda") * 2).to(dtype)
    t = torch.randint(0, v, (n,), generator=g, device="cuda")
    t[::7] = -100
    w = torch.rand(n, generator=g, device="cuda") + 0.5
    prep = prepare(x, t, ignore_index=-100, mask=None, smoothing_exclude=list(range(v - 256, v)), token_weight=w)
    sm = prepare_smoothing(prep, 0.1, "torch", None, x.device)
    return x, w, prep, sm


def time_config(x, w, prep, sm, cfg: LaunchConfig) -> dict[str, float]:
    """Median ms of the three kernels for one config (compiles on first use)."""
    excl = launch.exclusion_bitmask(prep.support.ids, prep.num_classes, x.device)
    out = torch.empty_like(x)
    norm = prep.valid.sum().float()
    k = prep.num_support

    def eager():
        launch.launch_fused_loss(x, out, prep.target, prep.valid, prep.out_of_range, excl, k, w, 1.0, None, norm,
                                 sm.eps_t, sm.eps_over_kt, sm.target_in_at, 1e-4, cfg)

    def stats():
        return launch.launch_token_stats(x, prep.target, prep.valid, prep.out_of_range, excl, k, True, cfg)

    consts = stats()[11]
    ones = torch.ones(x.shape[0], device=x.device)
    grads = [None, None, ones, None, None, None, ones, ones]

    def grad():
        launch.launch_token_grad(x, out, prep.target, prep.valid, excl, k, consts, grads, cfg)

    return {name: triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
            for name, fn in (("eager", eager), ("stats", stats), ("grad", grad))}


def main(argv: list[str] | None = None) -> int:
    """Run the sweep; prints one line per config and the best per kernel and shape."""
    parser = argparse.ArgumentParser(prog="python -m losskit.kernels.triton.tune", description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="8192x128256,16384x32000", help="comma-separated NxV")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES))
    parser.add_argument("--budget-s", type=float, default=150.0, help="stop starting new configs after this")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune: needs a CUDA device")
        return 2
    dtype = _DTYPES[args.dtype]
    start = time.monotonic()
    for part in args.shapes.split(","):
        n, v = (int(s) for s in part.lower().split("x"))
        x, w, prep, sm = _inputs(n, v, dtype)
        nbytes = x.numel() * x.element_size()
        print(f"N={n} V={v} {args.dtype}: logits {nbytes / 2**30:.2f} GiB")
        best: dict[str, tuple[float, LaunchConfig]] = {}
        for cfg in candidates(v):
            if time.monotonic() - start > args.budget_s:
                print("  budget reached; remaining configs not timed")
                break
            try:
                ms = time_config(x, w, prep, sm, cfg)
            except Exception as exc:  # noqa: BLE001 - a config that fails to compile or launch is a result
                print(f"  {cfg}: failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
                continue
            # bytes each kernel must move: eager 2R+1W (second read hopefully from L2), stats 1R, grad 1R+1W
            bw = {"eager": 3 * nbytes / ms["eager"], "stats": nbytes / ms["stats"], "grad": 2 * nbytes / ms["grad"]}
            print(f"  block_v={cfg.block_v:5d} rows={cfg.rows:2d} warps={cfg.num_warps:2d} stages={cfg.num_stages}: "
                  + "  ".join(f"{k} {ms[k]:.3f} ms ({bw[k] / 1e9:.2f} TB/s)" for k in ms))
            for k, value in ms.items():
                if k not in best or value < best[k][0]:
                    best[k] = (value, cfg)
        for k, (value, cfg) in best.items():
            print(f"  best {k}: {value:.3f} ms with {cfg}")
        del x, w, prep, sm
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
