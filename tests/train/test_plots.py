"""`losskit plot` in each task's units, mixed tasks refused, log axes, readable samples.png."""

import matplotlib.image
import pytest
import torch

from losskit.cli import main as losskit
from losskit.contract import ConfigError
from losskit.train import plot
from losskit.train.tasks import build_train_config, run_task

TINY_DIFFUSION = {"task": "diffusion", "model_width": 32, "model_depth": 1, "sample_steps": 5, "batch_size": 32,
                  "max_iters": 20, "log_interval": 5, "eval_interval": 10, "loss_weighting": "min_snr",
                  "loss_modifiers_enabled": True}
TINY_TEMPORAL = {"task": "temporal", "epochs": 2, "channels": 8}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny run of each task."""
    root = tmp_path_factory.mktemp("plots")
    lm = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=32", "--batch_size=4", "--eval_iters=2",
          "--eval_interval=2", "--log_interval=1", "--device=cpu", "--max_iters=4", "--loss_modifiers_enabled=True",
          "--mask_ratio_weight_enabled=True"]
    assert losskit(["train", *lm, f"--out_dir={root / 'lm'}"]) == 0
    run_task(build_train_config({**TINY_DIFFUSION, "out_dir": str(root / "diffusion")}))
    run_task(build_train_config({**TINY_TEMPORAL, "out_dir": str(root / "temporal")}))
    return root


def _keys(run_dir):
    from losskit.train.sinks import read_metrics

    return {k for r in read_metrics(run_dir) for k in r if k != "step"}


@pytest.mark.parametrize("task,xlabel,expected", [
    ("lm", "step", {"loss": "nats/token", "learning rate": "learning rate"}),
    ("diffusion", "step", {"training loss": "MSE", "eval x0-MSE": "x0-MSE per pixel",
                           "eval x0-MSE per timestep bucket": "x0-MSE", "learning rate": "learning rate"}),
    ("temporal", "epoch", {"cross-entropy": "nats per valid timestep", "energy": "energy", "accuracy": "fraction",
                           "learning rate": "learning rate"}),
])
def test_each_task_is_drawn_in_its_own_units(runs, task, xlabel, expected):
    x, panels = plot.panels_for(task, _keys(runs / task))
    assert x.startswith(xlabel)
    by_title = {p.title: (p, drawn) for p, drawn in panels}
    for title, unit in expected.items():
        panel, drawn = by_title[title]
        assert unit in panel.ylabel and drawn, title  # present, with data (the LR panel is never empty)
    assert "nats/token" not in " ".join(p.ylabel for p, _ in panels if task != "lm")
    if task == "diffusion":
        assert len(by_title["eval x0-MSE per timestep bucket"][1]) == 10
        assert "SNRWeightModifier.mean_weight" in by_title


@pytest.mark.parametrize("task", ["lm", "diffusion", "temporal"])
def test_plot_command_writes_a_png_per_task(runs, task, tmp_path):
    out = tmp_path / f"{task}.png"
    assert losskit(["plot", str(runs / task), "--out", str(out)]) == 0
    image = matplotlib.image.imread(out)
    assert image.shape[0] >= 300 and image.shape[1] >= 500 and image.std() > 0


def test_mixed_tasks_are_refused(runs, capsys):
    assert losskit(["plot", str(runs / "lm"), str(runs / "diffusion")]) == 2
    err = capsys.readouterr().err
    assert "cannot plot runs of different tasks together" in err and "(lm)" in err and "(diffusion)" in err
    with pytest.raises(ConfigError, match="different tasks"):
        plot.plot_runs([str(runs / "temporal"), str(runs / "lm")], runs / "x.png")


@pytest.mark.parametrize("values,log", [
    ([26.4, 3.0, 0.21], True), ([5.5, 5.4, 5.3], False), ([1.0, 10.0], True), ([1.0, 9.9], False),
    ([0.0, 10.0], False), ([-1.0, 100.0], False), ([], False),
])
def test_log_axis_where_values_span_decades(values, log):
    assert plot.spans_decades(values) is log


def test_diffusion_samples_png_is_readable(runs):
    image = matplotlib.image.imread(runs / "diffusion" / "samples.png")[..., 0]
    assert image.shape == (292, 292)
    blocks = image[::4, ::4]  # nearest-neighbour: each 4x4 block is one digit pixel
    assert (torch.from_numpy(image) == torch.from_numpy(blocks).repeat_interleave(4, 0).repeat_interleave(4, 1)).all()
    assert (blocks[::9, :] == blocks.min()).all()  # black separators between the 8x8 tiles


def test_temporal_logs_the_learning_rate_per_epoch(runs):
    from losskit.train.sinks import read_metrics, series

    epochs, lrs = series(read_metrics(runs / "temporal"), "train/lr")
    assert epochs == [1, 2] and lrs == [3e-3, 3e-3]
