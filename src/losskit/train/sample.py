"""`losskit sample RUN_DIR --prompt TEXT`: generate text from a run's checkpoint (nanoGPT's sample.py).

RUN_DIR is a run directory or a task folder (``out/lm``: its latest run). The model is fed ``<s>`` and the
prompt's bytes, exactly what the exported Hugging Face tokenizer produces for ``tok(prompt)``, so
``--temperature=0`` (greedy) gives the same continuation as ``model.generate(**tok(prompt), do_sample=False)`` on
the export.
"""

from __future__ import annotations

import argparse
import sys

import torch

from losskit.contract import ConfigError
from losskit.train.tokenizer import EOS_ID, decode, prompt_ids


def generate_ids(run_dir: str, prompt: str, *, max_new_tokens: int = 200, temperature: float = 0.8,
                 top_k: int | None = 50, seed: int = 1337) -> list[int]:
    """The ids after the prompt: at most ``max_new_tokens``, ending early with ``</s>`` (which is included).

    ``temperature=0`` is greedy (argmax); otherwise softmax sampling from the ``top_k`` largest logits with a
    generator seeded by ``seed``.
    """
    from losskit.train.export import load_run_model

    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")
    model, _ = load_run_model(run_dir)
    idx = torch.tensor([prompt_ids(prompt)], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, stop_id=EOS_ID, generator=g)
    return out[0, idx.shape[1]:].tolist()


def sample_text(run_dir: str, prompt: str, **options) -> str:
    """The prompt followed by the generated text (``generate_ids``; special ids are not printed)."""
    return decode(prompt_ids(prompt) + generate_ids(run_dir, prompt, **options))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="losskit sample", description="Generate text from a trained lm run.")
    parser.add_argument("run_dir", help="a run directory, or a task folder such as out/lm (its latest run)")
    parser.add_argument("--prompt", default="", help="text to continue")
    parser.add_argument("--max_new_tokens", type=int, default=200, help="at most this many new bytes (200)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (0.8)")
    parser.add_argument("--top_k", type=int, default=50, help="sample from the k most likely bytes (50)")
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
    except (ConfigError, FileNotFoundError) as exc:
        print(f"losskit sample: error: {exc}", file=sys.stderr)
        return 2
    return 0
