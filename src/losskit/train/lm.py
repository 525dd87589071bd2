"""Task `lm`: nanoGPT-style training of the byte-level Llama decoder on the embedded corpus.

One optimizer step (``forward_backward`` + the update in ``run``):

1. Draw the step's micro-batches, build ``StepCounts`` from their targets (one small all-reduce under DDP)
   when ``loss_normalize="global_tokens"``.
2. Per micro-batch: ``logits = model(x)``; ``out = pipeline.compute(logits, y, step_counts=counts,
   inplace_grad=True)`` (the fused in-place loss path: the gradient is written into the logits' storage during
   the forward, docs/losses.md; the pipeline was built with ``input_checks="deferred"``); back-propagate ``out.loss`` (times ``world_size`` under DDP, whose gradient
   averaging then gives the global-token mean, docs/training.md) or ``out.loss / accumulation`` under
   ``"tokens"`` (nanoGPT). ``out.loss_raw`` is the plain CE of the same pass, ``out.bad`` the device flag of
   non-finite logits.
3. Clip; read ``bad`` and the gradient norm together (the one host read of the step);
   ``on_nonfinite_logits="skip_step"`` then zeroes the gradients and skips the update.

Evaluation reports plain CE as ``val/loss`` whatever the modifiers (so curves with and without modifiers
compare), and the checkpoint (``out_dir/ckpt.pt``) keeps the best ``val/loss``; a resume continues it exactly
(weights, optimizer, data position and every RNG state), docs/training.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import sys
import time
import warnings
from typing import Any

import torch

from losskit.contract import ConfigError, LossInputError
from losskit.train.checkpoint import (
    CHECKPOINT,
    capture_rng_state,
    load_checkpoint,
    remove_stale_tmp,
    restore_rng_state,
    save_checkpoint,
)
from losskit.train.config import train_config_to_dict
from losskit.train.data import IGNORE_INDEX, BatchSampler, LMData, SequenceSet, load_lm_data
from losskit.train.metrics import MetricAccumulator
from losskit.train.model import LlamaLM, ModelConfig, swiglu_hidden_size
from losskit.train.rundir import prepare_run_dir, resolve_out_dir
from losskit.train.runtime import Runtime, save_resolved_config, setup_runtime, teardown_runtime
from losskit.train.schedule import get_lr
from losskit.train.sinks import open_sinks, truncate_metrics
from losskit.train.tokenizer import VOCAB_SIZE


def model_config_from(cfg: Any) -> ModelConfig:
    """The decoder architecture of an lm task config."""
    return ModelConfig(
        vocab_size=VOCAB_SIZE,
        block_size=cfg.block_size,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_kv_head=cfg.n_kv_head or cfg.n_head,
        n_embd=cfg.n_embd,
        intermediate_size=swiglu_hidden_size(cfg.n_embd),
        dropout=cfg.dropout,
        bias=cfg.bias,
    )


def configure_optimizer(model: torch.nn.Module, cfg: Any, device_type: str) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (embeddings, projections) and none on norms and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device_type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), **extra)


# ------------------------------------------------------------------------------------------------------------
# The loss path. A loss function is ``loss_fn(logits, targets, step_counts) -> (loss, loss_raw, bad)`` with a
# ``padding_token`` attribute (excluded from the step's token count, or None) and ``metrics() -> dict``; the task
# trains with the modifier pipeline, and the tests plug in plain references.
# ------------------------------------------------------------------------------------------------------------


class PipelineLoss:
    """``LossModifierPipeline.compute`` in deferred-check, in-place-gradient mode (the lm task's path), built from
    the config's ``ModifierSettings`` (parsed, and warned about, once at the config edge)."""

    def __init__(self, cfg: Any, *, extra_modifiers=(), verbose: bool = True) -> None:
        from losskit.modifiers import create_loss_modifier_pipeline

        settings = cfg.modifiers
        self.pipeline = create_loss_modifier_pipeline(
            settings, extra_modifiers=extra_modifiers, verbose=verbose, input_checks="deferred"
        )
        smoothing = settings.smoothing
        self.padding_token = None
        if (settings.enabled and smoothing.enabled and smoothing.exclude_padding
                and smoothing.padding_token != IGNORE_INDEX):
            self.padding_token = smoothing.padding_token

    def __call__(self, logits, targets, step_counts):
        out = self.pipeline.compute(logits, targets, ignore_index=IGNORE_INDEX, step_counts=step_counts,
                                    inplace_grad=True)
        return out.loss, out.loss_raw, out.bad

    def metrics(self) -> dict[str, torch.Tensor]:
        m = self.pipeline.get_all_metrics()
        self.pipeline.reset_all_metrics()
        return m


@dataclasses.dataclass
class StepResult:
    """Detached device values of one optimizer step on this rank (before the update)."""

    loss: torch.Tensor  # the back-propagated loss, as the step loss (global_tokens: this rank's share x world)
    loss_raw: torch.Tensor
    bad: torch.Tensor
    tokens: int  # positions processed on this rank (for tokens/s)


def forward_backward(
    model: torch.nn.Module,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    loss_fn,
    *,
    loss_normalize: str,
    world_size: int = 1,
    autocast=contextlib.nullcontext,
    metrics: MetricAccumulator | None = None,
) -> StepResult:
    """Forward and backward over the micro-batches of one optimizer step; gradients accumulate in ``.grad``.

    Under ``"global_tokens"`` the loss of each micro-batch is its share ``Σ_local ℓ / N_step``; the shares of
    all micro-batches and ranks sum to the step loss, so each rank back-propagates ``share · world_size``
    and DDP's gradient mean gives exactly the whole-batch gradient. Under ``"tokens"`` each micro-batch mean
    is divided by the number of micro-batches (nanoGPT).
    """
    from losskit.functional.reduce import step_counts

    counts = None
    if loss_normalize == "global_tokens":
        counts = step_counts([y for _, y in micro_batches], ignore_index=IGNORE_INDEX,
                             padding_token=loss_fn.padding_token)
    n = len(micro_batches)
    scale = float(world_size) if loss_normalize == "global_tokens" else 1.0 / n
    loss_sum = raw_sum = None
    bad = None
    tokens = 0
    for k, (x, y) in enumerate(micro_batches):
        sync = contextlib.nullcontext() if (k == n - 1 or not hasattr(model, "no_sync")) else model.no_sync()
        with sync:
            with autocast():
                logits = model(x)
            loss, raw, flag = loss_fn(logits, y, counts)
            (loss * scale).backward()
        loss_sum = loss.detach() * scale if loss_sum is None else loss_sum + loss.detach() * scale
        raw_sum = raw.detach() * scale if raw_sum is None else raw_sum + raw.detach() * scale
        bad = flag.detach().reshape(()) if bad is None else bad | flag.detach().reshape(())
        tokens += x.numel()
        if metrics is not None:
            metrics.add(loss_fn.metrics())
    return StepResult(loss_sum, raw_sum, bad, tokens)


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: SequenceSet, *, batch_size: int, eval_iters: int, device,
             autocast=contextlib.nullcontext) -> float:
    """Plain token-mean CE over the first ``eval_iters * batch_size`` validation sequences (cycled)."""
    from losskit.kernels import cross_entropy

    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    n = len(val)
    for k in range(eval_iters):
        idx = torch.arange(k * batch_size, (k + 1) * batch_size) % n
        x, y = val.x[idx].to(device), val.y[idx].to(device)
        with autocast():
            logits = model(x)
        total += cross_entropy(logits.float(), y, ignore_index=IGNORE_INDEX, reduction="sum").double()
        count += (y != IGNORE_INDEX).sum()
    model.train(was_training)
    return float(total / count.clamp(min=1))


#: What a resume reads from ``ckpt.pt`` (a checkpoint without them is not one of this task).
RESUME_KEYS = ("model", "optimizer", "model_config", "iter_num", "best_val_loss", "sampler")


def load_resume_checkpoint(cfg: Any) -> tuple[Any, dict]:
    """``init_from='resume'``: the checkpoint of ``cfg.out_dir`` and ``cfg`` with the checkpoint's architecture.

    Raises:
        ConfigError: no checkpoint, an unreadable one, or ``max_iters`` below the checkpoint's iteration
            (``max_iters`` counts every iteration of the run, so a resume never runs backwards and never writes
            a checkpoint whose counters disagree with its weights).
    """
    ckpt_path = pathlib.Path(cfg.out_dir) / CHECKPOINT
    if not ckpt_path.is_file():
        raise ConfigError(f"init_from='resume' needs a checkpoint at {ckpt_path}, which does not exist")
    resume = load_checkpoint(ckpt_path, required=RESUME_KEYS)
    done = int(resume["iter_num"])
    if cfg.max_iters < done:
        raise ConfigError(
            f"max_iters={cfg.max_iters} is below the iteration of the checkpoint being resumed ({done}, {ckpt_path}); "
            f"max_iters counts every iteration of the run: pass --max_iters={done} or more"
        )
    arch = resume["model_config"]
    cfg = dataclasses.replace(cfg, **{k: arch[k] for k in ("block_size", "n_layer", "n_head", "n_embd", "bias")},
                              n_kv_head=arch["n_kv_head"])
    return cfg, resume


def run(cfg: Any, *, loss_fn=None, extra_modifiers=(), progress: bool = True) -> dict:
    """Train (or evaluate) the lm task described by ``cfg`` (an ``LMTrainConfig``); returns a summary dict.

    ``loss_fn`` replaces the loss path (default: ``PipelineLoss(cfg, extra_modifiers=...)``). Bad input (data,
    resume without checkpoint) raises before anything is written.
    """
    cfg = dataclasses.replace(cfg, out_dir=resolve_out_dir("lm", cfg.out_dir, cfg.init_from))
    resume = None
    if cfg.init_from == "resume":
        cfg, resume = load_resume_checkpoint(cfg)
    data: LMData = load_lm_data(dataset=cfg.dataset, data=cfg.data, block_size=cfg.block_size,
                                vocab_size=VOCAB_SIZE, seed=cfg.seed)

    rt: Runtime = setup_runtime(cfg)
    finished = False
    try:
        if loss_fn is None:
            loss_fn = PipelineLoss(cfg, extra_modifiers=extra_modifiers, verbose=rt.master)
        summary = _train(cfg, rt, data, loss_fn, resume, progress=progress)
        finished = True
        return summary
    finally:
        teardown_runtime(rt, synchronize=finished)


def _console(bar):
    """Where the console lines go: through tqdm while a bar is drawn (so the bar stays below), else print."""
    if bar is not None:
        return bar.write
    return lambda line: print(line, flush=True)


def _train(cfg, rt: Runtime, data: LMData, loss_fn, resume: dict | None, *, progress: bool) -> dict:
    """The loop. Step numbers count completed optimizer steps: the train row at step ``k`` averages steps up to
    the ``k``-th, the val row at step ``k`` evaluates the weights after ``k`` steps (step 0: before training),
    and a checkpoint saved at step ``k`` holds that state, so its ``iter_num`` is ``k``."""
    torch.manual_seed(cfg.seed)
    mcfg = model_config_from(cfg)
    model = LlamaLM(mcfg).to(rt.device)
    optimizer = configure_optimizer(model, cfg, rt.device.type)
    sampler = BatchSampler(data.train, cfg.batch_size, cfg.seed, rank=rt.rank, world_size=rt.world_size)
    start_iter, best_val, skipped = 0, float("inf"), 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        sampler.load_state_dict(resume["sampler"])
        start_iter, best_val = int(resume["iter_num"]), float(resume["best_val_loss"])
        skipped = int(resume.get("skipped_steps", 0))
        if "rng" not in resume:
            warnings.warn("the checkpoint holds no RNG state (written by an older losskit): with dropout > 0 the "
                          "resumed run draws other dropout masks than an uninterrupted one", RuntimeWarning,
                          stacklevel=2)
    say = _console(None)
    if resume is not None and (cfg.eval_only or start_iter == cfg.max_iters):
        # Nothing to train: evaluate, report, and leave the run directory exactly as it is.
        val = evaluate(model, data.val, batch_size=cfg.batch_size, eval_iters=cfg.eval_iters, device=rt.device,
                       autocast=rt.autocast)
        if rt.master:
            why = "eval_only=True" if cfg.eval_only else f"the checkpoint is already at max_iters={cfg.max_iters}"
            say(f"step {start_iter}: val/loss {val:.4f} (plain CE; unigram baseline {data.unigram_baseline:.4f}); "
                f"{why}: 0 iterations, {cfg.out_dir} left unchanged")
        return {"val_loss": val, "best_val_loss": best_val, "unigram_baseline": data.unigram_baseline, "iters": 0,
                "wall_s": 0.0, "tokens_per_sec": None, "skipped_steps": skipped, "history": []}
    out_dir = None
    if rt.master:
        # created only now, after every check: bad input leaves no directory behind
        out_dir = prepare_run_dir("lm", cfg.out_dir)
        cfg = dataclasses.replace(cfg, out_dir=str(out_dir))
    config_dict = train_config_to_dict(cfg)
    if rt.master:
        stale = remove_stale_tmp(out_dir)
        if stale is not None:
            say(f"removed {stale}, left by a checkpoint save that was interrupted")
        if resume is not None:
            dropped = truncate_metrics(out_dir, last_step=start_iter)
            say(f"resuming {out_dir / CHECKPOINT} at step {start_iter}"
                + (f"; dropped {dropped} metrics row(s) logged after that checkpoint" if dropped else ""))
        save_resolved_config(out_dir, config_dict, print_it=progress)
        say(f"model: {model.num_parameters():,} parameters; data: {data.source}, {len(data.train)} train / "
            f"{len(data.val)} val sequences of {cfg.block_size} tokens; unigram baseline "
            f"{data.unigram_baseline:.4f} nats/token; run directory {out_dir}")
    train_model = torch.compile(model) if cfg.compile else model
    if rt.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(train_model, device_ids=[rt.device.index] if rt.device.type == "cuda"
                                              else None)
    sinks = open_sinks(cfg, config_dict, append=resume is not None, enabled=rt.master)
    metrics = MetricAccumulator()
    history: list[dict] = []
    bar = None
    if rt.master and progress and sys.stdout.isatty():
        # A bar only on a terminal: redirected output (a log file, CI) gets the periodic lines alone, with no
        # carriage-return redraws.
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_iters, initial=start_iter, file=sys.stdout, dynamic_ncols=True, desc="train")
    say = _console(bar)
    modified = not getattr(getattr(loss_fn, "pipeline", None), "is_empty", lambda: True)()
    # On resume the val row of the checkpoint's step was logged (and the checkpoint saved) by the earlier run.
    last_eval = start_iter if resume is not None else None

    def do_eval(it: int) -> float:
        nonlocal best_val, last_eval
        last_eval = it
        val = evaluate(model, data.val, batch_size=cfg.batch_size, eval_iters=cfg.eval_iters, device=rt.device,
                       autocast=rt.autocast)
        if rt.master:
            row = {"val/loss": val, "val/unigram_baseline": data.unigram_baseline}
            sinks.log(it, row)
            history.append({"step": it, **row})
            say(f"step {it}: val/loss {val:.4f} (plain CE; unigram baseline {data.unigram_baseline:.4f})")
            if it > 0 and (val < best_val or cfg.always_save_checkpoint):
                best_val = min(best_val, val)
                save_checkpoint(out_dir / CHECKPOINT, {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "model_config": dataclasses.asdict(mcfg), "iter_num": it, "best_val_loss": best_val,
                    "config": config_dict, "sampler": sampler.state_dict(), "skipped_steps": skipped,
                    "rng": capture_rng_state(),
                })
        return val

    if resume is not None and "rng" in resume:
        restore_rng_state(resume["rng"])  # last: model construction above drew from the same generator
    t_start = time.perf_counter()
    t_log, tokens_since = t_start, 0
    last_val = None
    tokens_per_sec = float("nan")
    try:
        if cfg.eval_only:
            last_val = do_eval(start_iter)
            return {"val_loss": last_val, "unigram_baseline": data.unigram_baseline, "iters": 0}
        model.train()
        for it in range(start_iter, cfg.max_iters):
            if it % cfg.eval_interval == 0 and it != last_eval:
                last_val = do_eval(it)
            lr = get_lr(it, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = [(x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True))
                     for x, y in sampler.step(cfg.gradient_accumulation_steps)]
            res = forward_backward(train_model, micro, loss_fn, loss_normalize=cfg.loss_normalize,
                                   world_size=rt.world_size, autocast=rt.autocast, metrics=metrics)
            params = [p for p in model.parameters() if p.grad is not None]
            if cfg.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            flags = torch.stack([res.bad.to(norm.device, torch.float32), (~torch.isfinite(norm)).float()])
            if rt.world_size > 1:
                import torch.distributed as dist

                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            bad_logits, bad_norm = flags.tolist()  # the one host read of the step
            if bad_logits or bad_norm:
                what = "logits: non-finite values (NaN/+inf) in valid rows" if bad_logits else \
                    "gradient norm is not finite"
                if cfg.on_nonfinite_logits == "error":
                    raise LossInputError(
                        f"{what} at iteration {it}; expected finite values "
                        "(set on_nonfinite_logits='skip_step' to skip such steps)"
                    )
                skipped += 1
                if rt.master:
                    warnings.warn(f"{what} at iteration {it}: step skipped (on_nonfinite_logits='skip_step')",
                                  RuntimeWarning, stacklevel=1)
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            metrics.add({"train/loss": res.loss, "train/loss_raw": res.loss_raw, "train/grad_norm": norm})
            tokens_since += res.tokens * rt.world_size
            step = it + 1
            if bar is not None:
                bar.update(1)
            if step % cfg.log_interval == 0 or step == cfg.max_iters:
                # the key set is the same on every rank (same modifiers, same steps), as compute() needs under DDP
                row = metrics.compute(keys=metrics.keys())
                metrics.reset()
                now = time.perf_counter()
                tokens_per_sec = tokens_since / max(now - t_log, 1e-9)
                t_log, tokens_since = now, 0
                row.update({"train/lr": lr, "train/tokens_per_sec": tokens_per_sec, "train/skipped_steps": skipped})
                if rt.master:
                    sinks.log(step, row)
                    history.append({"step": step, **row})
                    if bar is not None:
                        bar.set_postfix(loss=f"{row['train/loss']:.4f}")
                    say(f"step {step}: {format_losses(row, modified)}, lr {lr:.2e}, {tokens_per_sec:,.0f} tok/s")
        if last_eval != cfg.max_iters:
            last_val = do_eval(cfg.max_iters)
    finally:
        if bar is not None:
            bar.close()
        sinks.close()
    wall = time.perf_counter() - t_start
    summary = {
        "val_loss": last_val, "best_val_loss": best_val, "unigram_baseline": data.unigram_baseline,
        "iters": cfg.max_iters - start_iter, "wall_s": wall, "tokens_per_sec": tokens_per_sec,
        "skipped_steps": skipped, "history": history,
    }
    if rt.master and progress:
        print(f"done: val/loss {last_val:.4f} vs unigram baseline {data.unigram_baseline:.4f} nats/token; "
              f"{summary['iters']} iterations in {wall:.1f} s ({tokens_per_sec:,.0f} tok/s at the end); "
              f"run directory {out_dir}", flush=True)
    return summary


def format_losses(row: dict, modified: bool) -> str:
    """Both losses under their logged names: ``train/loss`` is what is back-propagated (the modified loss when a
    modifier is on, whose scale can differ a lot from CE), ``train/loss_raw`` the plain CE of the same pass."""
    if not modified:
        return f"train/loss {row['train/loss']:.4f} (plain CE)"
    return f"train/loss {row['train/loss']:.4f} (modified), train/loss_raw {row['train/loss_raw']:.4f} (plain CE)"
