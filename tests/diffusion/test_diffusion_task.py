"""The `diffusion` training task (spec/diffusion.md §9; acceptance 13-16, the parts of this task)."""

import json
import math

import pytest
import torch

from losskit.config import build_train_config
from losskit.contract import ConfigError
from losskit.functional import diffusion as D
from losskit.train.diffusion import DiffusionMLP, run
from losskit.train.sinks import read_metrics

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


@pytest.mark.parametrize(
    "weighting, space, schedule",
    [
        ("sangoi", "epsilon", "cosine"),
        ("debiased", "v_prediction", "cosine"),
        ("p2", "epsilon", "linear"),
        ("edm", "v_prediction", "scaled_linear"),
        ("sd3_cosmap", "flow", "flow"),
        ("min_snr", "flow", "flow"),
        ("min_snr", "v_prediction", "cosine"),
    ],
)
def test_weightings_train_finite(tmp_path, weighting, space, schedule):
    cfg = cfg_of(
        tmp_path,
        loss_weighting=weighting,
        prediction_type=space,
        schedule=schedule,
        max_iters=10,
        log_interval=5,
        eval_interval=10,
        **TINY,
    )
    out = run(cfg)
    assert math.isfinite(out["val_loss"])
    rows = read_metrics(tmp_path)
    for r in rows:
        for k, v in r.items():
            if k.startswith(("train/", "loss_modifiers/")):
                assert v is not None and math.isfinite(v), (k, v)


def test_determinism(tmp_path):
    a = run(cfg_of(tmp_path / "a", max_iters=10, log_interval=5, eval_interval=10, **TINY))
    b = run(cfg_of(tmp_path / "b", max_iters=10, log_interval=5, eval_interval=10, **TINY))
    assert a["eval_x0_mse"] == b["eval_x0_mse"]
    assert read_metrics(tmp_path / "a") == read_metrics(tmp_path / "b")


@pytest.mark.slow
def test_end_to_end_300_iterations(tmp_path):
    from losskit.cli import main

    code = main(
        ["train", "--task=diffusion", "--max_iters=300", "--eval_interval=300", f"--out_dir={tmp_path}"]
    )
    assert code in (0, None)
    rows = read_metrics(tmp_path)
    keys = set().union(*rows)
    for k in range(10):
        for suffix in ("loss_raw", "weight", "loss", "count"):
            assert f"diffusion/bucket_{k:02d}/{suffix}" in keys
        assert f"eval/x0_mse/bucket_{k:02d}" in keys
    evals = [r["eval/x0_mse"] for r in rows if "eval/x0_mse" in r]
    assert evals[-1] <= 0.5 * evals[0]
    raw = [r["train/loss_raw"] for r in rows if "train/loss_raw" in r]
    assert raw[-1] <= 0.5 * raw[0]
    buckets = json.loads((tmp_path / "buckets.json").read_text())
    assert len(buckets["buckets"]) == 10
    png = (tmp_path / "samples.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (73, 73)  # 8×8 tiles of 8×8 pixels with 1-pixel borders
    assert (tmp_path / "buckets.png").stat().st_size > 0
