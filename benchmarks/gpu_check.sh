#!/usr/bin/env bash
# The GPU checks of the triton implementation, as one prepared script for the lent GPU machine.
#
# What it runs (stages, in order; STAGES selects a subset, default "env,tests,bench"):
#   env    device, driver, versions, copy of this script's settings                      -> $OUT/env.txt
#   tests  tests/kernels/test_kernels_gpu.py (full-size parity, no host sync under
#          torch.cuda.set_sync_debug_mode("error"), CUDA graphs, bitwise determinism,
#          torch.compile, V=128256 precision, int64 offsets, the config table)          -> $OUT/tests.log
#   bench  benchmarks/bench_cross_entropy.py in GPU mode with --check, one run per shape
#          (N=8192,V=128256 and N=16384,V=32000), Liger beside it when its wheel is here -> $OUT/bench_*.csv, bench.log
#   t9     the T9 rows (gradient accumulation) at N=16384, V=128256                      -> $OUT/bench_t9.csv, bench.log
#   tune   python -m losskit.kernels.triton.tune (config sweep, time-capped)             -> $OUT/tune.log
# and always last a summary of the section 7 targets as same-run ratios                 -> $OUT/summary.txt
#
# Liger-Kernel (pure Python + Triton) is installed from a carried wheel: $LIGER_WHEEL, else .whl/liger_kernel-*.whl,
# else shared/wheels/liger_kernel-*.whl; without one its rows are marked skipped by the benchmark itself.
# Getting the wheel, on the developer machine (the .whl folder is git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl liger-kernel==0.8.5
#
# Budget: GPU_CHECK_BUDGET_S (default 570 s) caps the whole call; each stage gets at most its own cap
# (TESTS_S=300, BENCH_SHAPE_S=150 per shape, T9_S=100, TUNE_S=150) and what is left of the budget. Suggested use
# with the device tool (one machine start; the second call reuses the warm machine and its Triton cache):
#   run(command="LOSSKIT_COMMIT=<sha> bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
#   run(command="STAGES=t9,tune bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=420)
set -u
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-570}
STAGES=${STAGES:-env,tests,bench}
OUT=${OUT:-$(pwd)/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$(pwd)/src${PYTHONPATH:+:$PYTHONPATH}"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
cap() {  # cap <stage seconds>: the smaller of the stage's cap and what is left (minus 15 s for the summary)
  local l=$(( $(left) - 15 )); if [ "$1" -lt "$l" ]; then echo "$1"; else echo "$l"; fi
}
has() { case ",$STAGES," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
stamp() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*"; }

# --- Liger from a carried wheel ------------------------------------------------------------------------------
WHEEL=${LIGER_WHEEL:-}
if [ -z "$WHEEL" ]; then
  for cand in .whl/liger_kernel-*.whl shared/wheels/liger_kernel-*.whl; do
    if [ -f "$cand" ]; then WHEEL=$cand; break; fi
  done
fi
if [ -n "$WHEEL" ] && [ -f "$WHEEL" ]; then
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/liger_site "$WHEEL" \
      >/tmp/liger_install.log 2>&1; then
    export PYTHONPATH="$PYTHONPATH:/tmp/liger_site"
    LIGER_STATUS="installed from $WHEEL"
  else
    LIGER_STATUS="install of $WHEEL failed: $(tail -1 /tmp/liger_install.log)"
  fi
else
  LIGER_STATUS="no wheel carried (rows skipped)"
fi
stamp "liger: $LIGER_STATUS"

# --- env --------------------------------------------------------------------------------------------------------
if has env; then
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: ${LOSSKIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
    echo "stages: $STAGES  budget: ${BUDGET}s"
    echo "liger: $LIGER_STATUS"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
    $PY - <<'EOF' 2>&1
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
for pkg in ("triton", "numpy", "liger-kernel", "pytest", "mpmath"):
    try:
        print(pkg, md.version(pkg))
    except md.PackageNotFoundError:
        print(pkg, "not installed")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "SMs", p.multi_processor_count, "capability", f"{p.major}.{p.minor}",
          "memory GiB", round(p.total_memory / 2**30, 1), "L2 MB", round(getattr(p, "L2_cache_size", 0) / 1e6, 1))
EOF
  } >"$OUT/env.txt"
  cat "$OUT/env.txt"
fi

# --- tests ------------------------------------------------------------------------------------------------------
if has tests; then
  t=$(cap "${TESTS_S:-300}")
  stamp "tests (cap ${t}s)"
  timeout --signal=INT -k 15 "$t" $PY -m pytest -q -p no:cacheprovider -rA --durations=12 \
      tests/kernels/test_kernels_gpu.py >"$OUT/tests.log" 2>&1
  echo "pytest exit status: $?" >>"$OUT/tests.log"
  tail -40 "$OUT/tests.log"
fi

# --- bench ------------------------------------------------------------------------------------------------------
run_bench_shape() {  # run_bench_shape <NxV> <cap seconds>
  local t
  t=$(cap "$2")
  if [ "$t" -lt 30 ]; then stamp "bench $1: skipped (budget)"; return; fi
  stamp "bench $1 (cap ${t}s)"
  timeout --signal=INT -k 15 "$t" $PY benchmarks/bench_cross_entropy.py --check --shapes "$1" \
      --csv "$OUT/bench_$1.csv" >>"$OUT/bench.log" 2>&1
  echo "bench $1 exit status: $?" >>"$OUT/bench.log"
}
if has bench; then
  run_bench_shape 8192x128256 "${BENCH_SHAPE_S:-150}"
  run_bench_shape 16384x32000 "${BENCH_SHAPE_S:-150}"
  tail -60 "$OUT/bench.log"
fi

if has t9; then
  t=$(cap "${T9_S:-100}")
  stamp "t9 (cap ${t}s)"
  timeout --signal=INT -k 15 "$t" $PY - "$OUT/bench_t9.csv" >>"$OUT/bench.log" 2>&1 <<'EOF'
import pathlib, sys, torch
from losskit.bench import cross_entropy, env, report
device = torch.device("cuda")
options = cross_entropy.t9_options(device, check=True)
bandwidth = cross_entropy.measure_bandwidth(device)
print("\n".join(report.header_lines(env.describe(device), bandwidth)))
rows = cross_entropy.run_shape(options, *cross_entropy.T9_SHAPE, bandwidth)
print(report.result_table(rows, gib=True))
report.write_csv(pathlib.Path(sys.argv[1]), env.describe(device), bandwidth, rows)
EOF
  echo "t9 exit status: $?" >>"$OUT/bench.log"
  tail -15 "$OUT/bench.log"
fi

# --- tune -------------------------------------------------------------------------------------------------------
if has tune; then
  t=$(cap "${TUNE_S:-150}")
  stamp "tune (cap ${t}s)"
  timeout --signal=INT -k 15 "$t" $PY -m losskit.kernels.triton.tune --budget-s $(( t - 40 > 20 ? t - 40 : 20 )) \
      >"$OUT/tune.log" 2>&1
  echo "tune exit status: $?" >>"$OUT/tune.log"
  tail -40 "$OUT/tune.log"
fi

# --- summary: section 7 targets as same-run ratios --------------------------------------------------------------
$PY - "$OUT" >"$OUT/summary.txt" 2>&1 <<'EOF'
import csv, glob, os, re, sys
out = sys.argv[1]
rows = []
for path in sorted(glob.glob(os.path.join(out, "bench_*.csv"))):
    with open(path, newline="") as fh:
        rows += list(csv.DictReader(fh))

def find(name, n, v):
    for r in rows:
        if r["name"] == name and int(r["N"]) == n and int(r["V"]) == v and r["ms_median"]:
            return r
    return None

def ms(r):
    return float(r["ms_median"])

def verdict(ok):
    return "met" if ok else "MISSED"

lines = []
tri = "losskit triton all features ({})"
for label, (n, v) in (("T1", (8192, 128256)), ("T4", (16384, 32000))):
    liger = find("liger CE plain", n, v)
    for mode in ("pipeline", "eager", "pipeline, in place", "eager, in place"):
        r = find(tri.format(mode), n, v)
        if r is None or liger is None:
            lines.append(f"{label} {mode} N={n} V={v}: not measured ({'no liger row' if liger is None else 'no row'})")
            continue
        ratio = ms(r) / ms(liger)
        lines.append(f"{label} {mode} N={n} V={v}: {ms(r):.3f} ms = {ratio:.3f} x liger plain {ms(liger):.3f} ms "
                     f"(target <= 1.0: {verdict(ratio <= 1.0)}); {float(r['x_floor']):.2f} x floor; "
                     f"max_err {r['max_err'] or 'n/a'}")
for mode in ("eager", "eager, in place"):
    r = find(tri.format(mode), 8192, 128256)
    if r is not None:
        xf = float(r["x_floor"])
        lines.append(f"T1s {mode}: {xf:.3f} x floor {float(r['floor_ms']):.3f} ms (target <= 1.3: {verdict(xf <= 1.3)})")
n, v = 8192, 128256
for mode in ("pipeline", "eager", "pipeline, in place", "eager, in place"):
    r = find(tri.format(mode), n, v)
    if r is None or not r["peak_extra_gib"]:
        lines.append(f"T2 {mode}: not measured")
        continue
    extra = float(r["peak_extra_gib"])
    bound = (0 if r["inplace"] == "true" else n * v * 2 / 2**30) + 64 / 1024
    lines.append(f"T2 {mode}: {extra:.3f} GiB extra (target <= {bound:.3f}: {verdict(extra <= bound)})")
naive, ours = find("seed pipeline naive", n, v), find(tri.format("eager, in place"), n, v)
if naive and ours:
    speed = ms(naive) / ms(ours)
    mem = float(naive["peak_extra_gib"] or 0) / max(float(ours["peak_extra_gib"] or 0), 1 / 1024)
    lines.append(f"T3 seed naive / triton eager in place: {speed:.1f}x faster (>= 20: {verdict(speed >= 20)}), "
                 f"{mem:.1f}x less extra memory (>= 20: {verdict(mem >= 20)})")
else:
    lines.append("T3: not measured")
n, v = 16384, 128256
base, accum = find(tri.format("eager"), n, v), find(tri.format("eager, trainer path: normalizer x4"), n, v)
liger, liger4 = find("liger CE plain", n, v), find("liger CE plain (loss/4)", n, v)
up = find(tri.format("eager, upstream 0.25"), n, v)
if base and accum:
    r1 = ms(accum) / ms(base)
    line = f"T9 trainer path {ms(accum):.3f} ms = {r1:.3f} x upstream-1 {ms(base):.3f} ms (<= 1.05: {verdict(r1 <= 1.05)})"
    if liger:
        r2 = ms(accum) / ms(liger)
        line += f"; {r2:.3f} x liger plain {ms(liger):.3f} ms (<= 1.0: {verdict(r2 <= 1.0)})"
    lines.append(line)
    if up:
        lines.append(f"T9 note: loss*0.25 (rescale pass) {ms(up):.3f} ms = {ms(up) / ms(base):.3f} x upstream 1")
    if liger and liger4:
        lines.append(f"T9 note: liger loss/4 {ms(liger4):.3f} ms = {ms(liger4) / ms(liger):.3f} x liger plain")
else:
    lines.append("T9: not measured (run STAGES=t9)")
log = os.path.join(out, "tests.log")
if os.path.exists(log):
    text = open(log).read()
    last = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed)", ln)]
    lines.append(f"tests: {last[-1].strip() if last else 'no summary line (see tests.log)'}")
    sync = [ln.split()[0] for ln in text.splitlines() if "test_every_mode_fwd_bwd_without_host_sync[" in ln
            and ln.split()[0] in ("PASSED", "FAILED", "ERROR")]
    ok = sync.count("PASSED")
    lines.append(f"T8 host syncs (sync debug mode 'error', every mode): {ok} of {len(sync)} modes passed "
                 f"({verdict(ok == len(sync) == 7)})")
errors = [r for r in rows if r["status"].startswith("error")]
for r in errors:
    lines.append(f"bench error: {r['name']} N={r['N']} V={r['V']}: {r['status']}")
print("\n".join(lines))
EOF
stamp "summary"
cat "$OUT/summary.txt"
ls -la "$OUT"
