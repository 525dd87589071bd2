"""The "Custom Loss Functions Guide" of the Tinkerbell client, run against ``losskit serve``.

Start a server (``losskit serve``; it plays the role of the guide's ``python src/app.py``), then run
``python examples/quickstart.py [--url http://localhost:8000]``.

The guide's code runs as written. Two lines differ: the import (``from losskit.client import ...`` instead of
``from tinker_client import ...``) and ``hf_backend = client``; the URL comes from ``--url``. Where the guide leaves
``...`` for the reader (the training data, the bodies of ``loss_a``/``loss_b``), this script fills in the
smallest real thing. ``loss_fn_inputs={"target_tokens": ...}`` is kept as written: ``...`` tells the client to
let the server derive the targets from the rows.
"""

from __future__ import annotations

import argparse
import json

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Custom losses travel as data, not as code.",
    "A LoRA adapter trains a small set of weights.",
    "Every diagnostic comes back as a float.",
]


def main(url: str = "http://localhost:8000") -> dict:
    from losskit.client import TinkerClient, custom_loss, LossFnOutput  # noqa: I001 - the guide's import order
    import torch

    results: dict = {}

    # ---- Quick Start ----------------------------------------------------------------------------------------
    # 1. Create a client
    client = TinkerClient(url)
    hf_backend = client
    training_data = [list(text.encode()) for text in TRAINING_TEXT]

    # 2. Define your custom loss with the @custom_loss decorator
    @custom_loss(client, name="my_custom_loss")
    def my_loss(model_outputs, loss_fn_inputs, attention_mask):
        # Your custom loss logic here
        target_tokens = loss_fn_inputs["target_tokens"]

        log_probs = torch.nn.functional.log_softmax(model_outputs, dim=-1)
        target_logprobs = log_probs.gather(
            dim=-1,
            index=target_tokens.unsqueeze(-1)
        ).squeeze(-1)

        loss = (-target_logprobs * attention_mask).sum()

        return LossFnOutput(
            loss=loss,
            logprobs=target_logprobs,
            diagnostics={"loss": loss.item()}
        )

    # 3. Use it in training!
    result = hf_backend.forward_backward(
        model_id="my-model",
        data=training_data,
        loss_fn="my_custom_loss",
        loss_fn_inputs={"target_tokens": ...}
    )
    results["quickstart"] = result

    # ---- Hyperparameters --------------------------------------------------------------------------------------
    @custom_loss(client, name="my_loss")
    def my_loss(model_outputs, loss_fn_inputs, attention_mask,  # noqa: F811 - the guide reuses the name
                temperature=0.07, weight_decay=0.01):
        # Use temperature and weight_decay in your loss computation
        log_probs = torch.nn.functional.log_softmax(model_outputs / (temperature * 10), dim=-1)
        target_logprobs = log_probs.gather(dim=-1, index=loss_fn_inputs["target_tokens"].unsqueeze(-1)).squeeze(-1)
        loss = (-target_logprobs * attention_mask).sum() + weight_decay * (model_outputs ** 2).mean()
        return LossFnOutput(loss=loss, logprobs=target_logprobs, diagnostics={"loss": loss.item()})

    results["hyperparameters"] = hf_backend.forward_backward(model_id="my-model", data=training_data,
                                                             loss_fn="my_loss", temperature=0.1)

    # ---- Multiple Custom Losses -------------------------------------------------------------------------------
    @custom_loss(client, name="loss_a")
    def loss_a(model_outputs, loss_fn_inputs, attention_mask):
        lp = torch.nn.functional.log_softmax(model_outputs, dim=-1)
        target = lp.gather(dim=-1, index=loss_fn_inputs["target_tokens"].unsqueeze(-1)).squeeze(-1)
        loss = (-target * attention_mask).sum()
        return LossFnOutput(loss=loss, logprobs=target, diagnostics={"loss": loss.item()})

    @custom_loss(client, name="loss_b")
    def loss_b(model_outputs, loss_fn_inputs, attention_mask):
        lp = torch.nn.functional.log_softmax(model_outputs, dim=-1)
        target = lp.gather(dim=-1, index=loss_fn_inputs["target_tokens"].unsqueeze(-1)).squeeze(-1)
        loss = (-target * attention_mask).sum() / attention_mask.sum()
        return LossFnOutput(loss=loss, logprobs=target, diagnostics={"loss": loss.item()})

    # Use either one in training
    result = hf_backend.forward_backward(model_id="my-model", data=training_data, loss_fn="loss_a")
    results["loss_a"] = result
    # or
    result = hf_backend.forward_backward(model_id="my-model", data=training_data, loss_fn="loss_b")
    results["loss_b"] = result

    # ---- Complex Diagnostics ----------------------------------------------------------------------------------
    @custom_loss(client, name="rich_diagnostics")
    def rich_diagnostics(model_outputs, loss_fn_inputs, attention_mask):
        log_probs = torch.nn.functional.log_softmax(model_outputs, dim=-1)
        targets = loss_fn_inputs["target_tokens"]
        logprobs = log_probs.gather(dim=-1, index=targets.unsqueeze(-1)).squeeze(-1)
        n = attention_mask.sum()
        loss = (-logprobs * attention_mask).sum() / n
        accuracy = ((model_outputs.argmax(dim=-1) == targets).float() * attention_mask).sum() / n
        perplexity = torch.exp(loss)
        mean_logprob = (logprobs * attention_mask).sum() / n
        std_logprob = (((logprobs - mean_logprob) ** 2 * attention_mask).sum() / n).sqrt()
        grad_norm = torch.linalg.vector_norm(logprobs * attention_mask)
        return LossFnOutput(
            loss=loss,
            logprobs=logprobs,
            diagnostics={
                "loss": loss.item(),
                "accuracy": accuracy.item(),
                "perplexity": perplexity.item(),
                "mean_logprob": mean_logprob.item(),
                "std_logprob": std_logprob.item(),
                "grad_norm": grad_norm.item(),
                # Any other metrics you want to track
            }
        )

    results["diagnostics"] = hf_backend.forward_backward(model_id="my-model", data=training_data,
                                                         loss_fn="rich_diagnostics")

    # ---- Listing Available Loss Functions ----------------------------------------------------------------------
    losses = client.list_loss_functions()

    print("Available loss functions:")
    for name in losses["available_loss_functions"]:
        print(f"  - {name}")
    results["losses"] = losses

    client.optim_step("my-model", learning_rate=1e-3)
    results["client"] = client
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://localhost:8000", help="the losskit serve URL")
    out = main(parser.parse_args().url)
    out.pop("client").close()
    print(json.dumps({k: v for k, v in out.items() if k != "losses"}, indent=1)[:2000])
