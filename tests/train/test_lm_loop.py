"""The lm training loop: end to end, resume, sinks, acceptance 15 (skip_step), 17 (20-step run), 19, 22."""

import json

import pytest
import torch
import torch.nn.functional as F

from losskit.contract import LossInputError
from losskit.train import lm
from losskit.train.metrics import MetricAccumulator
from losskit.train.sinks import read_metrics, series

ALL_MODIFIERS = ["--loss_modifiers_enabled=True", "--entropy_modifier_enabled=True", "--target_smoothing_enabled=True",
                 "--mask_ratio_weight_enabled=True"]


def test_tiny_run_writes_run_dir_and_resumes(tmp_path, tiny_config):
    cfg = tiny_config(tmp_path, iters=6)
    s = lm.run(cfg, progress=False)
    run = tmp_path / "run"
    assert {"config.yaml", "metrics.jsonl", "ckpt.pt"} <= {p.name for p in run.iterdir()}
    rows = read_metrics(run)
    for key in ("train/loss", "train/loss_raw", "val/loss", "train/lr", "train/tokens_per_sec"):
        assert series(rows, key)[0], key
    assert series(rows, "val/loss")[0] == [0, 5, 6]
    assert s["val_loss"] < s["history"][0]["val/loss"]  # it learns something in 6 steps
    assert "max_iters: 6" in (run / "config.yaml").read_text()
    resumed = lm.run(tiny_config(tmp_path, "--init_from=resume", iters=9), progress=False)
    assert resumed["iters"] == 3
    steps = [r["step"] for r in read_metrics(run) if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8, 9]


class FusedLoss:
    """The trainer with no pipeline: the fused kernel with the step's normaliser, called directly."""

    padding_token = None

    def __call__(self, logits, targets, step_counts):
        from losskit.functional.reduce import normalizer
        from losskit.kernels import fused_token_loss

        denom = normalizer(targets != -100, normalize="global_tokens", step_counts=step_counts)
        out = fused_token_loss(logits, targets, ignore_index=-100, normalizer=denom, reduction="sum",
                               inplace_grad=True)
        return out.loss, out.loss.detach(), out.stats.bad.any()

    def metrics(self):
        return {}


class TorchLoss:
    """Plain ``F.cross_entropy`` training, the oracle: the token mean over this (single) micro-batch."""

    padding_token = None

    def __call__(self, logits, targets, step_counts):
        total = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
        loss = total / (targets != -100).sum().clamp_min(1)
        return loss, loss.detach(), (~torch.isfinite(logits)).any()

    def metrics(self):
        return {}


def _train_losses(summary):
    return [r["train/loss"] for r in summary["history"] if "train/loss" in r]


@pytest.mark.slow
def test_twenty_step_run_without_modifier_keys_equals_the_trainer_without_pipeline(tmp_path, tiny_config):
    # spec/modifiers.md acceptance 17: bitwise-identical losses to the kernel called without a pipeline
    a = lm.run(tiny_config(tmp_path / "a", iters=20), progress=False)
    b = lm.run(tiny_config(tmp_path / "b", iters=20), loss_fn=FusedLoss(), progress=False)
    assert len(_train_losses(a)) == 20 and _train_losses(a) == _train_losses(b)


@pytest.mark.filterwarnings("ignore:loss_modifiers_enabled=True but no loss modifier is enabled")
@pytest.mark.parametrize("off", [[], ["--loss_modifiers_enabled=False", "--entropy_modifier_enabled=False"],
                                 ["--loss_modifiers_enabled=True"]], ids=["no keys", "off", "nothing enabled"])
def test_the_pipeline_off_path_trains_like_plain_cross_entropy(tmp_path, tiny_config, off):
    """The trainer's loss path without modifiers against ``F.cross_entropy`` training: same losses, step by step."""
    a = lm.run(tiny_config(tmp_path / "a", *off, iters=5), progress=False)
    b = lm.run(tiny_config(tmp_path / "b", iters=5), loss_fn=TorchLoss(), progress=False)
    assert len(_train_losses(a)) == 5
    assert _train_losses(a) == pytest.approx(_train_losses(b), rel=1e-5)
    assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    assert _train_losses(a)[-1] < _train_losses(a)[0]  # it trains


def test_a_wrong_loss_path_is_caught(tmp_path, tiny_config):
    """Negative control of the comparison above: label smoothing 0.1 is a different loss, and its tolerance sees it
    (near the uniform start the two losses differ by about 2e-4 relative)."""
    a = lm.run(tiny_config(tmp_path / "a", "--loss_modifiers_enabled=True", "--target_smoothing_enabled=True",
                           iters=2), progress=False)
    b = lm.run(tiny_config(tmp_path / "b", iters=2), loss_fn=TorchLoss(), progress=False)
    assert _train_losses(a) != pytest.approx(_train_losses(b), rel=1e-5)
    assert _train_losses(a)[0] != pytest.approx(_train_losses(b)[0], rel=1e-5)


def test_val_loss_is_plain_ce_and_raw_loss_matches_the_modifier_free_run(tmp_path, tiny_config):
    # spec/modifiers.md acceptance 22
    plain = lm.run(tiny_config(tmp_path / "plain", iters=1), progress=False)
    mods = lm.run(tiny_config(tmp_path / "mods", *ALL_MODIFIERS, iters=1), progress=False)
    assert plain["history"][0]["val/loss"] == mods["history"][0]["val/loss"]
    step0_plain = next(r for r in plain["history"] if "train/loss" in r)
    step0_mods = next(r for r in mods["history"] if "train/loss" in r)
    assert step0_mods["train/loss_raw"] == pytest.approx(step0_plain["train/loss"], rel=1e-6)
    assert step0_mods["train/loss"] != pytest.approx(step0_mods["train/loss_raw"], rel=1e-3)


def test_modifier_metrics_are_logged(tmp_path, tiny_config):
    # spec/modifiers.md acceptance 19 (keys)
    lm.run(tiny_config(tmp_path, *ALL_MODIFIERS, iters=2), progress=False)
    keys = set().union(*read_metrics(tmp_path / "run"))
    for key in ("loss_modifiers/EntropyModifier.mean_entropy", "loss_modifiers/TargetSmoothingModifier.smoothed_loss",
                "loss_modifiers/MaskRatioWeightModifier.mean_weight"):
        assert key in keys


def test_metric_accumulator_averages_over_the_interval():
    # spec/modifiers.md acceptance 19: a stub reporting 0.6, 0.7, 0.8 over 3 steps logs 0.7
    acc = MetricAccumulator()
    for v in (0.6, 0.7, 0.8):
        acc.add({"loss_modifiers/Stub.value": torch.tensor(v)})
    acc.add({"other": torch.tensor(2.0)})
    assert acc.keys() == ["loss_modifiers/Stub.value", "other"]
    assert acc.compute() == pytest.approx({"loss_modifiers/Stub.value": 0.7, "other": 2.0})
    acc.reset()
    assert acc.keys() == []
    assert acc.compute() == {}


def _nan_at(step):
    """A replacement for LlamaLM.forward whose logits are NaN at optimizer step ``step`` (training calls only)."""
    orig = lm.LlamaLM.forward
    calls = [0]

    def forward(model, idx):
        out = orig(model, idx)
        if model.training:
            if calls[0] == step:
                out = out * float("nan")
            calls[0] += 1
        return out

    return forward


def test_skip_step_leaves_parameters_unchanged(tmp_path, monkeypatch, tiny_config):
    # spec/modifiers.md acceptance 15: on_nonfinite_logits="skip_step"
    snapshots = []
    orig_step = torch.optim.AdamW.step
    monkeypatch.setattr(lm.LlamaLM, "forward", _nan_at(1))
    params = {}

    def spy(self, *a, **k):
        snapshots.append(True)
        return orig_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    orig_fb = lm.forward_backward

    def record(model, *a, **k):
        params[len(params)] = [p.detach().clone() for p in model.parameters()]
        return orig_fb(model, *a, **k)

    monkeypatch.setattr(lm, "forward_backward", record)
    with pytest.warns(RuntimeWarning, match="step skipped"):
        s = lm.run(tiny_config(tmp_path, "--on_nonfinite_logits=skip_step", iters=3), progress=False)
    assert s["skipped_steps"] == 1 and len(snapshots) == 2
    # the parameters before step 2 equal those before step 1: the NaN step changed nothing
    assert all(torch.equal(a, b) for a, b in zip(params[1], params[2]))
    assert not all(torch.equal(a, b) for a, b in zip(params[0], params[1]))
    assert all(torch.isfinite(p).all() for p in params[2])
    rows = read_metrics(tmp_path / "run")
    assert series(rows, "train/skipped_steps")[1] == [0, 1, 1]


def test_nonfinite_logits_error_by_default(tmp_path, monkeypatch, tiny_config):
    monkeypatch.setattr(lm.LlamaLM, "forward", _nan_at(0))
    with pytest.raises(LossInputError, match="logits: non-finite"):
        lm.run(tiny_config(tmp_path, iters=2), progress=False)


def test_accumulation_global_tokens_equals_one_big_batch(tmp_path, tiny_config):
    """One step over 4 micro-batches of 2 sequences = one step over the 8 sequences as a single batch."""
    cfg = tiny_config(tmp_path)
    torch.manual_seed(0)
    model = lm.LlamaLM(lm.model_config_from(cfg)).double()
    from losskit.train.data import load_lm_data

    data = load_lm_data(dataset="pydoc_topics", data=None, block_size=32, vocab_size=264)
    x, y = data.train.x[:8], data.train.y[:8]
    y[0, 5:] = -100  # uneven valid counts make "tokens" differ from "global_tokens"
    results = {}
    for name, micro, norm in [("whole", [(x, y)], "global_tokens"),
                              ("split", [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)], "global_tokens"),
                              ("tokens", [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)], "tokens")]:
        model.zero_grad()
        res = lm.forward_backward(model, micro, lm.PipelineLoss(cfg, verbose=False), loss_normalize=norm)
        results[name] = (res.loss, [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(results["split"][0], results["whole"][0], rtol=1e-12, atol=0)
    for a, b in zip(results["split"][1], results["whole"][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    # negative control: nanoGPT's mean of micro-batch means weights the short row's tokens differently
    diff = max(float((a - b).norm() / b.norm()) for a, b in zip(results["tokens"][1], results["whole"][1]))
    assert diff > 1e-3


def test_lr_schedule():
    from losskit.train.tasks import build_train_config

    c = build_train_config({"learning_rate": 1.0, "min_lr": 0.1, "warmup_iters": 10, "max_iters": 110})
    assert lm.get_lr(0, c) == pytest.approx(1 / 11)
    assert lm.get_lr(10, c) == pytest.approx(1.0)
    assert lm.get_lr(60, c) == pytest.approx(0.55)
    assert lm.get_lr(110, c) == pytest.approx(0.1)


def test_metrics_jsonl_rows_are_json(tmp_path, tiny_config):
    s = lm.run(tiny_config(tmp_path, iters=2), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(r["step"], int) and all(isinstance(v, (int, float)) for v in r.values()) for r in rows)
    assert [(r["step"], "val/loss" in r) for r in rows] == [(0, True), (1, False), (2, False), (2, True)]
    assert rows == [{"step": h["step"], **{k: v for k, v in h.items() if k != "step"}} for h in s["history"]]


def test_pinned_short_run_trajectory(tmp_path, tiny_config):
    """Regression pin: the tiny config's first 8 train losses and final val loss (seed 1337, CPU, fp32)."""
    s = lm.run(tiny_config(tmp_path, "--eval_interval=100", iters=8), progress=False)
    losses = [r["train/loss"] for r in s["history"] if "train/loss" in r]
    pinned = [5.587877, 5.541087, 5.567199, 5.529237, 5.505692, 5.47904, 5.463324, 5.457317]
    assert losses == pytest.approx(pinned, rel=2e-3)
    assert s["val_loss"] == pytest.approx(5.433079, rel=2e-3)


@pytest.mark.slow
def test_default_config_beats_the_unigram_baseline_quickly(tmp_path):
    """The default model and data with a reduced max_iters: val loss drops below the unigram baseline."""
    from losskit.train.tasks import build_train_config

    cfg = build_train_config({"out_dir": str(tmp_path / "run"), "max_iters": 40, "eval_interval": 40,
                              "eval_iters": 4, "log_interval": 20, "device": "cpu"})
    s = lm.run(cfg, progress=False)
    assert s["val_loss"] < s["unigram_baseline"]
