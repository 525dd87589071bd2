"""DDP with real gloo processes: 2 ranks x 4 micro-batches == 1 process x 8 micro-batches (global_tokens), and
logged modifier metrics are the mean over ranks (spec/modifiers.md acceptance 19, 23)."""

import pytest
import torch
import torch.multiprocessing as mp

CONFIG = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16, "batch_size": 2, "device": "cpu",
          "loss_modifiers_enabled": True, "target_smoothing_enabled": True, "target_smoothing_special_tokens": [0, 1],
          "mask_ratio_weight_enabled": True, "entropy_modifier_enabled": True, "entropy_modifier_per_sample": True}


def _step(rank: int, world: int, micro: int):
    """One optimizer step's loss and gradients on this rank (the trainer's forward_backward)."""
    from losskit.train import lm
    from losskit.train.data import BatchSampler, load_lm_data
    from losskit.train.tasks import build_train_config

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


def _worker(rank, world, store, out):
    """One rank. The rendezvous is a file store (no TCP port that another process could take between choosing
    it and binding it), and the teardown is the trainer's: a barrier, ``destroy_process_group``, then an exit
    without interpreter finalization, because DDP keeps the gloo backend's native threads alive past
    ``destroy_process_group`` (``losskit.train.runtime.teardown_runtime``)."""
    from losskit.train.runtime import Runtime, exit_process, native_threads_left, teardown_runtime

    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    rt = Runtime(torch.device("cpu"), None, rank, world, owns_group=True)
    finished = False
    try:
        loss, grads, logged = _step(rank, world, 4)
        if rank == 0:
            torch.save({"loss": loss, "grads": grads, "logged": logged}, out)
        finished = True
    finally:
        teardown_runtime(rt, synchronize=finished)
    assert native_threads_left()
    exit_process(0)


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    loss, grads, _logged = _step(0, 1, 8)
    # rank 0's logged loss is share x world averaged over ranks = the whole step loss
    assert ddp["logged"]["train/loss"] == pytest.approx(float(loss), rel=1e-10)
    for a, b in zip(ddp["grads"], grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # metrics are the mean over ranks: the probe is 0 on rank 0 and 1 on rank 1
    assert ddp["logged"]["probe/rank"] == pytest.approx(0.5)
    assert "loss_modifiers/MaskRatioWeightModifier.mean_weight" in ddp["logged"]


@pytest.mark.parametrize("code", [0, 3])
def test_exit_process_flushes_and_keeps_the_exit_code(code):
    import subprocess
    import sys

    script = ("import sys; from losskit.train.runtime import exit_process; sys.stdout.write('out'); "
              f"sys.stderr.write('err'); exit_process({code})")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (code, "out", "err")
