"""`losskit sample RUN_DIR --prompt TEXT`: generate text from a run's checkpoint (nanoGPT's sample.py)."""

from __future__ import annotations

import argparse
import sys

import torch

from losskit.train.tokenizer import BOS_ID, EOS_ID, decode, encode


def sample_text(run_dir: str, prompt: str, *, max_new_tokens: int = 200, temperature: float = 0.8,
                top_k: int | None = 50, seed: int = 1337) -> str:
    """The prompt followed by ``max_new_tokens`` sampled bytes (stops at ``</s>``)."""
    from losskit.train.export import load_run_model

    model, _ = load_run_model(run_dir)
    idx = torch.tensor([[BOS_ID] + encode(prompt)], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, stop_id=EOS_ID, generator=g)
    return decode(out[0, 1:].tolist())


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="losskit sample", description="Generate text from a trained run.")
    parser.add_argument("run_dir", help="a `losskit train` run directory (with ckpt.pt)")
    parser.add_argument("--prompt", default="", help="text to continue")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=50)
    parser.add_argument("--num_samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args(argv)
    try:
        for k in range(args.num_samples):
            text = sample_text(args.run_dir, args.prompt, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_k=args.top_k, seed=args.seed + k)
            print(text)
            if args.num_samples > 1:
                print("-" * 40)
    except FileNotFoundError as exc:
        print(f"losskit sample: error: {exc}", file=sys.stderr)
        return 2
    return 0
