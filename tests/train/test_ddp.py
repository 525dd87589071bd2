"""DDP with real gloo processes: 2 ranks x 4 micro-batches == 1 process x 8 micro-batches (global_tokens), and
logged modifier metrics are the mean over ranks (spec/modifiers.md acceptance 19, 23)."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

CONFIG = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16, "batch_size": 2, "device": "cpu",
          "loss_modifiers_enabled": True, "target_smoothing_enabled": True, "target_smoothing_special_tokens": [0, 1],
          "mask_ratio_weight_enabled": True, "entropy_modifier_enabled": True, "entropy_modifier_per_sample": True}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(rank: int, world: int, micro: int):
    """One optimizer step's loss and gradients on this rank (the trainer's forward_backward)."""
    from losskit.config import build_train_config
    from losskit.train import lm
    from losskit.train.data import BatchSampler, load_lm_data

    cfg = build_train_config(CONFIG)
    torch.manual_seed(0)
    model = lm.LlamaLM(lm.model_config_from(cfg)).double()
    data = load_lm_data(dataset="pydoc_topics", data=None, block_size=16, vocab_size=264)
    batches = BatchSampler(data.train, cfg.batch_size, seed=5, rank=rank, world_size=world).step(micro)
    # uneven valid counts: the first micro-batch of each rank = global micro-batches 0 and 1
    for k in range(2 if world == 1 else 1):
        batches[k][1][0, 3 + 5 * (k + rank):] = -100
    train_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model)
    loss_fn = lm.PipelineLoss(cfg, verbose=False)
    from losskit.train.metrics import MetricAccumulator

    acc = MetricAccumulator()
    res = lm.forward_backward(train_model, batches, loss_fn, loss_normalize="global_tokens", world_size=world,
                              metrics=acc)
    acc.add({"train/loss": res.loss, "probe/rank": torch.tensor(float(rank))})
    logged = acc.compute(keys=acc.keys())
    return res.loss, [p.grad.clone() for p in model.parameters()], logged


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        loss, grads, logged = _step(rank, world, 4)
        if rank == 0:
            torch.save({"loss": loss, "grads": grads, "logged": logged}, out)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    loss, grads, _logged = _step(0, 1, 8)
    # rank 0's logged loss is share x world averaged over ranks = the whole step loss
    assert ddp["logged"]["train/loss"] == pytest.approx(float(loss), rel=1e-10)
    for a, b in zip(ddp["grads"], grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # metrics are the mean over ranks: the probe is 0 on rank 0 and 1 on rank 1
    assert ddp["logged"]["probe/rank"] == pytest.approx(0.5)
    assert "loss_modifiers/MaskRatioWeightModifier.mean_weight" in ddp["logged"]
