"""A real ``torchrun --standalone --nproc_per_node=2 -m losskit train`` run (gloo on CPU), as users launch DDP.

Rank 0 alone writes the run directory (one metrics.jsonl, one printed config), and the logged modifier
metrics are the mean over the two ranks (spec/modifiers.md §3.9, acceptance 23): checked against the
mask ratios of each rank's batches recomputed here from the same data and sampler.
"""

import os
import subprocess
import sys

import pytest
import torch

ITERS = 3
BATCH = 4
BLOCK = 32
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=16", f"--block_size={BLOCK}", f"--batch_size={BATCH}",
        "--eval_iters=2", "--eval_interval=5", "--log_interval=1", "--warmup_iters=2"]
RATIO = "loss_modifiers/MaskRatioWeightModifier"


def _short_documents(folder):
    """30 one-line documents of 15 to 125 bytes: most sequences are padded, each by a different amount."""
    folder.mkdir()
    for i in range(30):
        (folder / f"doc{i:02d}.txt").write_text(" ".join(f"w{i}" for _ in range(3 + (i * 7) % 23)))
    return folder


def _expected_mask_ratios(data_dir, seed: int = 1337) -> list[dict[str, float]]:
    """Per optimizer step: the mean over the 2 ranks of each rank's mean/min mask ratio (gradient_accumulation=1)."""
    from losskit.train.data import IGNORE_INDEX, BatchSampler, load_lm_data
    from losskit.train.tokenizer import VOCAB_SIZE

    data = load_lm_data(dataset="pydoc_topics", data=str(data_dir), block_size=BLOCK, vocab_size=VOCAB_SIZE,
                        seed=seed)
    samplers = [BatchSampler(data.train, BATCH, seed, rank=r, world_size=2) for r in range(2)]
    steps = []
    for _ in range(ITERS):
        per_rank = []
        for s in samplers:
            ((_, y),) = s.step(1)
            ratio = (y != IGNORE_INDEX).sum(1).double() / BLOCK
            per_rank.append((float(ratio.mean()), float(ratio.min())))
        steps.append({"mean": sum(m for m, _ in per_rank) / 2, "min": sum(m for _, m in per_rank) / 2,
                      "rank0": per_rank[0][0], "rank1": per_rank[1][0]})
    return steps


@pytest.mark.slow
def test_torchrun_two_gloo_processes(tmp_path):
    from losskit.train.sinks import read_metrics

    data_dir = _short_documents(tmp_path / "docs")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "losskit", "train", "--device=cpu", f"--max_iters={ITERS}", *TINY, f"--data={data_dir}",
           "--loss_modifiers_enabled=True", "--mask_ratio_weight_enabled=True", f"--out_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    # rank 0 alone writes and prints
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "config.yaml", "metrics.jsonl"]
    assert list(tmp_path.rglob("metrics.jsonl")) == [out / "metrics.jsonl"]
    assert proc.stdout.count("resolved config:") == 1 and proc.stdout.count("done: val/loss") == 1
    rows = read_metrics(out)
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, ITERS + 1))  # one row per step: no second writer
    assert [r["step"] for r in rows if "val/loss" in r] == [0, ITERS]
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in train_rows)

    # the modifier metrics are the mean over both ranks' batches
    expected = _expected_mask_ratios(data_dir)
    assert any(e["rank0"] != e["rank1"] for e in expected)  # ranks differ, so the mean is a real check
    for row, want in zip(train_rows, expected):
        assert row[f"{RATIO}.mean_mask_ratio"] == pytest.approx(want["mean"], rel=1e-6)
        assert row[f"{RATIO}.min_mask_ratio"] == pytest.approx(want["min"], rel=1e-6)
        assert f"{RATIO}.mean_weight" in row
    # tokens/s counts both ranks' positions
    assert all(r["train/tokens_per_sec"] > 0 for r in train_rows)
