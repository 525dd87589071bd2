"""Task `diffusion`: a small MLP denoiser on the digits, to show what each SNR weighting does (docs/diffusion.md).

One step: draw x0 from the 1600 training digits, t uniform on ``[0, T)`` and ε; noise (VP:
``x_t = α x0 + σ ε``; flow: ``x_t = (1 − σ) x0 + σ ε`` with ``σ = (t + 1)/T``); the element loss
``(out − target)²`` goes through ``LossModifierPipeline.compute_elementwise`` with ``log_snr = λ[t]``, so the
``loss_weighting`` keys (``SNRWeightModifier``) weight each example. Per-bucket statistics stay on the device
(``bincount``) and are read once per ``log_interval``; evaluation measures the x0 error per timestep bucket on the
197 held-out digits with seeded noise.

The optimizer step clips the global gradient norm to the common ``grad_clip`` key (1.0; 0 = off), as the lm task
does. *Why:* uncapped weightings put almost all the weight on a few timesteps (debiased ε: 2e4 at t = 999 of the
cosine schedule, 87 % of the total in the last 5 steps); unclipped, those rare examples set Adam's scale and the
raw loss stalls (300 iterations: 0.93× instead of 0.30×).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import pathlib
import time
from typing import Any

import torch
from torch import nn

from losskit.contract import ConfigError, LossInputError
from losskit.functional.diffusion import (
    alphas_cumprod_from_betas,
    cosine_betas,
    flow_log_snr,
    linear_betas,
    log_snr_from_alphas_cumprod,
    rescale_zero_terminal_snr,
    scaled_linear_betas,
)
from losskit.modifiers.factory import create_loss_modifier_pipeline
from losskit.modifiers.pipeline import LossModifierPipeline
from losskit.modifiers.snr import SNRWeightModifier
from losskit.train.config import train_config_to_dict
from losskit.train.metrics import MetricAccumulator
from losskit.train.rundir import prepare_run_dir, resolve_out_dir
from losskit.train.runtime import cpu_threads, resolve_device, save_resolved_config
from losskit.train.schedule import get_lr as _lr  # the name tests/diffusion imports
from losskit.train.sinks import open_sinks

__all__ = ["DiffusionMLP", "NoiseProcess", "load_digits_images", "run"]

N_TRAIN = 1600
TIME_FEATURES = 32


def load_digits_images(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits as ``[N,1,8,8]`` float32 in ``[−1, 1]`` (``x/8 − 1``): 1600 train, 197 val."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise ConfigError("task 'diffusion' needs scikit-learn's digits: pip install 'losskit[vision]'")
    # Read the bundled CSV that load_digits reads, without importing scikit-learn (and scipy): that import
    # costs seconds of the task's 2-minute budget on a small CPU. Same values as load_digits().images.
    path = pathlib.Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if path.is_file():
        import numpy as np

        images = np.loadtxt(path, delimiter=",", dtype=np.float32)[:, :-1].reshape(-1, 8, 8)
    else:  # a future layout: fall back to the public API
        from sklearn.datasets import load_digits

        images = load_digits().images
    x = torch.as_tensor(images, dtype=torch.float32)[:, None] / 8 - 1
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    return x[order[:N_TRAIN]], x[order[N_TRAIN:]]


def time_features(t: torch.Tensor, T: int) -> torch.Tensor:
    """32 sinusoidal features of ``u = t/(T − 1)`` at 16 geometric frequencies from 1 to 1000."""
    u = t.to(torch.float32) / max(T - 1, 1)
    freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), TIME_FEATURES // 2, device=t.device))
    arg = u[:, None] * freqs[None, :]
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.time = nn.Linear(TIME_FEATURES, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(nn.functional.silu(self.fc1(self.norm(h)) + self.time(temb)))


class DiffusionMLP(nn.Module):
    """MLP denoiser: ``[64 pixels, 32 time features] → width``, ``depth`` residual blocks
    (LayerNorm → Linear → SiLU → Linear, plus a per-block projection of the time features), LayerNorm → Linear to
    64. About 0.46 M parameters at width 256, depth 3."""

    def __init__(self, width: int = 256, depth: int = 3, num_timesteps: int = 1000) -> None:
        super().__init__()
        self.T = num_timesteps
        self.inp = nn.Linear(64 + TIME_FEATURES, width)
        self.blocks = nn.ModuleList(_Block(width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, 64)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = time_features(t, self.T)
        h = self.inp(torch.cat([x.reshape(x.shape[0], 64), temb], dim=1))
        for block in self.blocks:
            h = block(h, temb)
        return self.out(self.norm(h)).reshape(x.shape[0], 1, 8, 8)


class NoiseProcess:
    """The forward process of one schedule: noising, targets, λ and x̂0 for every prediction type."""

    def __init__(
        self, schedule: str, T: int, zero_terminal_snr: bool, prediction_type: str, device: torch.device
    ) -> None:
        self.flow = schedule == "flow"
        self.T = T
        self.space = "sample" if prediction_type == "x0" else prediction_type
        if self.flow:
            sigma = torch.arange(1, T + 1, dtype=torch.float64) / T  # σ = (t + 1)/T: σ = 1 (SNR 0) occurs
            self.log_snr = flow_log_snr(sigma).to(device)
            self.sigma = sigma.to(device=device, dtype=torch.float32)
            self.alpha = (1 - sigma).to(device=device, dtype=torch.float32)
        else:
            betas = {"cosine": cosine_betas, "linear": linear_betas, "scaled_linear": scaled_linear_betas}[
                schedule
            ](T)
            ac = alphas_cumprod_from_betas(betas)
            if zero_terminal_snr:
                ac = rescale_zero_terminal_snr(ac)
            self.alphas_cumprod = ac.to(device)
            self.log_snr = log_snr_from_alphas_cumprod(ac).to(device)
            self.alpha = ac.sqrt().to(device=device, dtype=torch.float32)
            self.sigma = (1 - ac).sqrt().to(device=device, dtype=torch.float32)

    def _coef(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.alpha[t][:, None, None, None], self.sigma[t][:, None, None, None]

    def noise(
        self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_t, target)`` for the prediction type."""
        a, s = self._coef(t)
        xt = a * x0 + s * eps
        if self.flow:
            return xt, eps - x0
        target = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[self.space]
        return xt, target

    def x0_hat(self, out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The unclipped x0 estimate from the network output."""
        a, s = self._coef(t)
        if self.flow:
            return xt - s * out
        if self.space == "epsilon":
            return (xt - s * out) / a
        if self.space == "v_prediction":
            return a * xt - s * out
        return out

    @torch.no_grad()
    def sample(
        self, model: nn.Module, n: int, steps: int, generator: torch.Generator, device: torch.device
    ) -> torch.Tensor:
        """VP: deterministic DDIM (η = 0, x̂0 clipped to [−1, 1]); flow: Euler from σ = 1 to 0."""
        x = torch.randn(n, 1, 8, 8, generator=generator, device=device)
        if self.flow:
            sig = torch.linspace(1.0, 0.0, steps + 1)
            for i in range(steps):
                t = torch.full((n,), float(sig[i]) * self.T - 1, device=device).clamp(min=0)
                x = x + (float(sig[i + 1]) - float(sig[i])) * model(x, t)
            return x
        ts = torch.linspace(self.T - 1, 0, steps).round().long().tolist()
        for i, ti in enumerate(ts):
            t = torch.full((n,), ti, dtype=torch.long, device=device)
            out = model(x, t)
            a, s = self._coef(t)
            x0 = self.x0_hat(out, x, t).clamp(-1, 1)
            eps = (
                out
                if self.space == "epsilon"
                else (a * out + s * x if self.space == "v_prediction" else (x - a * x0) / s.clamp(min=1e-12))
            )
            if i + 1 < len(ts):
                a_prev, s_prev = self._coef(torch.full((n,), ts[i + 1], dtype=torch.long, device=device))
                x = a_prev * x0 + s_prev * eps
            else:
                x = x0
        return x


@torch.no_grad()
def evaluate(model: nn.Module, proc: NoiseProcess, x_val: torch.Tensor, K: int, seed: int) -> list[float]:
    """x0-MSE per bucket at the bucket centres ``t_k = ⌊(k + ½)T/K⌋`` with seeded noise."""
    model.eval()
    g = torch.Generator(device=x_val.device).manual_seed(seed + 1)
    n = x_val.shape[0]
    t = torch.tensor([int((k + 0.5) * proc.T / K) for k in range(K)], device=x_val.device).repeat_interleave(
        n
    )
    x0 = x_val.repeat(K, 1, 1, 1)
    eps = torch.randn(x0.shape, generator=g, device=x0.device)
    xt, _ = proc.noise(x0, t, eps)
    err = ((proc.x0_hat(model(xt, t), xt, t) - x0) ** 2).reshape(K, -1).mean(1)
    model.train()
    return err.tolist()


def run(cfg: Any) -> dict:
    """Train per ``cfg`` (a ``DiffusionTrainConfig``, whose checks ran when it was built); write metrics,
    buckets.json/png, samples.png."""
    cfg = dataclasses.replace(cfg, out_dir=resolve_out_dir("diffusion", cfg.out_dir))
    device = resolve_device(cfg.device)
    with cpu_threads(device, cfg.num_threads):
        return _train(cfg, device)


def _train(cfg: Any, device: torch.device) -> dict:
    """The body of ``run``, under the task's thread setting."""
    x_train, x_val = load_digits_images(cfg.seed)
    x_train, x_val = x_train.to(device), x_val.to(device)
    T, K = cfg.num_timesteps, cfg.diffusion_buckets
    proc = NoiseProcess(cfg.schedule, T, cfg.zero_terminal_snr, cfg.prediction_type, device)
    settings = cfg.modifiers  # parsed, and warned about, once at the config edge
    if settings.snr.enabled or settings.registered:
        pipe = create_loss_modifier_pipeline(settings, input_checks="deferred")
    else:  # the plain mean, without the factory's "no modifier is enabled" warning for the default master switch
        pipe = LossModifierPipeline(input_checks="deferred")
    snr_mod = next((m for m in pipe.enabled_modifiers if isinstance(m, SNRWeightModifier)), None)
    weighted = not pipe.is_empty()

    out_dir = prepare_run_dir("diffusion", cfg.out_dir)
    cfg = dataclasses.replace(cfg, out_dir=str(out_dir))
    config_dict = train_config_to_dict(cfg)
    save_resolved_config(out_dir, config_dict, print_it=False)
    torch.manual_seed(cfg.seed)
    model = DiffusionMLP(cfg.model_width, cfg.model_depth, T).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2)
    )
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    sinks = open_sinks(cfg, config_dict)
    acc = MetricAccumulator()
    zeros = torch.zeros(4, K, dtype=torch.float64, device=device)  # raw loss, weight, weighted loss, count
    buckets = zeros.clone()
    bad = torch.zeros((), dtype=torch.bool, device=device)
    last_bucket: dict[str, list[float]] = {}
    eval_mse: list[float] = []
    started = time.perf_counter()
    B = cfg.batch_size
    lr_sum, lr_n = 0.0, 0  # Python floats: the schedule is host-side, so its interval mean costs no sync
    try:
        for it in range(cfg.max_iters + 1):
            if it == 0 or it % cfg.eval_interval == 0 or it == cfg.max_iters:
                eval_mse = evaluate(model, proc, x_val, K, cfg.seed)
                row = {f"eval/x0_mse/bucket_{k:02d}": v for k, v in enumerate(eval_mse)}
                row["eval/x0_mse"] = row["val/loss"] = sum(eval_mse) / K
                sinks.log(it, row)
                print(f"step {it}: val/loss {row['val/loss']:.4f} (eval x0-MSE per pixel)", flush=True)
            if it == cfg.max_iters:
                break
            lr = _lr(it, cfg)
            lr_sum, lr_n = lr_sum + lr, lr_n + 1
            for group in optimizer.param_groups:
                group["lr"] = lr
            x0 = x_train[torch.randint(0, x_train.shape[0], (B,), generator=g, device=device)]
            t = torch.randint(0, T, (B,), generator=g, device=device)
            eps = torch.randn(x0.shape, generator=g, device=device)
            xt, target = proc.noise(x0, t, eps)
            out = model(xt, t)
            ell = (out - target) ** 2
            res = pipe.compute_elementwise(ell, log_snr=proc.log_snr[t], predicted=out, target=target)
            optimizer.zero_grad(set_to_none=True)
            res.loss.backward()
            if cfg.grad_clip > 0:
                # No host read: the scale factor min(1, max_norm/norm) is applied on the device.
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            with torch.no_grad():
                raw = ell.detach().reshape(B, -1).mean(1).to(torch.float64)
                w = snr_mod.last_weights.to(torch.float64) if snr_mod is not None else torch.ones_like(raw)
                k = t * K // T
                for row_i, vals in enumerate((raw, w, w * raw, torch.ones_like(raw))):
                    buckets[row_i] += torch.bincount(k, weights=vals, minlength=K)
                bad = bad | res.bad
                acc.add(
                    {
                        "train/loss": res.loss.detach(),
                        "train/loss_raw": res.loss_raw.detach(),
                        **pipe.get_all_metrics(),
                    }
                )
            if (it + 1) % cfg.log_interval == 0 or it + 1 == cfg.max_iters:
                if bool(bad):
                    raise LossInputError(f"non-finite loss at a valid element before step {it + 1}")
                row = acc.compute()
                row["train/lr"] = lr_sum / lr_n  # the interval mean, like every train/ key
                b = buckets.tolist()  # the interval's one read of the bucket sums
                for kk in range(K):
                    n = b[3][kk]
                    row[f"diffusion/bucket_{kk:02d}/count"] = n
                    if n > 0:
                        row[f"diffusion/bucket_{kk:02d}/loss_raw"] = b[0][kk] / n
                        row[f"diffusion/bucket_{kk:02d}/weight"] = b[1][kk] / n
                        row[f"diffusion/bucket_{kk:02d}/loss"] = b[2][kk] / n
                last_bucket = {
                    "loss_raw": [b[0][kk] / max(b[3][kk], 1) for kk in range(K)],
                    "weight": [b[1][kk] / max(b[3][kk], 1) for kk in range(K)],
                }
                sinks.log(it + 1, row)
                per = " ".join(f"{v:.3f}" for v in last_bucket["loss_raw"])
                losses = (f"train/loss {row['train/loss']:.4f} (weighted), train/loss_raw {row['train/loss_raw']:.4f} "
                          "(plain MSE)" if weighted else f"train/loss {row['train/loss']:.4f} (plain MSE)")
                print(f"step {it + 1}: {losses}, raw MSE per bucket [{per}]", flush=True)
                acc.reset()
                lr_sum, lr_n = 0.0, 0
                buckets = zeros.clone()
    finally:
        sinks.close()
    sample_g = torch.Generator(device=device).manual_seed(cfg.seed + 2)
    model.eval()
    samples = proc.sample(model, 64, cfg.sample_steps, sample_g, device)
    _write_outputs(out_dir, proc, K, last_bucket, eval_mse, samples)
    return {"val_loss": sum(eval_mse) / K, "eval_x0_mse": eval_mse, "seconds": time.perf_counter() - started}


def _write_outputs(
    out_dir: pathlib.Path,
    proc: NoiseProcess,
    K: int,
    last: dict[str, list[float]],
    eval_mse: list[float],
    samples: torch.Tensor,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = proc.T
    lam = proc.log_snr.double().cpu()
    rows = []
    for k in range(K):
        lo, hi = -(-k * T // K), -(-(k + 1) * T // K) - 1  # the t with ⌊tK/T⌋ = k
        finite = lam[lo : hi + 1][torch.isfinite(lam[lo : hi + 1])]
        rows.append(
            {
                "bucket": k,
                "t_min": lo,
                "t_max": hi,
                "mean_log_snr": float(finite.mean()) if finite.numel() else None,
                "mean_weight": last.get("weight", [None] * K)[k],
                "loss_raw": last.get("loss_raw", [None] * K)[k],
                "eval_x0_mse": eval_mse[k] if eval_mse else None,
            }
        )
    (out_dir / "buckets.json").write_text(json.dumps({"num_timesteps": T, "buckets": rows}, indent=1))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, key, title in zip(
        axes, ("mean_weight", "loss_raw", "eval_x0_mse"), ("weight", "raw loss", "eval x0-MSE")
    ):
        ax.plot(
            [r["bucket"] for r in rows], [r[key] if r[key] is not None else float("nan") for r in rows], "o-"
        )
        ax.set_yscale("log")
        ax.set_xlabel("bucket (0 = least noisy)")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out_dir / "buckets.png", dpi=100)
    plt.close(fig)
    plt.imsave(out_dir / "samples.png", sample_grid(samples).numpy(), cmap="gray", vmin=-1, vmax=1)


#: Pixels per digit pixel in ``samples.png``: 8 x 8 tiles of 8 x 8 pixels with 1-pixel borders are 73 pixels
#: square; x4 makes 292, readable on a screen, and nearest-neighbour keeps every pixel a sharp square.
SAMPLE_SCALE = 4


def sample_grid(samples: torch.Tensor, scale: int = SAMPLE_SCALE) -> torch.Tensor:
    """64 samples ``(64, 1, 8, 8)`` in [-1, 1] as one ``(73·scale, 73·scale)`` image: an 8 x 8 grid with
    1-pixel separators at -1 (black), each pixel repeated ``scale`` times in both directions."""
    grid = torch.full((8 * 9 + 1, 8 * 9 + 1), -1.0)
    imgs = samples.detach().float().cpu().clamp(-1, 1).reshape(64, 8, 8)
    for i in range(64):
        r, c = divmod(i, 8)
        grid[1 + 9 * r : 9 + 9 * r, 1 + 9 * c : 9 + 9 * c] = imgs[i]
    return grid.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
