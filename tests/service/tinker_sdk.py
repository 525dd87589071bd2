"""Helpers of the Tinker-surface tests: the unmodified ``tinker`` SDK as the client of a real server.

Importing this module turns the SDK's telemetry off (``TINKER_TELEMETRY=0``), as the acceptance checks ask.
"""

from __future__ import annotations

import contextlib
import os

os.environ["TINKER_TELEMETRY"] = "0"

import tinker
import torch
from tinker import types

from tests.service.conftest import SENTENCES


@contextlib.contextmanager
def service_client(url: str, api_key: str = "tml-test"):
    """A ``tinker.ServiceClient`` of the server at ``url``, closed (session finished) at the end."""
    client = tinker.ServiceClient(base_url=url, api_key=api_key)
    try:
        yield client
    finally:
        client.close("success").result(60)


def shifted(tokens: list[int], **inputs) -> types.Datum:
    """A pre-shifted datum: the model input is ``tokens[:-1]`` and position i predicts ``tokens[i + 1]``;
    ``weights`` default to ones; further inputs (per-token lists of length ``len(tokens) - 1``) are added."""
    n = len(tokens) - 1
    extra = {k: torch.tensor(v, dtype=torch.float32) if isinstance(v, list) else v for k, v in inputs.items()}
    loss_fn_inputs = {"target_tokens": tokens[1:], "weights": [1.0] * n, **extra}
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=loss_fn_inputs)


def sentence_data() -> list[types.Datum]:
    return [shifted(list(s.encode())) for s in SENTENCES]


def logprobs_of(result) -> list[list[float]]:
    return [list(o["logprobs"].data) for o in result.loss_fn_outputs]


def training_client(client, rank: int = 8, seed: int = 0, base_model: str = "losskit/tiny-lm"):
    return client.create_lora_training_client(base_model, rank=rank, seed=seed).result(120)
