"""The `diffusion` training task (spec/diffusion.md §9; acceptance 13-16, the parts of this task)."""

import json
import math
import sys

import pytest
import torch

from losskit.contract import ConfigError
from losskit.functional import diffusion as D
from losskit.train.diffusion import DiffusionMLP, run
from losskit.train.sinks import read_metrics
from losskit.train.tasks import build_train_config

TINY = {"model_width": 32, "model_depth": 1, "sample_steps": 5, "batch_size": 32}


def cfg_of(tmp_path, **kw):
    return build_train_config({"task": "diffusion", "out_dir": str(tmp_path), **kw})


def test_model_size():
    n = sum(p.numel() for p in DiffusionMLP().parameters())
    assert 0.4e6 < n < 1e6


@pytest.mark.parametrize(
    "kw, key",
    [
        ({"zero_terminal_snr": True, "prediction_type": "epsilon"}, "zero_terminal_snr"),
        ({"prediction_type": "flow"}, "schedule"),
        ({"schedule": "flow"}, "prediction_type"),
    ],
)
def test_config_errors(tmp_path, kw, key):
    with pytest.raises(ConfigError, match=key):
        run(cfg_of(tmp_path / "x", **kw))
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_bucket_weights_equal_min_snr_weight(tmp_path):
    cfg = cfg_of(
        tmp_path,
        loss_weighting="min_snr",
        num_timesteps=10,
        diffusion_buckets=10,
        max_iters=20,
        log_interval=20,
        eval_interval=20,
        **TINY,
    )
    run(cfg)
    rows = read_metrics(tmp_path)
    row = [r for r in rows if "diffusion/bucket_00/weight" in r][-1]
    ac = D.alphas_cumprod_from_betas(D.cosine_betas(10))
    expected = D.min_snr_weight(
        D.log_snr_from_alphas_cumprod(ac), prediction_type="epsilon", dtype=torch.float64
    )
    for k in range(10):
        got = row.get(f"diffusion/bucket_{k:02d}/weight")
        if row[f"diffusion/bucket_{k:02d}/count"] > 0:
            assert got == pytest.approx(expected[k].item(), rel=1e-5)
    assert "loss_modifiers/SNRWeightModifier.mean_weight" in row


WEIGHTINGS = ("constant", "sangoi", "min_snr", "debiased", "p2", "sd3_sigma_sqrt", "sd3_cosmap", "edm")
SPACES = (("epsilon", "cosine"), ("v_prediction", "cosine"), ("flow", "flow"))


def first_last_ratio(rows, key="train/loss_raw", n=3):
    """Mean of the last ``n`` interval means of ``key`` over the mean of the first ``n``.

    With ``log_interval=10`` each row is the mean of 10 iterations, so n = 3 compares the first and last 30.
    """
    vals = [r[key] for r in rows if key in r]
    assert len(vals) >= 2 * n, vals
    return (sum(vals[-n:]) / n) / (sum(vals[:n]) / n)


def assert_finite_training_rows(rows):
    """Every logged loss, modifier metric and bucket statistic is a finite number (None marks a non-finite)."""
    checked = 0
    for r in rows:
        for k, v in r.items():
            if k.startswith(("train/", "loss_modifiers/", "diffusion/")):
                assert v is not None and math.isfinite(v), (r["step"], k, v)
                checked += 1
    assert checked > 0


# -- acceptance 15: every weighting trains ------------------------------------------------------------------------


@pytest.mark.parametrize("space, schedule", SPACES)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_every_weighting_trains_50_iterations(tmp_path, weighting, space, schedule):
    cfg = cfg_of(
        tmp_path,
        loss_weighting=weighting,
        prediction_type=space,
        schedule=schedule,
        max_iters=50,
        log_interval=25,
        eval_interval=50,
        **TINY,
    )
    out = run(cfg)
    assert math.isfinite(out["val_loss"])
    rows = read_metrics(tmp_path)
    assert_finite_training_rows(rows)
    weights = [v for r in rows for k, v in r.items() if k.endswith("/weight")]
    assert len(weights) >= 10 and all(w >= 0 for w in weights)
    if weighting == "constant":
        assert set(weights) == {1.0}
    else:
        assert "loss_modifiers/SNRWeightModifier.mean_weight" in rows[-2]


@pytest.mark.slow
def test_weightings_reduce_raw_loss_in_300_iterations(tmp_path):
    """Acceptance 15: with epsilon and 300 iterations (the default model) each weighting brings the raw loss
    (mean of the last 30 iterations over the first 30) to <= 0.9x."""
    ratios = {}
    for weighting in ("constant", "sangoi", "min_snr", "debiased", "p2"):
        out = tmp_path / weighting
        run(cfg_of(out, loss_weighting=weighting, max_iters=300, log_interval=10, eval_interval=300))
        ratios[weighting] = first_last_ratio(read_metrics(out))
    assert all(r <= 0.9 for r in ratios.values()), ratios


def test_determinism(tmp_path):
    a = run(cfg_of(tmp_path / "a", max_iters=10, log_interval=5, eval_interval=10, **TINY))
    b = run(cfg_of(tmp_path / "b", max_iters=10, log_interval=5, eval_interval=10, **TINY))
    assert a["eval_x0_mse"] == b["eval_x0_mse"]
    assert read_metrics(tmp_path / "a") == read_metrics(tmp_path / "b")


# -- acceptance 14: end to end ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_end_to_end_300_iterations(tmp_path):
    from losskit.cli import main

    code = main(
        [
            "train",
            "--task=diffusion",
            "--max_iters=300",
            "--eval_interval=300",
            "--log_interval=10",
            f"--out_dir={tmp_path}",
        ]
    )
    assert code in (0, None)
    rows = read_metrics(tmp_path)
    keys = set().union(*rows)
    for k in range(10):
        for suffix in ("loss_raw", "weight", "loss", "count"):
            assert f"diffusion/bucket_{k:02d}/{suffix}" in keys
        assert f"eval/x0_mse/bucket_{k:02d}" in keys
    assert {"eval/x0_mse", "val/loss", "train/loss", "train/loss_raw", "train/lr"} <= keys
    assert_finite_training_rows(rows)
    # One row per 10 iterations: 30 rows, so the first and last three rows are the first and last 30 iterations.
    assert [r["step"] for r in rows if "train/loss_raw" in r] == list(range(10, 301, 10))
    assert first_last_ratio(rows) <= 0.5
    evals = [(r["step"], r["eval/x0_mse"]) for r in rows if "eval/x0_mse" in r]
    assert [s for s, _ in evals] == [0, 300]
    assert evals[-1][1] <= 0.5 * evals[0][1]

    buckets = json.loads((tmp_path / "buckets.json").read_text())
    assert buckets["num_timesteps"] == 1000 and len(buckets["buckets"]) == 10
    assert [(b["t_min"], b["t_max"]) for b in buckets["buckets"]] == [
        (100 * k, 100 * k + 99) for k in range(10)
    ]
    for b in buckets["buckets"]:
        assert b["eval_x0_mse"] > 0 and b["loss_raw"] > 0 and b["mean_weight"] == 1.0
    final = next(r for r in rows if r["step"] == 300 and "eval/x0_mse" in r)
    assert [b["eval_x0_mse"] for b in buckets["buckets"]] == [
        final[f"eval/x0_mse/bucket_{k:02d}"] for k in range(10)
    ]

    import matplotlib.image

    for name, shape in (("samples.png", (292, 292)), ("buckets.png", None)):
        png = (tmp_path / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n", name
        img = matplotlib.image.imread(tmp_path / name)  # decodes the whole file: a valid PNG
        if shape is not None:
            assert img.shape[:2] == shape  # 8x8 tiles of 8x8 pixels with 1-pixel borders, each pixel 4x4
    full = matplotlib.image.imread(tmp_path / "samples.png")[..., 0]
    # nearest-neighbour upscaling: every 4x4 block is one colour; the 73-pixel grid is one pixel per block
    assert (full == full[::4, ::4].repeat(4, 0).repeat(4, 1)).all()
    grid = full[::4, ::4]
    borders = grid[::9, :]
    assert (borders == borders.min()).all()  # the 1-pixel separators are the -1 (black) background
    tiles = [grid[1 + 9 * r : 9 + 9 * r, 1 + 9 * c : 9 + 9 * c] for r in range(8) for c in range(8)]
    assert sum(float(t.std()) > 0 for t in tiles) >= 60  # the tiles hold images, not a flat fill


@pytest.mark.parametrize("grad_clip, calls", [(0.5, 6), (0.0, 0)])
def test_grad_clip_is_honoured(tmp_path, monkeypatch, grad_clip, calls):
    """The common ``grad_clip`` key clips every step's global gradient norm (0 = off), as in the lm task."""
    seen = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):
        params = list(params)
        seen.append(max_norm)
        norm = real(params, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        assert after <= max_norm * (1 + 1e-5)  # the gradient the optimizer sees is the clipped one
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    run(cfg_of(tmp_path, grad_clip=grad_clip, max_iters=6, log_interval=3, eval_interval=6, **TINY))
    assert seen == [grad_clip] * calls


def test_thread_count_is_restored(tmp_path):
    """``num_threads`` is process-wide; the run hands the caller's setting back (the tests share one process)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run(cfg_of(tmp_path, num_threads=1, max_iters=2, log_interval=1, eval_interval=2, **TINY))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_missing_scikit_learn_names_the_vision_extra(tmp_path, monkeypatch):
    """Acceptance 16: without scikit-learn the task fails with a message naming ``losskit[vision]``."""
    monkeypatch.setitem(sys.modules, "sklearn", None)  # what an uninstalled package looks like to importlib
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ConfigError, match=r"pip install 'losskit\[vision\]'"):
        run(cfg_of(tmp_path / "run", max_iters=1, **TINY))
    assert not (tmp_path / "run").exists()


def test_logged_lr_is_the_interval_mean(tmp_path):
    """§9: ``train/lr`` is an interval mean like the other train keys (warm-up makes it differ from the last lr)."""
    from losskit.train.diffusion import _lr

    cfg = cfg_of(tmp_path, max_iters=8, warmup_iters=6, log_interval=4, eval_interval=8, **TINY)
    run(cfg)
    rows = [r for r in read_metrics(tmp_path) if "train/lr" in r]
    assert [r["step"] for r in rows] == [4, 8]
    for r in rows:
        its = range(r["step"] - 4, r["step"])
        assert r["train/lr"] == pytest.approx(sum(_lr(i, cfg) for i in its) / 4, rel=1e-12)
        assert r["train/lr"] != pytest.approx(_lr(r["step"] - 1, cfg), rel=1e-6)
