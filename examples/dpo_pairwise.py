"""DPO over (chosen, rejected) pairs as a custom loss: rows 2i and 2i+1 are one pair.

Run ``python examples/dpo_pairwise.py [--url http://localhost:8000]`` with a server running.

Unlike the guide's ``dpo`` example (which scores both responses against one row's logits), each response here is
its own row, prompt + response. The server derives ``target_tokens`` from the rows (shift by one) and the
``weights`` mark the response tokens, so a row's sequence log-probability is ``Σ_t w_t·log p(y_t)``. The loss is
``functional.policy.dpo``'s formula written with allowlisted ops::

    margin = (π_chosen - π_rejected) - (ρ_chosen - ρ_rejected)
    loss = -Σ_pairs log σ(β · margin)

with ``ρ`` the reference sequence log-probabilities, computed once by a forward pass of the fresh model.
"""

from __future__ import annotations

import argparse
import math

PAIRS = [
    ("Q: 2+2? A:", " 4", " 5"),
    ("Q: capital of France? A:", " Paris", " Rome"),
    ("Q: color of the sky? A:", " blue", " green"),
    ("Q: opposite of hot? A:", " cold", " warm"),
]


def rows_and_weights(pairs):
    """Rows ``prompt + response`` (chosen then rejected) and weights 1 on the positions predicting the response."""
    rows, weights = [], []
    for prompt, chosen, rejected in pairs:
        p = list(prompt.encode())
        for response in (chosen, rejected):
            r = list(response.encode())
            rows.append(p + r)
            weights.append([0.0] * (len(p) - 1) + [1.0] * len(r))  # position t predicts rows[t + 1]
    return rows, weights


def main(url: str = "http://localhost:8000", steps: int = 5, beta: float = 0.1) -> dict:
    import torch

    from losskit.client import LossFnOutput, TinkerClient, custom_loss

    client = TinkerClient(url)

    @custom_loss(client, name="dpo_pairwise")
    def dpo_pairwise(model_outputs, loss_fn_inputs, attention_mask, beta=0.1):
        """DPO over row pairs (2i chosen, 2i+1 rejected): -sum log sigmoid(beta * margin)."""
        targets = loss_fn_inputs["target_tokens"]
        weights = loss_fn_inputs["weights"]
        reference = loss_fn_inputs["reference_logprobs"]  # [B]: one sequence logprob per row
        logprobs = torch.nn.functional.log_softmax(model_outputs, dim=-1)
        logprobs = logprobs.gather(dim=-1, index=targets.unsqueeze(-1)).squeeze(-1)
        sequence = (logprobs * weights).sum(dim=1)
        margin = (sequence[0::2] - sequence[1::2]) - (reference[0::2] - reference[1::2])
        loss = -torch.nn.functional.logsigmoid(beta * margin).sum()
        return LossFnOutput(loss=loss, logprobs=logprobs, diagnostics={
            "loss": loss.item(),
            "reward_accuracy": (margin > 0).float().mean().item(),
            "margin": margin.mean().item(),
        })

    rows, weights = rows_and_weights(PAIRS)
    model_id = client.create_model("pairwise", seed=0)
    ref = client.forward(model_id, rows, "cross_entropy", {"weights": weights})
    reference = [sum(lp * w for lp, w in zip(o["logprobs"], ws)) for o, ws in zip(ref["loss_fn_outputs"], weights)]
    inputs = {"weights": weights, "reference_logprobs": reference}
    history = []
    for _ in range(steps):
        history.append(client.forward_backward(model_id, rows, "dpo_pairwise", inputs, beta=beta))
        client.optim_step(model_id, learning_rate=1e-2)
    final = client.forward(model_id, rows, "dpo_pairwise", inputs, beta=beta)
    pairs = len(PAIRS)
    print(f"pairwise DPO loss: {history[0]['loss']:.6f} ({pairs} x ln 2 = {pairs * math.log(2):.6f}) -> "
          f"{final['loss']:.6f}; reward accuracy {final['metrics']['reward_accuracy']:.2f}")
    return {"client": client, "history": history, "final": final, "rows": rows, "weights": weights,
            "reference": reference, "model_id": model_id}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://localhost:8000", help="the losskit serve URL")
    parser.add_argument("--steps", type=int, default=5, help="training steps")
    args = parser.parse_args()
    main(args.url, args.steps)["client"].close()
