"""Checkpoints through the unmodified Tinker SDK: ``save_state`` / ``save_weights_for_sampler`` / ``load_state``
with ``tinker://`` paths, a bitwise restore across a server restart (``create_training_client_from_state`` with and
without the optimizer), the REST view of runs and checkpoints, and ``losskit export tinker://...`` (the merged
model loads offline with transformers, gives the served logits and is served again with ``--model``)."""

import json

import pytest
import torch

from losskit.cli import main as losskit
from losskit.service.server import BackgroundServer
from losskit.service.settings import make_settings
from tests.service.tinker_sdk import (
    logprobs_of,
    sentence_data,
    service_client,
    shifted,
    tinker,
    training_client,
    types,
)

FIXED = [shifted(list(b"a fixed evaluation batch")), shifted(list(b"and a second row"))]


def _train(tc, steps, data=None):
    data = data or sentence_data()[:4]
    for _ in range(steps):
        tc.forward_backward(data, "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=1e-2, weight_decay=0.01)).result(60)


def _hf_logprobs(model, datums):
    """Per-token logprobs of the targets under a plain transformers model (pre-shifted datums)."""
    out = []
    with torch.no_grad():
        for d in datums:
            ids = torch.tensor([d.model_input.to_ints()])
            logp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)[0]
            targets = torch.tensor(d.loss_fn_inputs["target_tokens"].data)
            out.append(logp.gather(-1, targets[:, None])[:, 0].tolist())
    return out


def _max_diff(a, b):
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


@pytest.mark.slow
def test_checkpoints_restore_bitwise_across_a_restart_and_export(hf_home, tmp_path, monkeypatch):
    state = str(tmp_path / "state")
    first = BackgroundServer(make_settings(port=0, state_dir=state)).start()
    try:
        with service_client(first.url) as sdk:
            tc = training_client(sdk)
            _train(tc, 5)
            saved = tc.save_state("ckpt").result(60)
            run_id = tc.model_id.replace(":", ".")
            assert saved.path == f"tinker://{run_id}/weights/ckpt"
            sampler_path = tc.save_weights_for_sampler("for-sampling").result(60).path
            assert sampler_path == f"tinker://{run_id}/sampler_weights/for-sampling"
            logprobs = logprobs_of(tc.forward(FIXED, "cross_entropy").result(60))
            _train(tc, 1)
            uninterrupted = first.engine.adapter_state(tc.model_id)
            with pytest.raises(tinker.RequestFailedError) as info:
                tc.save_state("ckpt").result(60)
            assert "exists" in str(info.value) and info.value.category.value == "user"

            other = training_client(sdk, seed=1)  # load into an existing model: weights only, then with Adam
            with pytest.warns(FutureWarning):  # deprecated in the SDK, still sent as load_weights
                other.load_state(saved.path).result(60)
            assert logprobs_of(other.forward(FIXED, "cross_entropy").result(60)) == logprobs
            with pytest.warns(FutureWarning):
                other.load_state_with_optimizer(saved.path).result(60)
            _train(other, 1)
            for key, tensor in uninterrupted.items():
                assert torch.equal(first.engine.adapter_state(other.model_id)[key], tensor), key

            rest = tinker.RestClient(base_url=first.url, api_key="tml-test")
            run = rest.get_training_run(run_id).result(60)
            assert (run.base_model, run.lora_rank, run.is_lora) == ("losskit/tiny-lm", 8, True)
            assert run.last_checkpoint.tinker_path == saved.path
            assert run.last_sampler_checkpoint.tinker_path == sampler_path
            listed = rest.list_checkpoints(run_id).result(60).checkpoints
            assert {c.tinker_path: c.checkpoint_type for c in listed} == {saved.path: "training",
                                                                          sampler_path: "sampler"}
            assert all(c.size_bytes > 0 for c in listed)
            info = rest.get_weights_info_by_tinker_path(saved.path).result(60)
            assert (info.base_model, info.lora_rank) == ("losskit/tiny-lm", 8)
    finally:
        first.stop()

    # losskit export: the merged model gives the served logprobs, offline, with plain transformers
    monkeypatch.setenv("LOSSKIT_STATE_DIR", state)
    out = tmp_path / "merged"
    assert losskit(["export", saved.path, str(out), "--merge"]) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert _max_diff(_hf_logprobs(merged, FIXED), logprobs) < 1e-5
    assert not (out / "adapter_config.json").exists()  # a standalone model, not an adapter
    assert AutoTokenizer.from_pretrained(out, local_files_only=True).encode("hi", add_special_tokens=False) == \
        [104, 105]
    record = json.loads((out / "losskit_export.json").read_text())
    assert record["source"] == saved.path and record["base_model"] == "losskit/tiny-lm"

    second = BackgroundServer(make_settings(port=0, state_dir=state, model=[f"my-lm={out}"])).start()
    try:
        with service_client(second.url) as sdk:
            restored = sdk.create_training_client_from_state_with_optimizer(saved.path).result(120)
            assert logprobs_of(restored.forward(FIXED, "cross_entropy").result(60)) == logprobs  # bitwise
            _train(restored, 1)
            after = second.engine.adapter_state(restored.model_id)
            for key, tensor in uninterrupted.items():
                assert torch.equal(after[key], tensor), key
            weights_only = sdk.create_training_client_from_state(saved.path).result(120)
            assert logprobs_of(weights_only.forward(FIXED, "cross_entropy").result(60)) == logprobs
            sampler = sdk.create_sampling_client(model_path=sampler_path).result(60)  # saved with "ckpt"
            prompt = types.ModelInput.from_ints(list(b"a fixed evaluation batch"))
            assert sampler.compute_logprobs(prompt).result(60)[1:] == pytest.approx(logprobs[0], abs=1e-5)
            # the export served as a base model: a fresh adapter on it (B = 0) is the merged model
            on_export = training_client(sdk, base_model="my-lm")
            served = logprobs_of(on_export.forward(FIXED, "cross_entropy").result(60))
            assert _max_diff(served, logprobs) < 1e-5
            with pytest.raises(tinker.NotFoundError):
                sdk.create_training_client_from_state(saved.path.replace("ckpt", "missing")).result(60)
    finally:
        second.stop()


def test_export_errors_name_the_problem(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LOSSKIT_STATE_DIR", raising=False)
    empty = tmp_path / "no-state"
    assert losskit(["export", "tinker://run-1/weights/final", str(tmp_path / "o"), "--state-dir", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "no losskit serve state directory" in err and "--state-dir" in err
    (empty / "runs").mkdir(parents=True)
    assert losskit(["export", "tinker://run-1/weights/final", str(tmp_path / "o"), "--state-dir", str(empty)]) == 2
    assert "no checkpoint at tinker://run-1/weights/final" in capsys.readouterr().err
    assert losskit(["export", "tinker://../weights/x", str(tmp_path / "o"), "--state-dir", str(empty)]) == 2
    assert "no '..'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert losskit(["export", str(tmp_path), str(tmp_path / "o")]) == 2  # a run directory: the run exporter
    assert "ckpt.pt" in capsys.readouterr().err
