"""tinker-cookbook's supervised trainer against losskit, offline: ``supervised/train.py``'s ``Config`` with the
``role_colon`` renderer and the cookbook's own conversations JSONL runs 3 steps on ``losskit/tiny-lm``, reads
``loss_fn_outputs[i]["logprobs"]`` and the optim metrics, and its final ``save_state`` and
``save_weights_for_sampler`` succeed.

tinker-cookbook 0.6.1 declares ``tml-renderers>=0.4.1``, which the package index does not have; the supervised
path never imports it, so ``make setup`` installs the cookbook without its dependencies (they are in the dev
extra). ``recipes/sl_basic.py`` is not used: it hard-codes a hub dataset and a renderer lookup by model name.
"""

import asyncio
import importlib.resources
import json
import logging
import math

import chz
import huggingface_hub.constants
import pytest
from tinker_cookbook.supervised import train

from losskit.service.checkpoints import parse_path
from losskit.service.models import hub_cache_dir


@pytest.fixture
def root_logging():
    """The cookbook replaces the root logger's handlers (pytest's among them); put them back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


def test_cookbook_supervised_trainer_runs_three_steps(server, tmp_path, monkeypatch, root_logging):
    monkeypatch.setenv("TINKER_API_KEY", "tml-test")  # the SDK refuses keys without the tml- prefix
    # The cookbook loads AutoTokenizer.from_pretrained("losskit/tiny-lm"): the server materialised it into this
    # session's HF cache, which huggingface_hub (imported before the cache fixture ran) must read, offline.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache_dir()))
    conversations = importlib.resources.files("tinker_cookbook") / "example_data" / "conversations.jsonl"
    log_path = tmp_path / "run"
    argv = [
        f"base_url={server.url}", "model_name=losskit/tiny-lm", "recipe_name=losskit_smoke",
        "renderer_name=role_colon", "lora_rank=8", "max_steps=3", f"log_path={log_path}",
        "dataset_builder=tinker_cookbook.supervised.data:FromConversationFileBuilder",
        f"dataset_builder.file_path={conversations}",
        "dataset_builder.common_config.model_name_for_tokenizer=losskit/tiny-lm",
        "dataset_builder.common_config.renderer_name=role_colon",
        "dataset_builder.common_config.max_length=1024", "dataset_builder.common_config.batch_size=4",
    ]
    # train.py's __main__ block is broken in 0.6.1; this is how its own CLI helper runs it.
    asyncio.run(train.main(chz.Blueprint(train.Config).make_from_argv(argv)))

    rows = [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train_mean_nll" in r]
    assert [r["step"] for r in steps] == [0, 1, 2]
    for r in steps:  # the NLL comes from the returned logprobs, grad_norm from the optim_step metrics
        assert math.isfinite(r["train_mean_nll"]) and 4 < r["train_mean_nll"] < 7  # ~ln(264) = 5.58 untrained
        assert r["grad_norm"] > 0 and r["num_sequences"] == 4
    final = [json.loads(line) for line in (log_path / "checkpoints.jsonl").read_text().splitlines()][-1]
    assert final["name"] == "final"
    state, sampler = parse_path(final["state_path"]), parse_path(final["sampler_path"])
    assert (state.kind, state.name, sampler.kind, sampler.name) == ("weights", "final", "sampler_weights", "final")
    for cp in (state, sampler):
        assert (server.service.state.checkpoint_dir(cp) / "adapter_model.safetensors").is_file()
