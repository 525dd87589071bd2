"""The cross-entropy benchmark: entries, inputs, the run, and its rows.

One run measures, per shape and side by side, every entry of ``ENTRIES`` that applies to the device: torch
``F.cross_entropy`` (plain, smoothed, compiled), Liger-Kernel, the two seed pipelines and losskit's ``torch``,
``chunked`` and ``triton`` implementations in pipeline (deferred) and eager mode, out of place and in place. An
entry that cannot run here (a missing library, a GPU-only entry in CPU mode) still gets a row, whose status says
``skipped: <reason>``.

Inputs follow the anchors: logits ``randn·2`` (fp32 on CPU, bf16 on GPU), every 7th target −100, shaped
``(B, T, V)`` with ``T = min(N, 2048)`` so the seed-000 pipeline sees sequences. Per shape the run does, in order:
timing (CPU: ``reps`` rounds interleaved round-robin after one warm-up round; GPU: per entry, 3 warm-ups then
``reps`` runs between CUDA events), one memory run per entry (section 5 method, see ``memory.py``), and with
``check`` the max error on the first 64 rows against the entry's fp64 oracle.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from losskit.bench import losses, memory, timing
from losskit.contract import ConfigError

SEQ_LEN = 2048
CHECK_ROWS = 64
GPU_WARMUP = 3
CPU_WARMUP = 1
GPU_REPS = 20
CPU_REPS = 5
CPU_COPY_BYTES = 256 * memory.MIB
GPU_COPY_BYTES = 2 * memory.GIB

# (N, V) per mode.
GPU_SHAPES: tuple[tuple[int, int], ...] = ((8192, 128256), (16384, 32000))
GPU_BIG_VOCAB: tuple[int, int] = (8192, 256000)
CPU_SHAPES: tuple[tuple[int, int], ...] = ((2048, 32000), (512, 128256))
CPU_QUICK_SHAPES: tuple[tuple[int, int], ...] = ((512, 32000), (128, 128256))

# CPU targets, against the compiled peer a user would pick: T5 the default impl with label smoothing <= 1.0x
# torch.compile(F.cross_entropy(label_smoothing=0.1)); T5p the seed-000 pipeline (smoothing + H(q) weight) <= 1.2x;
# stretch: the smoothed CE within 1.5x of a memcpy of the logits.
T5_NAME = "losskit chunked label_smoothing=0.1"
T5P_NAME = "losskit chunked seed-000 pipeline (smoothing 0.1 + H(q) weight)"
T5_BASELINE = "torch.compile CE label_smoothing=0.1"
T5_TARGET_RATIO = 1.0
T5P_TARGET_RATIO = 1.2
MEMCPY_NAME = "memcpy of the logits (read + write)"
MEMCPY_STRETCH_RATIO = 1.5

# The T9 rows (gradient accumulation over 4 micro-batches).
T9_ACCUMULATION = 4
T9_NAME = "losskit triton all features (eager, trainer path: normalizer x4)"
T9_LIGER_NAME = "liger CE plain (loss/4)"


# ---------------------------------------------------------------------------------------------------------------
# Inputs.
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Problem:
    """One benchmark input: logits ``(B, T, V)``, targets ``(B, T)`` and the all-features extras.

    ``logits`` is a leaf that requires grad; out-of-place entries use it directly (its ``.grad`` is dropped before
    every run), in-place entries get a fresh clone of it before every run.
    """

    logits: torch.Tensor
    target: torch.Tensor
    token_weight: torch.Tensor
    cfg: losses.AllFeatures
    _eager: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def num_rows(self) -> int:
        return self.target.numel()

    @property
    def num_classes(self) -> int:
        return self.logits.shape[-1]

    def eager_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The up-front weights of eager mode (coefficients, denominator), computed once outside any timing."""
        if self._eager is None:
            with torch.no_grad():
                x = self.logits.detach()
                # Row blocks keep the plain-torch H(q) (4 temporaries of the block's size) well below the input.
                rows = max(1, (64 * memory.MIB) // (4 * self.num_classes))
                flat_x, flat_t = x.reshape(-1, self.num_classes), self.target.reshape(-1)
                h = torch.cat(
                    [
                        losses.wrong_entropy_torch(flat_x[i : i + rows].float(), flat_t[i : i + rows])
                        for i in range(0, flat_x.shape[0], rows)
                    ]
                ).reshape(self.target.shape)
                self._eager = losses.eager_coefficients(
                    h, self.target != losses.IGNORE_INDEX, self.token_weight, self.cfg
                )
        return self._eager

    def head(self, rows: int) -> Problem:
        """The first ``rows`` rows as a problem of its own (one sequence), for the accuracy check."""
        v = self.num_classes
        return Problem(
            logits=self.logits.detach().reshape(-1, v)[:rows].reshape(1, -1, v).clone().requires_grad_(True),
            target=self.target.reshape(-1)[:rows].reshape(1, -1).clone(),
            token_weight=self.token_weight.reshape(-1)[:rows].reshape(1, -1).clone(),
            cfg=self.cfg,
        )


def sequence_shape(num_rows: int, seq_len: int = SEQ_LEN) -> tuple[int, int]:
    """``(B, T)`` with ``T = min(N, seq_len)`` and ``B·T = N``.

    Raises:
        ConfigError: ``N`` is not positive or not a multiple of ``T``.
    """
    if num_rows < 1:
        raise ConfigError(f"N must be >= 1, got {num_rows}")
    t = min(num_rows, seq_len)
    if num_rows % t:
        raise ConfigError(f"N must be a multiple of the sequence length {t} (N = B x {seq_len}), got N={num_rows}")
    return num_rows // t, t


def make_problem(
    num_rows: int,
    num_classes: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    cfg: losses.AllFeatures | None = None,
    seed: int = 0,
) -> Problem:
    """Anchor inputs: ``randn·2`` logits in ``dtype``, every 7th target −100, per-token weights in [0.5, 1.5)."""
    cfg = losses.AllFeatures() if cfg is None else cfg
    batch, seq = sequence_shape(num_rows)
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(batch, seq, num_classes, generator=gen, device=device, dtype=dtype).mul_(2)
    target = torch.randint(0, num_classes, (batch, seq), generator=gen, device=device)
    target.view(-1)[::7] = losses.IGNORE_INDEX
    token_weight = torch.rand(batch, seq, generator=gen, device=device, dtype=torch.float32).add_(0.5)
    return Problem(logits.requires_grad_(True), target, token_weight, cfg)


# ---------------------------------------------------------------------------------------------------------------
# Entries.
# ---------------------------------------------------------------------------------------------------------------

LossFn = Callable[[Problem, torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One benchmarked implementation.

    Attributes:
        name: the row name (anchor names where the anchors have the row).
        impl: the implementation: ``torch``, ``torch.compile``, ``liger_kernel``, ``losskit.<impl>``.
        mode: ``plain``, ``smoothed``, ``pipeline`` (deferred) or ``eager`` (weights up front).
        inplace: the entry overwrites its input (fresh clone per run, made outside the timed window).
        loss: ``loss(problem, logits) -> 0-d loss``; the timed step is ``loss(...).backward()``.
        oracle: ``oracle(problem, logits64) -> 0-d loss``, the plain-torch reference of ``loss``.
        skip: ``skip(device) -> reason | None``; a reason makes the row ``skipped: <reason>``.
        heavy: its first call compiles a graph for longer than the ``--quick`` budget allows (skipped there).

    Mode ``copy`` is the memcpy row: ``loss`` returns the copy and no gradient is taken.
    """

    name: str
    impl: str
    mode: str
    inplace: bool
    loss: LossFn
    oracle: LossFn
    skip: Callable[[torch.device], str | None]
    heavy: bool = False


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@functools.cache
def _kernels_missing() -> str | None:
    try:
        from losskit.kernels import fused_token_loss, token_stats  # noqa: F401
    except ImportError:
        return "losskit.kernels not available (fused_token_loss/token_stats)"
    return None


@functools.cache
def _triton_impl_missing() -> str | None:
    if _kernels_missing():
        return _kernels_missing()
    if not _module_available("triton") or not _module_available("losskit.kernels.triton"):
        return "triton impl not available"
    return None


def _always(_device: torch.device) -> str | None:
    return None


def _needs_kernels(_device: torch.device) -> str | None:
    return _kernels_missing()


def _triton_on_cuda(cpu_reason: str) -> Callable[[torch.device], str | None]:
    """A skip rule: the triton impl must be importable and the device CUDA (else ``cpu_reason``)."""

    def skip(device: torch.device) -> str | None:
        return _triton_impl_missing() or (None if device.type == "cuda" else f"CPU mode ({cpu_reason})")

    return skip


_needs_triton = _triton_on_cuda("the triton impl runs on CUDA")
_gpu_only = _triton_on_cuda("GPU-only entry")


def _needs_liger(device: torch.device) -> str | None:
    if not _module_available("liger_kernel"):
        return "liger_kernel not installed"
    return None if device.type == "cuda" else "CPU mode (liger_kernel needs CUDA)"


def _torch_eager_skip(device: torch.device) -> str | None:
    # The reference has no eager mode: this row is its autograd path again, with up-front
    # weights. On CPU it costs the most of any row and says nothing the pipeline row does not, so it runs on GPU.
    if _kernels_missing():
        return _kernels_missing()
    return None if device.type == "cuda" else "CPU mode (the torch impl has no eager mode; see its pipeline row)"


def _no_inplace(_device: torch.device) -> str | None:
    return _kernels_missing() or "the torch impl has no in-place mode"


def _ce(label_smoothing: float, upcast: bool) -> LossFn:
    def loss(p: Problem, x: torch.Tensor) -> torch.Tensor:
        x = x.float() if upcast else x
        return F.cross_entropy(_flat(x), p.target.reshape(-1), label_smoothing=label_smoothing)

    return loss


def _ce_oracle(label_smoothing: float) -> LossFn:
    return lambda p, x: F.cross_entropy(_flat(x), p.target.reshape(-1), label_smoothing=label_smoothing)


class FirstCall:
    """A callable that records how long its first call took (a ``torch.compile``'d function compiles there)."""

    def __init__(self, name: str, fn: Callable[..., torch.Tensor]) -> None:
        self.name, self.fn, self.first_s = name, fn, None

    def __call__(self, *args: Any) -> torch.Tensor:
        if self.first_s is not None:
            return self.fn(*args)
        start = time.perf_counter()
        out = self.fn(*args)
        self.first_s = time.perf_counter() - start
        return out


@functools.cache
def _compiled_ce() -> FirstCall:
    return FirstCall("torch.compile CE", torch.compile(lambda x, t: F.cross_entropy(x.float(), t, label_smoothing=0.1)))


@functools.cache
def _compiled_careful() -> FirstCall:
    return FirstCall("torch.compile pipeline careful", torch.compile(losses.careful_torch_pipeline))


@functools.cache
def _compiled_naive() -> FirstCall:
    return FirstCall("torch.compile seed pipeline naive", torch.compile(losses.seed_naive_pipeline))


def first_call_seconds() -> dict[str, float]:
    """What the first call of each compiled peer, and of losskit's native CPU sweeps, took in this process
    (kept off the timed reps: it happens in the warm-up round)."""
    from losskit.kernels.chunked import native

    out = {f.name: f.first_s for f in (_compiled_ce(), _compiled_careful(), _compiled_naive()) if f.first_s is not None}
    if native.build_seconds() is not None:
        out["losskit native CPU sweeps (build or cached load)"] = native.build_seconds()
    return out


@functools.cache
def _seed_pipeline(cfg: losses.AllFeatures):
    return losses.seed_pipeline(cfg)


def _seed_000(impl: str) -> LossFn:
    return lambda p, x: _seed_pipeline(p.cfg).compute(x, p.target, impl=impl).loss


def _careful_oracle(p: Problem, x: torch.Tensor) -> torch.Tensor:
    return losses.careful_torch_pipeline(x, p.target, p.cfg)


def _memcpy(p: Problem, x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone()


@functools.cache
def _liger_loss(label_smoothing: float) -> torch.nn.Module:
    from liger_kernel.transformers import LigerCrossEntropyLoss

    return LigerCrossEntropyLoss(label_smoothing=label_smoothing)


def _pipeline(impl: str, inplace: bool) -> LossFn:
    return lambda p, x: losses.losskit_pipeline(x, p.target, p.token_weight, p.cfg, impl=impl, inplace_grad=inplace)


@functools.cache
def _modifier_pipeline(cfg: losses.AllFeatures, num_classes: int):
    return losses.modifier_pipeline(cfg, num_classes)


def _modifiers(impl: str, inplace: bool) -> LossFn:
    def loss(p: Problem, x: torch.Tensor) -> torch.Tensor:
        pipeline = _modifier_pipeline(p.cfg, p.num_classes)
        return losses.losskit_modifier_pipeline(pipeline, x, p.target, p.token_weight, impl=impl, inplace_grad=inplace)

    return loss


def _modifiers_oracle(p: Problem, x: torch.Tensor) -> torch.Tensor:
    return losses.all_features_reference(x, p.target, p.token_weight, dataclasses.replace(p.cfg, z_loss=0.0))


@functools.cache
def _modifiers_missing() -> str | None:
    if _kernels_missing():
        return _kernels_missing()
    try:
        from losskit.modifiers import LossModifierPipeline  # noqa: F401
    except ImportError:
        return "losskit.modifiers.LossModifierPipeline not available"
    return None


def _eager(impl: str, inplace: bool, upstream: float = 1.0, accumulation: int = 1) -> LossFn:
    def loss(p: Problem, x: torch.Tensor) -> torch.Tensor:
        coeff, denominator = p.eager_weights()
        if accumulation != 1:
            # The trainer's gradient-accumulation path: the global normalizer (k micro-batches' worth) is passed
            # in, so the upstream stays 1 and no rescale pass runs (T9).
            denominator = denominator * accumulation
        out = losses.losskit_eager(x, p.target, coeff, denominator, p.cfg, impl=impl, inplace_grad=inplace)
        # upstream != 1 is gradient accumulation's loss/k: the eager kernel then rescales its stored gradient.
        return out * upstream if upstream != 1.0 else out

    return loss


def _losskit_ce(impl: str, label_smoothing: float, inplace: bool) -> LossFn:
    return lambda p, x: losses.losskit_cross_entropy(
        x, p.target, label_smoothing=label_smoothing, impl=impl, inplace_grad=inplace
    )


def _pipeline_oracle(p: Problem, x: torch.Tensor) -> torch.Tensor:
    return losses.all_features_reference(x, p.target, p.token_weight, p.cfg)


def _eager_oracle(upstream: float = 1.0, accumulation: int = 1) -> LossFn:
    def oracle(p: Problem, x: torch.Tensor) -> torch.Tensor:
        coeff, denominator = p.eager_weights()
        return losses.eager_reference(x, p.target, coeff, denominator * accumulation, p.cfg) * upstream

    return oracle


def _seed_oracle(p: Problem, x: torch.Tensor) -> torch.Tensor:
    return losses.seed_pipeline_reference(x, p.target, p.cfg)


def _all_features_entries(impl: str, skip, skip_inplace) -> list[Entry]:
    label = impl.split(".")[-1]

    def skip_modifiers(device: torch.device) -> str | None:
        return skip(device) or _modifiers_missing()

    return [
        Entry(f"losskit {label} modifier pipeline (seed 000, no z-loss)", impl, "pipeline", False,
              _modifiers(label, False), _modifiers_oracle, skip_modifiers),
        Entry(f"losskit {label} all features (pipeline)", impl, "pipeline", False,
              _pipeline(label, False), _pipeline_oracle, skip),
        Entry(f"losskit {label} all features (pipeline, in place)", impl, "pipeline", True,
              _pipeline(label, True), _pipeline_oracle, skip_inplace),
        Entry(f"losskit {label} all features (eager)", impl, "eager", False,
              _eager(label, False), _eager_oracle(), skip),
        Entry(f"losskit {label} all features (eager, in place)", impl, "eager", True,
              _eager(label, True), _eager_oracle(), skip_inplace),
    ]


ENTRIES: tuple[Entry, ...] = (
    Entry(MEMCPY_NAME, "torch", "copy", False, _memcpy, _memcpy, _always),
    Entry("torch F.cross_entropy (plain)", "torch", "plain", False, _ce(0.0, False), _ce_oracle(0.0), _always),
    Entry("torch F.cross_entropy label_smoothing=0.1", "torch", "smoothed", False, _ce(0.1, True), _ce_oracle(0.1),
          _always),
    Entry(T5_BASELINE, "torch.compile", "smoothed", False,
          lambda p, x: _compiled_ce()(_flat(x), p.target.reshape(-1)), _ce_oracle(0.1), _always),
    Entry("liger CE plain", "liger_kernel", "plain", True,
          lambda p, x: _liger_loss(0.0)(_flat(x), p.target.reshape(-1)), _ce_oracle(0.0), _needs_liger),
    Entry("liger CE label_smoothing=0.1", "liger_kernel", "smoothed", True,
          lambda p, x: _liger_loss(0.1)(_flat(x), p.target.reshape(-1)), _ce_oracle(0.1), _needs_liger),
    Entry("seed pipeline naive", "torch", "pipeline", False,
          lambda p, x: losses.seed_naive_pipeline(x, p.target, p.cfg), _seed_oracle, _always),
    Entry("torch pipeline careful", "torch", "pipeline", False,
          lambda p, x: losses.careful_torch_pipeline(x, p.target, p.cfg), _seed_oracle, _always),
    Entry("torch.compile pipeline careful", "torch.compile", "pipeline", False,
          lambda p, x: _compiled_careful()(x, p.target, p.cfg), _seed_oracle, _always, heavy=True),
    Entry("torch.compile seed pipeline naive", "torch.compile", "pipeline", False,
          lambda p, x: _compiled_naive()(x, p.target, p.cfg), _seed_oracle, _always, heavy=True),
    Entry(T5P_NAME, "losskit.chunked", "pipeline", False, _seed_000("chunked"), _careful_oracle, _needs_kernels),
    Entry("losskit chunked label_smoothing=0.1", "losskit.chunked", "smoothed", False,
          _losskit_ce("chunked", 0.1, False), _ce_oracle(0.1), _needs_kernels),
    Entry("losskit torch all features (pipeline)", "losskit.torch", "pipeline", False,
          _pipeline("torch", False), _pipeline_oracle, _needs_kernels),
    Entry("losskit torch all features (eager)", "losskit.torch", "eager", False,
          _eager("torch", False), _eager_oracle(), _torch_eager_skip),
    Entry("losskit torch all features (eager, in place)", "losskit.torch", "eager", True,
          _eager("torch", True), _eager_oracle(), _no_inplace),
    *_all_features_entries("losskit.chunked", _needs_kernels, _needs_kernels),
    Entry("losskit triton CE plain (in place)", "losskit.triton", "plain", True,
          _losskit_ce("triton", 0.0, True), _ce_oracle(0.0), _needs_triton),
    Entry("losskit triton CE label_smoothing=0.1 (in place)", "losskit.triton", "smoothed", True,
          _losskit_ce("triton", 0.1, True), _ce_oracle(0.1), _needs_triton),
    *_all_features_entries("losskit.triton", _needs_triton, _needs_triton),
    Entry("losskit triton all features (eager, upstream 0.25)", "losskit.triton", "eager", False,
          _eager("triton", False, 0.25), _eager_oracle(0.25), _gpu_only),
    Entry(T9_NAME, "losskit.triton", "eager", False,
          _eager("triton", False, accumulation=T9_ACCUMULATION), _eager_oracle(accumulation=T9_ACCUMULATION),
          _gpu_only),
    Entry(T9_LIGER_NAME, "liger_kernel", "plain", True,
          lambda p, x: _liger_loss(0.0)(_flat(x), p.target.reshape(-1)) / T9_ACCUMULATION,
          lambda p, x: _ce_oracle(0.0)(p, x) / T9_ACCUMULATION, _needs_liger),
)

# T9: gradient accumulation through the trainer path at N=16384, V=128256, against the same
# run's upstream-1 eager row and Liger plain (its loss/4 row shows the extra pass it pays). Run with t9_options.
T9_SHAPE: tuple[int, int] = (16384, 128256)
T9_NAMES: tuple[str, ...] = (
    "losskit triton all features (eager)",
    "losskit triton all features (eager, upstream 0.25)",
    T9_NAME,
    "liger CE plain",
    T9_LIGER_NAME,
)


def t9_options(device: torch.device, reps: int = GPU_REPS, check: bool = False) -> Options:
    """The T9 run: the rows of ``T9_NAMES`` at ``T9_SHAPE`` (GPU method)."""
    return Options(device=device, shapes=[T9_SHAPE], reps=reps, warmup=GPU_WARMUP, check=check,
                   entries=tuple(e for e in ENTRIES if e.name in T9_NAMES))


# ---------------------------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------------------------


class BenchCase:
    """Drives one entry on one problem for ``timing``: untimed ``prepare``/``release``, timed ``step``.

    The step is ``torch.autograd.grad(loss, logits)``, and the gradient is held until ``release``, so the memory
    method counts it. ``grad`` rather than ``backward()``: in training the logits are not a leaf and their gradient
    flows on into the LM head's backward, whereas a leaf's AccumulateGrad would copy a gradient that an in-place
    entry wrote into the logits' own storage (+1 gradient buffer that no training step pays).
    """

    def __init__(self, entry: Entry, problem: Problem) -> None:
        self.entry = entry
        self.problem = problem
        self._grad: torch.Tensor | None = None

    def prepare(self) -> torch.Tensor:
        if self.entry.inplace:
            # a non-leaf copy, as a model's logits are (in place is refused on a leaf that requires grad)
            return self.problem.logits.clone()
        return self.problem.logits

    def step(self, x: torch.Tensor) -> None:
        out = self.entry.loss(self.problem, x)
        if self.entry.mode == "copy":
            self._grad = out
        else:
            (self._grad,) = torch.autograd.grad(out, x)

    def release(self, x: torch.Tensor) -> None:
        self._grad = None


@dataclasses.dataclass(frozen=True)
class Row:
    """One result row: every column of the CSV except the per-run environment."""

    name: str
    impl: str
    mode: str
    inplace: bool
    N: int
    V: int
    D: str
    dtype: str
    ms_median: float | None
    ms_min: float | None
    ms_max: float | None
    reps: int
    floor_ms: float
    x_floor: float | None
    peak_extra_bytes: int | None
    max_err: float | None
    status: str


@dataclasses.dataclass(frozen=True)
class Options:
    """What to run. ``shapes`` are ``(N, V)`` pairs; ``reps``/``warmup`` default to the mode's method."""

    device: torch.device
    shapes: Sequence[tuple[int, int]]
    reps: int
    warmup: int
    check: bool = False
    entries: Sequence[Entry] = ENTRIES
    quick: bool = False


def _status_of(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text:
        return "OOM"
    first_line = text.strip().splitlines()[0] if text.strip() else ""
    return f"error: {type(exc).__name__}: {first_line}"[:300]


def _peak_extra(case: BenchCase, device: torch.device) -> int | None:
    """One untimed run of ``case`` under the device's peak-memory method (None where unsupported)."""
    x = case.prepare()

    def run_once():
        return case.step(x)

    try:
        if device.type == "cuda":
            return memory.cuda_peak_extra_bytes(run_once)
        if memory.rss_supported():
            return memory.host_peak_extra_bytes(run_once)
        return None
    finally:
        case.release(x)


def max_error(entry: Entry, problem: Problem, rows: int = CHECK_ROWS) -> float:
    """Max error of ``entry`` on the first ``rows`` rows against its fp64 oracle on the same rounded inputs.

    ``max(|L − L_ref| / max(1, |L_ref|), max|G − G_ref| / max|G_ref|)`` with G the gradient w.r.t. the logits.
    """
    if entry.mode == "copy":
        return 0.0
    head = problem.head(rows)
    leaf = head.logits.detach().clone().requires_grad_(True)
    x = leaf.clone() if entry.inplace else leaf  # in place needs a non-leaf; its gradient reaches the leaf
    loss = entry.loss(head, x)
    loss.backward()
    grad = leaf.grad.double()
    x64 = head.logits.detach().double().requires_grad_(True)
    ref = entry.oracle(head, x64)
    ref.backward()
    loss_err = (loss.detach().double() - ref.detach()).abs() / ref.detach().abs().clamp_min(1)
    grad_err = (grad - x64.grad).abs().max() / x64.grad.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return float(torch.maximum(loss_err, grad_err))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def run_shape(
    options: Options, num_rows: int, num_classes: int, bandwidth: float, log: Callable[[str], Any] = print
) -> list[Row]:
    """Time, measure and (optionally) check every entry at one shape; skipped entries get their row too."""
    device = options.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    problem = make_problem(num_rows, num_classes, device=device, dtype=dtype)
    floor = memory.floor_ms(num_rows, num_classes, problem.logits.element_size(), bandwidth)
    runnable: list[Entry] = []
    skipped: dict[str, str] = {}
    for entry in options.entries:
        reason = entry.skip(device)
        if not reason and options.quick and entry.heavy:
            reason = "--quick (compiling this graph takes longer than the quick budget)"
        if reason:
            skipped[entry.name] = reason
        else:
            runnable.append(entry)
    if any(e.mode == "eager" for e in runnable):
        problem.eager_weights()
    cases = [BenchCase(e, problem) for e in runnable]
    log(f"  N={num_rows} V={num_classes}: timing {len(cases)} entries, {options.reps} reps ...")
    if device.type == "cuda":
        results = timing.time_each(cases, reps=options.reps, warmup=options.warmup, timer=timing.CudaEventTimer())
    else:
        results = timing.time_round_robin(cases, reps=options.reps, warmup=options.warmup, timer=timing.HostTimer())
    outcome: dict[str, tuple[timing.CaseResult, int | None, float | None, str]] = {}
    for case, result in zip(cases, results):
        peak, err, status = None, None, "ok"
        if result.error is not None:
            status = _status_of(result.error)
        else:
            try:
                peak = _peak_extra(case, device)
                if options.check:
                    err = max_error(case.entry, problem)
            except Exception as exc:  # noqa: BLE001 - any failure becomes the row's status
                status = _status_of(exc)
        outcome[case.entry.name] = (result, peak, err, status)
    rows = []
    for entry in options.entries:
        common = {
            "name": entry.name, "impl": entry.impl, "mode": entry.mode, "inplace": entry.inplace, "N": num_rows,
            "V": num_classes, "D": "", "dtype": _dtype_name(dtype), "floor_ms": floor,
        }
        if entry.name in skipped:
            rows.append(Row(**common, ms_median=None, ms_min=None, ms_max=None, reps=0, x_floor=None,
                            peak_extra_bytes=None, max_err=None, status=f"skipped: {skipped[entry.name]}"))
            continue
        result, peak, err, status = outcome[entry.name]
        stats = timing.summarize(result.samples_ms) if result.samples_ms and status == "ok" else None
        rows.append(Row(
            **common,
            ms_median=stats.median_ms if stats else None,
            ms_min=stats.min_ms if stats else None,
            ms_max=stats.max_ms if stats else None,
            reps=stats.reps if stats else 0,
            x_floor=stats.median_ms / floor if stats else None,
            peak_extra_bytes=peak,
            max_err=err,
            status=status,
        ))
    return rows


def measure_bandwidth(device: torch.device) -> float:
    """Copy bandwidth (B/s, read + write) of the device: 256 MiB host copy or 2 GiB device copy."""
    nbytes = GPU_COPY_BYTES if device.type == "cuda" else CPU_COPY_BYTES
    return memory.copy_bandwidth(nbytes, device)


def run(options: Options, log: Callable[[str], Any] = print) -> tuple[float, list[Row]]:
    """The whole benchmark: copy bandwidth first, then every shape in turn. Returns (bandwidth B/s, rows)."""
    bandwidth = measure_bandwidth(options.device)
    rows: list[Row] = []
    for num_rows, num_classes in options.shapes:
        rows += run_shape(options, num_rows, num_classes, bandwidth, log)
        if options.device.type == "cuda":
            torch.cuda.empty_cache()
    return bandwidth, rows
