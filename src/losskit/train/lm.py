"""Task `lm`: nanoGPT-style training of the byte-level Llama decoder on the embedded corpus.

One optimizer step (``forward_backward`` + the update in ``run``):

1. Draw the step's micro-batches, build ``StepCounts`` from their targets (one small all-reduce under DDP)
   when ``loss_normalize="global_tokens"``.
2. Per micro-batch: ``logits = model(x)``; ``out = pipeline.compute(logits, y, step_counts=counts,
   inplace_grad=True)`` (the fused in-place loss path of spec/kernels.md; the pipeline was built with
   ``input_checks="deferred"``); back-propagate ``out.loss`` (times ``world_size`` under DDP, whose gradient
   averaging then gives the global-token mean, spec/modifiers.md §1.6) or ``out.loss / accumulation`` under
   ``"tokens"`` (nanoGPT). ``out.loss_raw`` is the plain CE of the same pass, ``out.bad`` the device flag of
   non-finite logits.
3. Clip; read ``bad`` and the gradient norm together (the one host read of the step, spec/modifiers.md
   §1.7); ``on_nonfinite_logits="skip_step"`` then zeroes the gradients and skips the update.

Evaluation reports plain CE as ``val/loss`` whatever the modifiers (spec/modifiers.md §3.11), and the
checkpoint (``out_dir/ckpt.pt``) keeps the best ``val/loss``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import sys
import time
import warnings
from typing import Any

import torch

from losskit.config import train_config_to_dict
from losskit.contract import ConfigError, LossInputError
from losskit.train.data import IGNORE_INDEX, BatchSampler, LMData, SequenceSet, load_lm_data
from losskit.train.metrics import MetricAccumulator
from losskit.train.model import LlamaLM, ModelConfig, swiglu_hidden_size
from losskit.train.runtime import Runtime, save_resolved_config, setup_runtime, teardown_runtime
from losskit.train.schedule import get_lr
from losskit.train.sinks import open_sinks
from losskit.train.tokenizer import VOCAB_SIZE

CHECKPOINT = "ckpt.pt"


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
# The loss path: the modifier pipeline (always, in training), or a plain fused CE (tests of acceptance 17).
# ------------------------------------------------------------------------------------------------------------


class PipelineLoss:
    """``LossModifierPipeline.compute`` in deferred-check, in-place-gradient mode (the lm task's path)."""

    def __init__(self, cfg: Any, *, extra_modifiers=(), verbose: bool = True) -> None:
        from losskit.modifiers import create_loss_modifier_pipeline

        self.pipeline = create_loss_modifier_pipeline(
            train_config_to_dict(cfg), extra_modifiers=extra_modifiers, verbose=verbose, input_checks="deferred"
        )
        self.padding_token = None
        if (cfg.loss_modifiers_enabled and cfg.target_smoothing_enabled and cfg.target_smoothing_exclude_padding
                and cfg.target_smoothing_padding_token != IGNORE_INDEX):
            self.padding_token = cfg.target_smoothing_padding_token

    def __call__(self, logits, targets, step_counts):
        out = self.pipeline.compute(logits, targets, ignore_index=IGNORE_INDEX, step_counts=step_counts,
                                    inplace_grad=True)
        return out.loss, out.loss_raw, out.bad

    def metrics(self) -> dict[str, torch.Tensor]:
        m = self.pipeline.get_all_metrics()
        self.pipeline.reset_all_metrics()
        return m


class PlainLoss:
    """The trainer without a pipeline: ``kernels.fused_token_loss`` with the same normaliser (no modifiers)."""

    padding_token = None

    def __call__(self, logits, targets, step_counts):
        from losskit.functional.reduce import normalizer
        from losskit.kernels import fused_token_loss

        valid = targets != IGNORE_INDEX
        if step_counts is not None:
            denom = normalizer(valid, normalize="global_tokens", step_counts=step_counts)
        else:
            denom = normalizer(valid, normalize="tokens")
        out = fused_token_loss(logits, targets, ignore_index=IGNORE_INDEX, normalizer=denom, reduction="sum",
                               inplace_grad=True)
        return out.loss, out.loss.detach(), out.stats.bad.any()

    def metrics(self) -> dict[str, torch.Tensor]:
        return {}


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


def _load_checkpoint(path: pathlib.Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _save_checkpoint(path: pathlib.Path, state: dict) -> None:
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def run(cfg: Any, *, use_pipeline: bool = True, extra_modifiers=(), progress: bool = True) -> dict:
    """Train (or evaluate) the lm task described by ``cfg`` (an ``LMTrainConfig``); returns a summary dict.

    Bad input (data, resume without checkpoint, modifier values) raises before anything is written.
    """
    out_dir = pathlib.Path(cfg.out_dir)
    ckpt_path = out_dir / CHECKPOINT
    resume = None
    if cfg.init_from == "resume":
        if not ckpt_path.is_file():
            raise ConfigError(f"init_from='resume' needs a checkpoint at {ckpt_path}, which does not exist")
        resume = _load_checkpoint(ckpt_path)
        arch = resume["model_config"]
        cfg = dataclasses.replace(cfg, **{k: arch[k] for k in ("block_size", "n_layer", "n_head", "n_embd",
                                                               "bias")}, n_kv_head=arch["n_kv_head"])
    data: LMData = load_lm_data(dataset=cfg.dataset, data=cfg.data, block_size=cfg.block_size,
                                vocab_size=VOCAB_SIZE, seed=cfg.seed)
    if cfg.dataset not in ("pydoc_topics", "custom_text"):
        raise ConfigError(f"dataset must be 'pydoc_topics' or 'custom_text' for task='lm', got {cfg.dataset!r}")

    rt: Runtime = setup_runtime(cfg)
    try:
        loss_fn = PipelineLoss(cfg, extra_modifiers=extra_modifiers, verbose=rt.master) if use_pipeline \
            else PlainLoss()
        return _train(cfg, rt, data, loss_fn, resume, progress=progress)
    finally:
        teardown_runtime(rt)


def _train(cfg, rt: Runtime, data: LMData, loss_fn, resume: dict | None, *, progress: bool) -> dict:
    out_dir = pathlib.Path(cfg.out_dir)
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
    config_dict = train_config_to_dict(cfg)
    if rt.master:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_resolved_config(out_dir, config_dict, print_it=progress)
        print(f"model: {model.num_parameters():,} parameters; data: {data.source}, {len(data.train)} train / "
              f"{len(data.val)} val sequences of {cfg.block_size} tokens; unigram baseline "
              f"{data.unigram_baseline:.4f} nats/token", flush=True)
    train_model = torch.compile(model) if cfg.compile else model
    if rt.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(train_model, device_ids=[rt.device.index] if rt.device.type == "cuda"
                                              else None)
    sinks = open_sinks(cfg, config_dict, append=resume is not None, enabled=rt.master)
    metrics = MetricAccumulator()
    history: list[dict] = []
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_iters, initial=start_iter, disable=not (rt.master and progress), file=sys.stderr,
               dynamic_ncols=True, desc="train")

    def do_eval(it: int) -> float:
        nonlocal best_val
        val = evaluate(model, data.val, batch_size=cfg.batch_size, eval_iters=cfg.eval_iters, device=rt.device,
                       autocast=rt.autocast)
        if rt.master:
            row = {"val/loss": val, "val/unigram_baseline": data.unigram_baseline}
            sinks.log(it, row)
            history.append({"step": it, **row})
            bar.write(f"step {it}: val/loss {val:.4f} (unigram baseline {data.unigram_baseline:.4f})")
            if it > 0 and (val < best_val or cfg.always_save_checkpoint):
                best_val = min(best_val, val)
                _save_checkpoint(out_dir / CHECKPOINT, {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "model_config": dataclasses.asdict(mcfg), "iter_num": it, "best_val_loss": best_val,
                    "config": config_dict, "sampler": sampler.state_dict(), "skipped_steps": skipped,
                })
        return val

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
            if it % cfg.eval_interval == 0:
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
            bad_logits, bad_norm = flags.tolist()  # the one host read of the step (spec/modifiers.md §1.7)
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
            bar.update(1)
            if it % cfg.log_interval == 0 or it == cfg.max_iters - 1:
                # the key set is the same on every rank (same modifiers, same steps), as compute() needs under DDP
                row = metrics.compute(keys=metrics.keys())
                metrics.reset()
                now = time.perf_counter()
                tokens_per_sec = tokens_since / max(now - t_log, 1e-9)
                t_log, tokens_since = now, 0
                row.update({"train/lr": lr, "train/tokens_per_sec": tokens_per_sec, "train/skipped_steps": skipped})
                if rt.master:
                    sinks.log(it, row)
                    history.append({"step": it, **row})
                    bar.set_postfix(loss=f"{row['train/loss']:.4f}")
                    bar.write(f"iter {it}: loss {row['train/loss']:.4f}, raw {row['train/loss_raw']:.4f}, "
                              f"lr {lr:.2e}, {tokens_per_sec:,.0f} tok/s")
        last_val = do_eval(cfg.max_iters)
    finally:
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
              f"{summary['iters']} iterations in {wall:.1f} s ({tokens_per_sec:,.0f} tok/s at the end)", flush=True)
    return summary
