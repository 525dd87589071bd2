"""Checkpoints: bitwise restore across a server restart, atomic writes (a crash leaves nothing visible), paths."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import httpx
import pytest
import torch

from losskit.client import RequestFailed, TinkerClient
from losskit.service.checkpoints import CheckpointPath, StateDir, parse_path
from losskit.service.errors import ServiceError
from losskit.service.server import BackgroundServer
from losskit.service.settings import make_settings
from tests.service.conftest import internal_id, served_url

ROWS = [list(b"checkpoints must be atomic"), list(b"and bitwise restorable!")]
FIXED = [list(b"a fixed evaluation batch")]


def _train(client, model, steps):
    for _ in range(steps):
        client.forward_backward(model, ROWS, "cross_entropy")
        client.optim_step(model, learning_rate=1e-3, weight_decay=0.01)


def test_checkpoint_restores_bitwise_across_a_restart(hf_home, tmp_path):
    state = str(tmp_path / "state")
    first = BackgroundServer(make_settings(port=0, state_dir=state)).start()
    try:
        with TinkerClient(first.url) as c:
            model = c.create_model("run", rank=8, seed=0)
            _train(c, model, 5)
            path = c.save_state(model, "ckpt")
            assert path.startswith("tinker://") and path.endswith("/weights/ckpt")
            logprobs = c.forward(model, FIXED, "cross_entropy")["loss_fn_outputs"]
            _train(c, model, 1)
            uninterrupted = first.engine.adapter_state(internal_id(c, model))
            with pytest.raises(RequestFailed) as info:
                c.save_state(model, "ckpt")
            assert info.value.code == "checkpoint_exists"
            c.save_state(model, "ckpt2")
            assert c.save_state(model, "ckpt2", overwrite=True).endswith("ckpt2")
    finally:
        first.stop()
    second = BackgroundServer(make_settings(port=0, state_dir=state)).start()
    try:
        with TinkerClient(second.url) as c:
            restored = c.load_state(path)
            assert c.forward(restored, FIXED, "cross_entropy")["loss_fn_outputs"] == logprobs  # bitwise
            _train(c, restored, 1)
            after = second.engine.adapter_state(internal_id(c, restored))
            for key, tensor in uninterrupted.items():
                assert torch.equal(after[key], tensor), key
            # loading into an existing model, without the optimizer state
            other = c.create_model("other", rank=8, seed=1)
            c.load_state(path, model_id=other, optimizer=False)
            assert c.forward(other, FIXED, "cross_entropy")["loss_fn_outputs"] == logprobs
            for bad in ("tinker://../weights/ckpt", "tinker://a/weights/ckpt/extra", "file:///etc/passwd",
                        "tinker://a/other/ckpt", "tinker://a/weights/..", "tinker://a/weights/x%2F..%2F"):
                with pytest.raises(RequestFailed) as info:
                    c.load_state(bad)
                assert info.value.status == 400, bad
            with pytest.raises(RequestFailed) as info:
                c.load_state(path.replace("ckpt", "missing"))
            assert info.value.code == "checkpoint_not_found"
    finally:
        second.stop()


def test_corrupted_checkpoints_are_refused(hf_home, tmp_path, start_server):
    srv = start_server(state_dir=str(tmp_path / "s"))
    with TinkerClient(srv.url) as c:
        model = c.create_model("m", rank=4, seed=0)
        path = c.save_state(model, "c")
        folder = srv.service.state.checkpoint_dir(parse_path(path))
        data = bytearray((folder / "adapter_model.safetensors").read_bytes())
        data[-1] ^= 1
        (folder / "adapter_model.safetensors").write_bytes(bytes(data))
        with pytest.raises(RequestFailed) as info:
            c.load_state(path)
        assert info.value.code == "checkpoint_corrupted"


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_checkpoint_files_are_peft_format_and_json_only(hf_home, start_server, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    srv = start_server(state_dir=str(tmp_path / "s"))
    with TinkerClient(srv.url) as c:
        model = c.create_model("peft", rank=4, seed=0)
        _train(c, model, 1)
        path = c.save_state(model, "p")
        folder = srv.service.state.checkpoint_dir(parse_path(path))
        assert sorted(p.name for p in folder.iterdir()) == [
            "adapter_config.json", "adapter_model.safetensors", "meta.json", "optimizer.json", "optimizer.safetensors"]
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["seq_id"] == 3 and set(meta["files"]) == {"adapter_config.json", "adapter_model.safetensors",
                                                              "optimizer.json", "optimizer.safetensors"}
        base = AutoModelForCausalLM.from_pretrained("losskit/tiny-lm", local_files_only=True)
        peft_model = PeftModel.from_pretrained(base, folder).eval()
        with torch.no_grad():
            logits = peft_model(input_ids=torch.tensor([FIXED[0][:-1]])).logits.float()
        lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor([FIXED[0][1:]])[..., None])[0, :, 0]
        served = c.forward(model, FIXED, "cross_entropy")["loss_fn_outputs"][0]["logprobs"]
        torch.testing.assert_close(lp, torch.tensor(served), rtol=1e-5, atol=1e-5)
        sampler = c.save_weights_for_sampler(model, "s")
        out = c.sample(None, [257, 72, 105], model_path=sampler, max_tokens=4, temperature=0.0)
        live = c.sample(model, [257, 72, 105], max_tokens=4, temperature=0.0)
        assert out["sequences"][0]["tokens"] == live["sequences"][0]["tokens"]


def test_atomic_write_survives_a_crash_mid_write(tmp_path):
    root = tmp_path / "state"
    script = textwrap.dedent(f"""
        import os
        from losskit.service import checkpoints
        from losskit.service.checkpoints import CheckpointPath, StateDir
        written = []
        real = checkpoints._write_file
        def crash_after_one(path, data):
            if written:
                os._exit(9)  # the process dies between two files
            written.append(path)
            real(path, data)
        checkpoints._write_file = crash_after_one
        StateDir({str(root)!r}).write(CheckpointPath("run", "weights", "c"), {{"a": b"1", "b": b"2"}}, {{}},
                                      overwrite=False)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 9, result.stderr
    state = StateDir(root)
    assert not state.checkpoint_dir(CheckpointPath("run", "weights", "c")).exists()
    assert any(state.tmp.iterdir())  # the partial staging directory is there, but invisible
    assert state.clean_tmp() >= 1 and not any(state.tmp.iterdir())


def test_checkpoint_paths_are_strict():
    assert parse_path("tinker://sess_a.native.m/weights/c-1.x").name == "c-1.x"
    for bad in ("tinker://sess/weights", "tinker:///weights/c", "tinker://a/b/c/d", "tinker://../weights/c",
                "tinker://a/weights/.hidden", "tinker://a/weights/x/../y", "http://a/weights/c", None, 5):
        with pytest.raises(ServiceError):
            parse_path(bad)


@pytest.mark.slow
def test_killing_the_server_mid_save_leaves_no_partial_checkpoint(hf_home, tmp_path):
    state = tmp_path / "state"
    env = {**os.environ, "HF_HOME": str(hf_home), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "losskit", "serve", "--port", "0", "--state-dir", str(state), "--no-tinker-surface"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url, _ = served_url(proc, 180)
        assert url, "the server did not print its URL"
        c = TinkerClient(url)
        model = c.create_model("k", rank=8, seed=0)
        _train(c, model, 2)
        futures = [c.save_state_async(model, f"c{i}") for i in range(40)]
        time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    del futures
    sd = StateDir(state)
    for cp_dir in sorted(sd.runs.glob("*/weights/*")):
        cp = CheckpointPath(cp_dir.parent.parent.name, "weights", cp_dir.name)
        files, _ = sd.read(cp)  # every visible checkpoint is complete and verifies
        assert "adapter_model.safetensors" in files
    restarted = BackgroundServer(make_settings(port=0, state_dir=str(state))).start()
    try:
        assert not any((state / "tmp").iterdir())  # the next start empties tmp/
        with httpx.Client(base_url=restarted.url) as h:
            assert h.get("/healthz").status_code == 200
    finally:
        restarted.stop()
