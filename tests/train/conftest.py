"""Shared tiny settings for the trainer tests (a 1-layer, 16-wide model; a few iterations)."""

import pytest

TINY = [
    "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=32", "--batch_size=4", "--eval_iters=2",
    "--eval_interval=5", "--log_interval=1", "--device=cpu", "--warmup_iters=2",
]


def _tiny_config(tmp_path, *extra: str, iters: int = 4):
    """An lm config for a few-iteration run in ``tmp_path/run``."""
    from losskit.config import load_config
    from losskit.train.tasks import build_train_config

    return build_train_config(load_config([*TINY, f"--max_iters={iters}", f"--out_dir={tmp_path / 'run'}", *extra]))


@pytest.fixture
def tiny_config():
    return _tiny_config


@pytest.fixture
def tiny_argv():
    return list(TINY)
