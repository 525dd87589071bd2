"""`losskit export SRC OUT_DIR [--merge]`: a trained run as a Hugging Face `LlamaForCausalLM` directory.

SRC is a `losskit train` run directory (its ``ckpt.pt``). ``tinker://`` paths (spec/service.md §3, §10) name
checkpoints of the training service (``losskit serve``), which this version does not include: they are
rejected with a ``ConfigError`` that says so (the train layer must not import the service layer). OUT_DIR receives ``config.json``,
``model.safetensors``, ``generation_config.json`` and the byte-level tokenizer of ``losskit/tiny-lm``
(``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``), loadable offline with
``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` and ``AutoTokenizer.from_pretrained(OUT_DIR)``. The project
model's state dict maps 1:1 onto LlamaForCausalLM, so export is a key-for-key copy (no conversion).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

from losskit.contract import ConfigError
from losskit.train.model import LlamaLM, ModelConfig, hf_llama_config_dict
from losskit.train.tokenizer import save_hf_tokenizer

TINKER_SCHEME = "tinker://"


def check_export_source(src: str) -> None:
    """Reject a ``tinker://`` checkpoint path with a ``ConfigError`` naming what to export instead."""
    if src.startswith(TINKER_SCHEME):
        raise ConfigError(
            f"SRC={src!r}: tinker:// checkpoints are exported by the training service (losskit serve), which "
            "this version does not include; export a run directory instead (an out_dir of `losskit train`, "
            "holding ckpt.pt)"
        )


def load_run_model(run_dir: str | pathlib.Path) -> tuple[LlamaLM, dict]:
    """The model of a run directory's ``ckpt.pt`` (eval mode, CPU) and the checkpoint dict."""
    path = pathlib.Path(run_dir) / "ckpt.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a `losskit train` run directory with a checkpoint")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = LlamaLM(ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def export_run(run_dir: str | pathlib.Path, out_dir: str | pathlib.Path) -> pathlib.Path:
    """Write the run's model and tokenizer into ``out_dir`` in LlamaForCausalLM format."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model, _ = load_run_model(run_dir)
    hf = LlamaForCausalLM(LlamaConfig(**hf_llama_config_dict(model.config)))
    hf.load_state_dict(model.state_dict(), strict=True)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out, safe_serialization=True)
    save_hf_tokenizer(out, model_max_length=model.config.block_size)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="losskit export",
        description="Write a trained model in Hugging Face LlamaForCausalLM format with the byte-level tokenizer "
        "of losskit/tiny-lm (config.json, model.safetensors, tokenizer files).",
    )
    parser.add_argument("src", help="a `losskit train` run directory (tinker:// paths need the training service, "
                        "not included in this version)")
    parser.add_argument("out_dir", help="output directory")
    parser.add_argument("--merge", action="store_true",
                        help="tinker:// LoRA checkpoints: merge the adapter (no effect on a run directory)")
    args = parser.parse_args(argv)
    try:
        check_export_source(args.src)
        export_run(args.src, args.out_dir)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"losskit export: error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {args.src} -> {args.out_dir}")
    return 0
