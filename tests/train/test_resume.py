"""Resume of the lm task: exact continuation (dropout included), counters that never disagree with the state,
stale temporary checkpoints, one metrics row per step, unreadable checkpoints."""

import json
import random

import numpy as np
import pytest
import torch

from losskit.contract import ConfigError
from losskit.train import checkpoint, lm
from losskit.train.cli import main
from losskit.train.sinks import read_metrics, truncate_metrics

MODIFIERS = ["--loss_modifiers_enabled=True", "--entropy_modifier_enabled=True", "--target_smoothing_enabled=True",
             "--mask_ratio_weight_enabled=True"]


def _rows(run_dir, key):
    return [(r["step"], r[key]) for r in read_metrics(run_dir) if key in r]


def _kill_at_iteration(monkeypatch, k):
    """Make the k-th optimizer step (0-based) raise, as a kill between two steps would stop the run."""
    real = lm.forward_backward
    calls = [0]

    def forward_backward(*args, **kwargs):
        if calls[0] == k:
            raise KeyboardInterrupt
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(lm, "forward_backward", forward_backward)


@pytest.mark.parametrize("extra", [
    ["--dropout=0.3"],
    ["--dropout=0.1", "--gradient_accumulation_steps=2", *MODIFIERS],
    ["--dropout=0.0"],
], ids=["dropout0.3", "dropout0.1-accum2-modifiers", "dropout0"])
def test_killed_and_resumed_run_equals_the_uninterrupted_run(tmp_path, tiny_config, monkeypatch, extra):
    args = [*extra, "--eval_interval=3"]
    full = tmp_path / "full"
    lm.run(tiny_config(full, *args, iters=6), progress=False)

    part = tmp_path / "part"
    with monkeypatch.context() as m:
        _kill_at_iteration(m, 4)  # the checkpoint is at step 3; the row of step 4 was logged after it
        with pytest.raises(KeyboardInterrupt):
            lm.run(tiny_config(part, *args, iters=6), progress=False)
    assert [s for s, _ in _rows(part / "run", "train/loss")] == [1, 2, 3, 4]
    assert torch.load(part / "run" / "ckpt.pt", weights_only=True)["iter_num"] == 3

    s = lm.run(tiny_config(part, *args, "--init_from=resume", iters=6), progress=False)
    assert s["iters"] == 3
    # one row per step and kind, and every loss equal to the uninterrupted run's (same machine: bit for bit)
    for key in ("train/loss", "train/loss_raw", "val/loss"):
        assert _rows(part / "run", key) == _rows(full / "run", key), key
    assert [s for s, _ in _rows(full / "run", "train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in _rows(full / "run", "val/loss")] == [0, 3, 6]


def test_three_plus_three_iterations_equal_six_with_dropout(tmp_path, tiny_config):
    """A run of 3 iterations resumed to 6 (the same schedule: lr_decay_iters=6) equals a run of 6."""
    args = ["--dropout=0.2", "--lr_decay_iters=6", "--eval_interval=100"]
    lm.run(tiny_config(tmp_path / "six", *args, iters=6), progress=False)
    lm.run(tiny_config(tmp_path / "three", *args, iters=3), progress=False)
    lm.run(tiny_config(tmp_path / "three", *args, "--init_from=resume", iters=6), progress=False)
    assert _rows(tmp_path / "three" / "run", "train/loss") == _rows(tmp_path / "six" / "run", "train/loss")
    assert len(_rows(tmp_path / "six" / "run", "train/loss")) == 6


def test_without_the_rng_state_dropout_resume_differs(tmp_path, tiny_config, monkeypatch):
    """Negative control for the test above: skipping the RNG restore changes the dropout masks."""
    args = ["--dropout=0.2", "--lr_decay_iters=6", "--eval_interval=100"]
    lm.run(tiny_config(tmp_path / "six", *args, iters=6), progress=False)
    lm.run(tiny_config(tmp_path / "three", *args, iters=3), progress=False)
    monkeypatch.setattr(lm, "restore_rng_state", lambda state: None)
    lm.run(tiny_config(tmp_path / "three", *args, "--init_from=resume", iters=6), progress=False)
    resumed = _rows(tmp_path / "three" / "run", "train/loss")
    full = _rows(tmp_path / "six" / "run", "train/loss")
    assert resumed[:3] == full[:3] and resumed[3:] != full[3:]


def _snapshot(run_dir):
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir())}


@pytest.mark.parametrize("always_save", [False, True])
@pytest.mark.parametrize("max_iters", [0, 1, 3])
def test_max_iters_below_the_checkpoint_is_refused_and_writes_nothing(tmp_path, tiny_argv, capsys, max_iters,
                                                                      always_save):
    run = tmp_path / "run"
    base = [*tiny_argv, f"--out_dir={run}", f"--always_save_checkpoint={always_save}"]
    assert main([*base, "--max_iters=4"]) == 0
    before = _snapshot(run)
    capsys.readouterr()
    assert main([*base, "--init_from=resume", f"--max_iters={max_iters}"]) == 2
    err = capsys.readouterr().err
    assert f"max_iters={max_iters} is below the iteration of the checkpoint being resumed (4," in err
    assert "--max_iters=4 or more" in err and len(err.strip().splitlines()) == 1
    assert _snapshot(run) == before


@pytest.mark.parametrize("flag", ["--max_iters=4", "--eval_only=True"])
def test_nothing_to_train_leaves_the_run_unchanged(tmp_path, tiny_argv, capsys, flag):
    run = tmp_path / "run"
    base = [*tiny_argv, f"--out_dir={run}", "--always_save_checkpoint=True"]
    assert main([*base, "--max_iters=4"]) == 0
    before = _snapshot(run)
    capsys.readouterr()
    assert main([*base, "--init_from=resume", "--max_iters=4", flag]) == 0
    out = capsys.readouterr().out
    assert "0 iterations" in out and "left unchanged" in out and "nan" not in out
    assert _snapshot(run) == before


@pytest.mark.parametrize("size", [0, 7, 4096])
def test_a_stale_temporary_checkpoint_is_removed_on_the_next_start(tmp_path, tiny_config, size):
    lm.run(tiny_config(tmp_path, iters=2), progress=False)
    stale = tmp_path / "run" / "ckpt.pt.tmp"
    stale.write_bytes(b"\x00" * size)  # what a save killed mid-write leaves
    lm.run(tiny_config(tmp_path, "--init_from=resume", iters=3), progress=False)
    assert not stale.exists()
    steps = [s for s, _ in _rows(tmp_path / "run", "train/loss")]
    assert steps == [1, 2, 3]


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoint.save_checkpoint(path, {"iter_num": 1})

    def killed(obj, f, *a, **k):
        open(f, "wb").write(b"PK\x03\x04partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(path, {"iter_num": 2})
    assert checkpoint.load_checkpoint(path)["iter_num"] == 1  # the previous checkpoint is intact
    assert checkpoint.remove_stale_tmp(tmp_path) == tmp_path / "ckpt.pt.tmp"
    assert checkpoint.remove_stale_tmp(tmp_path) is None


@pytest.mark.parametrize("keep", [0, 1, 100, 0.5, -1], ids=["empty", "1byte", "100bytes", "half", "all-but-one"])
def test_a_truncated_checkpoint_is_a_one_line_error(tmp_path, tiny_argv, capsys, keep):
    run = tmp_path / "run"
    assert main([*tiny_argv, f"--out_dir={run}", "--max_iters=2"]) == 0
    ckpt = run / "ckpt.pt"
    data = ckpt.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    ckpt.write_bytes(data[:n])
    capsys.readouterr()
    assert main([*tiny_argv, f"--out_dir={run}", "--max_iters=3", "--init_from=resume"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"checkpoint {ckpt} cannot be read ({n} bytes;" in err
    from losskit.cli import main as losskit

    for command in (["sample", str(run), "--max_new_tokens", "2"], ["export", str(run), str(tmp_path / "hf")]):
        assert losskit(command) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and str(ckpt) in err, command


def test_a_checkpoint_without_resume_keys_is_named(tmp_path):
    torch.save({"model": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(ConfigError, match="lacks optimizer, model_config, iter_num"):
        checkpoint.load_checkpoint(tmp_path / "ckpt.pt", required=lm.RESUME_KEYS)
    torch.save([1, 2], tmp_path / "ckpt.pt")
    with pytest.raises(ConfigError, match="holds a list"):
        checkpoint.load_checkpoint(tmp_path / "ckpt.pt")


@pytest.mark.parametrize("last_step", [0, 2, 5])
def test_truncate_metrics_keeps_rows_up_to_the_checkpoint(tmp_path, last_step):
    rows = [{"step": s, "train/loss": float(s)} for s in range(1, 6)] + [{"step": 0, "val/loss": 9.0}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "train/lo'  # a write cut off by a kill
    (tmp_path / "metrics.jsonl").write_text(text)
    assert len(read_metrics(tmp_path)) == 6  # the partial last line is skipped
    dropped = truncate_metrics(tmp_path, last_step=last_step)
    kept = read_metrics(tmp_path)
    assert [r["step"] for r in kept] == [s for s in [1, 2, 3, 4, 5, 0] if s <= last_step]
    assert dropped == 6 - len(kept)
    assert (tmp_path / "metrics.jsonl").read_text().endswith("\n") or not kept
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ConfigError, match="line 2 is not a JSON object"):
        read_metrics(tmp_path)


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(3)
    random.seed(4)
    np.random.seed(5)
    state = checkpoint.capture_rng_state()
    assert {"torch", "python", "numpy"} <= set(state)
    expected = (torch.rand(3), random.random(), np.random.rand())
    checkpoint.save_checkpoint(tmp_path / "ckpt.pt", {"rng": state})
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    checkpoint.restore_rng_state(checkpoint.load_checkpoint(tmp_path / "ckpt.pt")["rng"])
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
