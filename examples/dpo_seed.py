"""The guide's DPO example (``@custom_loss(client, name="dpo")``), as written, against ``losskit serve``.

Run ``python examples/dpo_seed.py [--url http://localhost:8000]`` with a server running.

The loss below is the guide's ``dpo_loss``, unchanged. Note what it computes: it scores ``chosen_tokens`` and
``rejected_tokens`` against the *same* logits, i.e. both responses are read as targets of one input row. For the
usual DPO, where chosen and rejected are different sequences, see ``examples/dpo_pairwise.py``.

The reference log-probabilities come from a forward pass of the same fresh model on the same rows, once with
``target_tokens`` set to the chosen tokens and once to the rejected ones, masked by the attention mask (neither
call shifts: the rows are model inputs as given). On that fresh model the loss is ln 2; a few steps lower it.
"""

from __future__ import annotations

import argparse
import math


def main(url: str = "http://localhost:8000", steps: int = 5) -> dict:
    from losskit.client import TinkerClient, custom_loss, LossFnOutput  # noqa: I001 - the guide's import order
    import torch

    client = TinkerClient(url)
    hf_backend = client

    @custom_loss(client, name="dpo")
    def dpo_loss(model_outputs, loss_fn_inputs, attention_mask, beta=0.1):
        """DPO loss for preference learning."""

        # Extract inputs
        chosen_tokens = loss_fn_inputs["chosen_tokens"]
        rejected_tokens = loss_fn_inputs["rejected_tokens"]
        ref_chosen_logprobs = loss_fn_inputs["reference_chosen_logprobs"]
        ref_rejected_logprobs = loss_fn_inputs["reference_rejected_logprobs"]

        # Compute log probs
        log_probs = torch.nn.functional.log_softmax(model_outputs, dim=-1)

        # Get log probs for chosen responses
        policy_chosen_logprobs = log_probs.gather(
            dim=-1,
            index=chosen_tokens.unsqueeze(-1)
        ).squeeze(-1)

        # Get log probs for rejected responses
        policy_rejected_logprobs = log_probs.gather(
            dim=-1,
            index=rejected_tokens.unsqueeze(-1)
        ).squeeze(-1)

        # Apply attention mask
        policy_chosen_logprobs = policy_chosen_logprobs * attention_mask
        policy_rejected_logprobs = policy_rejected_logprobs * attention_mask

        # Compute per-example scores
        num_tokens = attention_mask.sum(dim=1, keepdim=True).clamp(min=1)
        policy_chosen_score = policy_chosen_logprobs.sum(dim=1) / num_tokens.squeeze()
        policy_rejected_score = policy_rejected_logprobs.sum(dim=1) / num_tokens.squeeze()
        ref_chosen_score = ref_chosen_logprobs.sum(dim=1) / num_tokens.squeeze()
        ref_rejected_score = ref_rejected_logprobs.sum(dim=1) / num_tokens.squeeze()

        # DPO loss: -log sigmoid(beta * [policy_diff - ref_diff])
        policy_diff = policy_chosen_score - policy_rejected_score
        ref_diff = ref_chosen_score - ref_rejected_score
        logits = beta * (policy_diff - ref_diff)
        loss = -torch.nn.functional.logsigmoid(logits).mean()

        # Compute metrics
        reward_accuracy = (policy_diff > 0).float().mean()

        return LossFnOutput(
            loss=loss,
            logprobs=policy_chosen_logprobs,
            diagnostics={
                "loss": loss.item(),
                "reward_accuracy": reward_accuracy.item(),
                "mean_policy_diff": policy_diff.mean().item(),
            }
        )

    # The data: prompts as model inputs (the server pads them to one length and builds the attention mask), with a
    # preferred and a dispreferred token for every position (the response's bytes, repeated).
    prompts = ["Q: 2+2? A:", "Q: capital of France? A:", "Q: color of the sky? A:"]
    chosen = [" 4.", " Paris.", " blue."]
    rejected = [" 5.", " Rome.", " green."]
    preference_data = [list(p.encode()) for p in prompts]

    def per_position(texts):
        return [[list(t.encode())[i % len(t.encode())] for i in range(len(row))]
                for t, row in zip(texts, preference_data)]

    chosen_tok, rejected_tok = per_position(chosen), per_position(rejected)
    model_id = client.create_model("my-model", seed=0)

    def reference(tokens):
        # The logprobs of each row's real positions (the server trims the padding), i.e. masked.
        out = client.forward(model_id, preference_data, "cross_entropy", {"target_tokens": tokens})
        return [o["logprobs"] for o in out["loss_fn_outputs"]]

    ref_chosen, ref_rejected = reference(chosen_tok), reference(rejected_tok)

    # Use in training
    history = []
    for _ in range(steps):
        result = hf_backend.forward_backward(
            model_id="my-model",
            data=preference_data,
            loss_fn="dpo",
            loss_fn_inputs={
                "chosen_tokens": chosen_tok,
                "rejected_tokens": rejected_tok,
                "reference_chosen_logprobs": ref_chosen,
                "reference_rejected_logprobs": ref_rejected,
            }
        )
        history.append(result)
        client.optim_step(model_id, learning_rate=1e-2)
    final = client.forward(model_id, preference_data, "dpo",
                           {"chosen_tokens": chosen_tok, "rejected_tokens": rejected_tok,
                            "reference_chosen_logprobs": ref_chosen, "reference_rejected_logprobs": ref_rejected})
    print(f"DPO loss: {history[0]['loss']:.6f} (ln 2 = {math.log(2):.6f}) -> {final['loss']:.6f} after {steps} steps")
    return {"client": client, "history": history, "final": final, "data": preference_data,
            "inputs": {"chosen_tokens": chosen_tok, "rejected_tokens": rejected_tok,
                       "reference_chosen_logprobs": ref_chosen, "reference_rejected_logprobs": ref_rejected},
            "loss_fn": dpo_loss}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://localhost:8000", help="the losskit serve URL")
    parser.add_argument("--steps", type=int, default=5, help="training steps")
    args = parser.parse_args()
    main(args.url, args.steps)["client"].close()
