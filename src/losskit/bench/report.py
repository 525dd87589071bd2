"""Presenting benchmark rows: the CSV (columns in docs/losses.md, "Benchmarks"), the console table and the target
lines.

Pure formatting: every function takes rows (``cross_entropy.Row``), the run's ``Environment`` and the measured copy
bandwidth, and returns text or writes one file. Empty cells mean "not measured" (skipped rows, failed rows, a
column that does not apply, such as D for a loss without a hidden dimension).
"""

from __future__ import annotations

import csv
import pathlib
from collections.abc import Iterable, Sequence

from losskit.bench.cross_entropy import (
    MEMCPY_NAME,
    MEMCPY_STRETCH_RATIO,
    T5_BASELINE,
    T5_NAME,
    T5_TARGET_RATIO,
    T5P_NAME,
    T5P_TARGET_RATIO,
    Row,
)
from losskit.bench.env import Environment
from losskit.bench.memory import GIB, MIB

CSV_COLUMNS: tuple[str, ...] = (
    "date", "git_commit", "device", "capability", "torch", "triton", "cuda", "liger", "cut_cross_entropy",
    "copy_tb_s", "name", "impl", "mode", "inplace", "N", "V", "D", "dtype", "ms_median", "ms_min", "ms_max",
    "reps", "floor_ms", "x_floor", "peak_extra_gib", "max_err", "status",
)

# The chunked impl's default chunk on CPU; T5's memory bound is grad + 4·chunk + 16 MiB.
CPU_CHUNK_BYTES = 4 * MIB


def _num(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}g}"


def csv_records(env: Environment, bandwidth: float, rows: Iterable[Row]) -> list[dict[str, str]]:
    """One dict per row with exactly ``CSV_COLUMNS`` as keys (strings, empty where not measured)."""
    run_cols = {
        "date": env.date, "git_commit": env.git_commit, "device": env.device, "capability": env.capability,
        "torch": env.torch, "triton": env.triton, "cuda": env.cuda, "liger": env.liger,
        "cut_cross_entropy": env.cut_cross_entropy, "copy_tb_s": f"{bandwidth / 1e12:.6g}",
    }
    records = []
    for r in rows:
        records.append({
            **run_cols,
            "name": r.name, "impl": r.impl, "mode": r.mode, "inplace": str(r.inplace).lower(),
            "N": str(r.N), "V": str(r.V), "D": r.D, "dtype": r.dtype,
            "ms_median": _num(r.ms_median, 6), "ms_min": _num(r.ms_min, 6), "ms_max": _num(r.ms_max, 6),
            "reps": str(r.reps), "floor_ms": _num(r.floor_ms, 6), "x_floor": _num(r.x_floor, 4),
            "peak_extra_gib": "" if r.peak_extra_bytes is None else f"{r.peak_extra_bytes / GIB:.6f}",
            "max_err": _num(r.max_err, 3), "status": r.status,
        })
    return records


def write_csv(path: pathlib.Path, env: Environment, bandwidth: float, rows: Iterable[Row]) -> None:
    """Write the CSV (creating the parent directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_records(env, bandwidth, rows))


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, markdown: bool = False) -> str:
    """An aligned plain-text table, or a Markdown table with ``markdown=True``."""
    cells = [list(header)] + [[str(c) for c in r] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(r) + " |" for r in cells]
        lines.insert(1, "|" + "|".join("---" for _ in header) + "|")
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]])


def result_table(rows: Sequence[Row], *, gib: bool, markdown: bool = False) -> str:
    """The console table: name, N, V, ms, floor ms, x-floor, peak extra (MiB on CPU, GiB on GPU), status; with
    a measured ``torch.compile`` CE row at a shape, also each row's ratio to it (``x compiled CE``)."""
    unit, scale, digits = ("GiB", GIB, 2) if gib else ("MiB", MIB, 1)
    compiled = {(r.N, r.V): r.ms_median for r in rows if r.name == T5_BASELINE and r.ms_median}
    body = []
    for r in rows:
        extra = "" if r.peak_extra_bytes is None else f"{r.peak_extra_bytes / scale:.{digits}f}"
        base = compiled.get((r.N, r.V))
        ratio = [] if not compiled else ["" if base is None or r.ms_median is None else f"{r.ms_median / base:.2f}"]
        body.append([
            r.name, str(r.N), str(r.V), "" if r.ms_median is None else f"{r.ms_median:.3f}", f"{r.floor_ms:.3f}",
            "" if r.x_floor is None else f"{r.x_floor:.2f}", *ratio, extra, r.status,
        ])
    header = ["name", "N", "V", "ms", "floor ms", "x floor", *(["x compiled CE"] if compiled else []),
              f"peak extra {unit}", "status"]
    return text_table(header, body, markdown=markdown)


def header_lines(env: Environment, bandwidth: float) -> list[str]:
    """The run's identity: device, versions, torch threads, commit and the measured copy bandwidth."""
    versions = f"torch {env.torch}"
    for label, value in (("triton", env.triton), ("CUDA", env.cuda), ("liger", env.liger),
                         ("cut-cross-entropy", env.cut_cross_entropy)):
        versions += f", {label} {value or 'n/a'}"
    return [
        f"device: {env.device} [{env.capability}]",
        f"versions: {versions}",
        f"torch threads: {env.threads}",
        f"commit: {env.git_commit}   date: {env.date}",
        f"copy bandwidth: {bandwidth / 1e9:.2f} GB/s (read + write)",
    ]


def _find(rows: Sequence[Row], name: str, n: int, v: int) -> Row | None:
    return next((r for r in rows if r.name == name and r.N == n and r.V == v), None)


def _ratio_line(label: str, rows: Sequence[Row], name: str, base_name: str, target: float, n: int, v: int,
                chunk_bytes: int, memory_bound: bool) -> str | None:
    ours, base = _find(rows, name, n, v), _find(rows, base_name, n, v)
    if ours is None or base is None:
        return None
    if ours.ms_median is None or base.ms_median is None:
        return f"{label} N={n} V={v}: not measured ({name}: {ours.status}; baseline: {base.status})"
    ratio = ours.ms_median / base.ms_median
    line = (f"{label} N={n} V={v}: {ours.ms_median:.3f} ms / {base.ms_median:.3f} ms ({base_name}) = {ratio:.2f}x "
            f"(target <= {target}: {_verdict(ratio <= target)})")
    if ours.ms_min is not None and base.ms_min is not None:
        line += f"; min/min {ours.ms_min / base.ms_min:.2f}x"
    if memory_bound and ours.peak_extra_bytes is not None:
        bound = n * v * 4 + 4 * chunk_bytes + 16 * MIB
        line += (f"; extra {ours.peak_extra_bytes / MIB:.1f} MiB vs bound grad + 4 chunk + 16 MiB = "
                 f"{bound / MIB:.1f} MiB ({_verdict(ours.peak_extra_bytes <= bound)})")
    return line


def t5_lines(rows: Sequence[Row], chunk_bytes: int = CPU_CHUNK_BYTES) -> list[str]:
    """The CPU targets per shape, from interleaved medians of one run.

    T5: the default impl with label smoothing ``<= 1.0x torch.compile(F.cross_entropy(label_smoothing=0.1))``,
    extra memory ``<= grad + 4·chunk + 16 MiB``; T5p: the seed-000 pipeline (smoothing + H(q) weight) ``<= 1.2x``
    the same compiled CE; stretch: the smoothed CE ``<= 1.5x`` a memcpy of the logits.
    """
    lines = []
    for n, v in dict.fromkeys((r.N, r.V) for r in rows):
        for args in (("T5", T5_NAME, T5_BASELINE, T5_TARGET_RATIO, True),
                     ("T5p", T5P_NAME, T5_BASELINE, T5P_TARGET_RATIO, True),
                     ("T5 stretch", T5_NAME, MEMCPY_NAME, MEMCPY_STRETCH_RATIO, False)):
            label, name, base, target, mem = args
            line = _ratio_line(label, rows, name, base, target, n, v, chunk_bytes, mem)
            if line is not None:
                lines.append(line)
    return lines


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


# The GPU targets (docs/losses.md, "Benchmarks") judged from one run (H100 anchors; bf16).
_T1_SHAPE = (8192, 128256)
_T4_SHAPE = (16384, 32000)
_TRITON = "losskit triton all features ({})"
_SEED_NAIVE = "seed pipeline naive"


def gpu_target_lines(rows: Sequence[Row]) -> list[str]:
    """Targets T1, T1s, T2, T3 and T4 from the triton rows; a missing row says so.

    T1: pipeline and eager ≤ 2.66 ms at N=8192, V=128256. T1s: eager ≤ 1.82 ms. T2: peak extra ≤ grad + 64 MiB out
    of place, ≤ 64 MiB in place. T3: ≥ 20× faster and ≥ 20× less extra memory (in place) than the seed naive
    pipeline. T4: pipeline and eager ≤ 1.53 ms at N=16384, V=32000.
    """
    lines = []

    def row_of(mode: str, shape: tuple[int, int]) -> Row | None:
        r = _find(rows, _TRITON.format(mode), *shape)
        return r if r is not None and r.ms_median is not None else None

    for label, shape, limit, modes in (("T1", _T1_SHAPE, 2.66, ("pipeline", "eager")),
                                       ("T1s", _T1_SHAPE, 1.82, ("eager",)),
                                       ("T4", _T4_SHAPE, 1.53, ("pipeline", "eager"))):
        for mode in modes:
            r = row_of(mode, shape)
            name = _TRITON.format(mode)
            if r is None:
                lines.append(f"{label} {name} N={shape[0]} V={shape[1]}: not measured")
            else:
                lines.append(f"{label} {name} N={shape[0]} V={shape[1]}: {r.ms_median:.3f} ms "
                             f"(target <= {limit} ms: {_verdict(r.ms_median <= limit)})")
    n, v = _T1_SHAPE
    for mode in ("pipeline", "eager", "pipeline, in place", "eager, in place"):
        r = row_of(mode, _T1_SHAPE)
        if r is None or r.peak_extra_bytes is None:
            lines.append(f"T2 {_TRITON.format(mode)}: not measured")
            continue
        bound = (0 if r.inplace else n * v * 2) + 64 * MIB
        lines.append(f"T2 {_TRITON.format(mode)}: {r.peak_extra_bytes / GIB:.3f} GiB extra "
                     f"(target <= {bound / GIB:.3f} GiB: {_verdict(r.peak_extra_bytes <= bound)})")
    naive, ours = _find(rows, _SEED_NAIVE, n, v), row_of("eager, in place", _T1_SHAPE)
    if naive is None or naive.ms_median is None or ours is None:
        lines.append("T3 seed naive vs triton eager in place: not measured")
    else:
        speed = naive.ms_median / ours.ms_median
        line = f"T3 seed naive / triton eager in place: {speed:.1f}x faster (target >= 20: {_verdict(speed >= 20)})"
        if naive.peak_extra_bytes and ours.peak_extra_bytes is not None:
            less = naive.peak_extra_bytes / max(ours.peak_extra_bytes, 1)
            line += f"; {less:.1f}x less extra memory (target >= 20: {_verdict(less >= 20)})"
        lines.append(line)
    return lines
