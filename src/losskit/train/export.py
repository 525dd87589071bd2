"""`losskit export SRC OUT_DIR`: a trained lm run as a Hugging Face `LlamaForCausalLM` directory.

SRC is a `losskit train` run directory (its ``ckpt.pt``) or a task folder such as ``out/lm`` (its latest run).
OUT_DIR receives ``config.json``, ``model.safetensors``, ``generation_config.json`` and the byte-level tokenizer
(``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``), loadable offline with
``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` and ``AutoTokenizer.from_pretrained(OUT_DIR)``. The project
model's state dict maps 1:1 onto LlamaForCausalLM, so export is a key-for-key copy (no conversion), and the
tokenizer prepends ``<s>`` as training and ``losskit sample`` do: greedy ``generate`` on the export continues a
prompt exactly as ``losskit sample --temperature=0``. Written files get the permissions of any new file
(``0666`` minus the umask), whatever the writing library chose.

``tinker://`` sources name LoRA checkpoints of the training service (``losskit serve``). ``losskit export`` hands
them to the service's exporter, which merges the adapter into its base model; this module, in the layer below the
service, only parses the shared command line (``build_parser``) and refuses such a source when it is called
directly.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

from losskit.contract import ConfigError
from losskit.train.checkpoint import CHECKPOINT, load_checkpoint
from losskit.train.model import LlamaLM, ModelConfig, hf_llama_config_dict
from losskit.train.rundir import find_run_dir
from losskit.train.tokenizer import save_hf_tokenizer

TINKER_SCHEME = "tinker://"
#: What an export writes (glob patterns; large models are sharded into model-*.safetensors plus an index).
EXPORT_FILES = ("config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def check_export_source(src: str) -> None:
    """Reject a ``tinker://`` checkpoint path with a ``ConfigError`` naming what to export instead."""
    if src.startswith(TINKER_SCHEME):
        raise ConfigError(
            f"SRC={src!r}: tinker:// checkpoints of the training service are exported by `losskit export` (with "
            "the serve extra installed), not by this run-directory exporter; pass a run directory here instead "
            "(an out_dir of `losskit train`, holding ckpt.pt)"
        )


def load_run_model(run_dir: str | pathlib.Path) -> tuple[LlamaLM, dict]:
    """The model of a run directory's ``ckpt.pt`` (eval mode, CPU) and the checkpoint dict.

    ``run_dir`` may also be a task folder such as ``out/lm``: its latest run is used.
    """
    ckpt = load_checkpoint(find_run_dir(run_dir) / CHECKPOINT, required=("model", "model_config"))
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
    normal_permissions(p for pattern in EXPORT_FILES for p in out.glob(pattern))
    return out


def normal_permissions(paths) -> None:
    """``0666 & ~umask`` on the files this export wrote (safetensors creates ``model.safetensors`` as 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in paths:
        os.chmod(path, 0o666 & ~umask)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``losskit export`` (both kinds of source)."""
    parser = argparse.ArgumentParser(
        prog="losskit export",
        description="Write a trained model in Hugging Face format, loadable offline with AutoModelForCausalLM: a "
        "`losskit train` run as LlamaForCausalLM with the byte-level tokenizer of losskit/tiny-lm, or a tinker:// "
        "LoRA checkpoint of `losskit serve` merged into its base model (with the base model's tokenizer).",
    )
    parser.add_argument("src", help="a `losskit train` run directory, a task folder such as out/lm (its latest "
                        "run), or a checkpoint path tinker://<run>/<weights|sampler_weights>/<name> of losskit serve")
    parser.add_argument("out_dir", help="output directory")
    parser.add_argument("--merge", action="store_true",
                        help="merge the LoRA adapter into the base weights; tinker:// checkpoints are always written "
                        "merged (a LoRA adapter alone is not a standalone model), and a run directory has no adapter")
    parser.add_argument("--state-dir", metavar="DIR", default="",
                        help="tinker:// sources: the state directory of losskit serve (default: as losskit serve, "
                        "$LOSSKIT_STATE_DIR or losskit under the XDG data directory)")
    parser.add_argument("--model", metavar="NAME=DIR", action="append", default=[],
                        help="tinker:// sources: a base model the server knew as --model NAME=DIR (repeatable)")
    return parser


def export_from_args(args: argparse.Namespace) -> int:
    """Export a run directory as ``args`` say (exit code; errors go to stderr)."""
    try:
        check_export_source(args.src)
        export_run(args.src, args.out_dir)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"losskit export: error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {args.src} -> {args.out_dir}")
    return 0


def main(argv: list[str]) -> int:
    """The run-directory exporter's entry point."""
    return export_from_args(build_parser().parse_args(argv))
