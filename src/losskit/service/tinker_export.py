"""``losskit export``: a ``tinker://`` checkpoint of ``losskit serve`` as a Hugging Face model directory.

``losskit export tinker://<run>/<weights|sampler_weights>/<name> OUT_DIR [--merge] [--state-dir DIR]
[--model NAME=DIR]`` reads the checkpoint from the server's state directory (``--state-dir``, else
``$LOSSKIT_STATE_DIR``, else the server's default) with the same checks as a load (strict path, file hashes,
expiry), resolves the run's base model as the server does (the built-in ``losskit/tiny-lm``, a ``--model NAME=DIR``
entry, an absolute local directory, a hub id already in the local cache; nothing is downloaded), applies the LoRA
adapter with ``peft`` and merges it into the base weights (in float32, then cast back to the base model's dtype).

OUT_DIR receives what ``save_pretrained`` writes for the merged model and the base model's tokenizer, plus
``losskit_export.json`` (the source path, base model and adapter hash). It loads offline with
``AutoModelForCausalLM.from_pretrained(OUT_DIR)``, gives the logits of the served model with that adapter, and
``losskit serve --model NAME=OUT_DIR`` serves it as a base model. Any other source (a ``losskit train`` run
directory) goes to the run-directory exporter.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import sys
import tempfile
import warnings

from losskit.contract import ConfigError
from losskit.service.checkpoints import StateDir, parse_path
from losskit.service.errors import ServiceError
from losskit.service.models import ModelRegistry, set_offline_environment
from losskit.service.settings import make_settings
from losskit.service.snapshots import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from losskit.train.export import (
    EXPORT_FILES,
    TINKER_SCHEME,
    build_parser,
    export_from_args,
    normal_permissions,
)

EXPORT_INFO = "losskit_export.json"


def export_checkpoint(path: str, out_dir: str | pathlib.Path, *, state_dir: str = "",
                      models: tuple[str, ...] | list[str] = ()) -> pathlib.Path:
    """Merge the LoRA checkpoint at ``path`` into its base model and write a Hugging Face directory.

    Args:
        path: ``tinker://<run>/<weights|sampler_weights>/<name>``.
        out_dir: the output directory (created if needed).
        state_dir: the server's state directory ("" = the server's default).
        models: ``NAME=DIR`` base models the server was given with ``--model``.

    Raises:
        ConfigError: a bad path or flag, a missing state directory, checkpoint or base model, a corrupted
            checkpoint (the message names which).
    """
    try:
        settings = make_settings(state_dir=state_dir, model=list(models))
        cp = parse_path(path)
        root = settings.resolved_state_dir
        if not (root / "runs").is_dir():
            raise ConfigError(f"SRC={path!r}: no losskit serve state directory at {str(root)!r} (pass --state-dir, "
                              "the --state-dir of the server that saved it)")
        state = StateDir(root)
        info = state.run_info(cp.run_id)
        if info is None:
            raise ServiceError("checkpoint_not_found", f"no checkpoint at {cp.uri} in {root}")
        files, meta = state.read(cp)
        source = ModelRegistry(settings).resolve(info.get("base_model"))
    except ServiceError as err:
        raise ConfigError(f"SRC={path!r}: {err.message}") from None
    set_offline_environment()
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(source.path, local_files_only=True, trust_remote_code=False)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    base = AutoModelForCausalLM.from_pretrained(source.path, local_files_only=True, trust_remote_code=False,
                                                dtype=torch.float32)
    with tempfile.TemporaryDirectory(prefix="losskit-export-") as adapter_dir:
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):  # the hash-verified bytes, in peft's format
            (pathlib.Path(adapter_dir) / name).write_bytes(files[name])
        try:
            with warnings.catch_warnings():  # peft asks transformers a deprecated question; nothing for the user
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
                merged = PeftModel.from_pretrained(base, adapter_dir, is_trainable=False).merge_and_unload()
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ConfigError(f"SRC={path!r}: the adapter does not fit its base model {source.name!r} ({exc})") \
                from None
    merged = merged.to(dtype).eval()
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(source.path, local_files_only=True, trust_remote_code=False)
    written = {pathlib.Path(p) for p in tokenizer.save_pretrained(out)}  # the base tokenizer's own file set
    written |= {p for pattern in EXPORT_FILES for p in out.glob(pattern)}
    record = {"source": cp.uri, "base_model": source.name, "checkpoint_seq_id": meta.get("seq_id"),
              "adapter_sha256": hashlib.sha256(files[ADAPTER_WEIGHTS]).hexdigest(), "merged": True,
              "dtype": str(dtype).removeprefix("torch.")}
    (out / EXPORT_INFO).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    normal_permissions(p for p in written if p.is_file())
    return out


def main(argv: list[str]) -> int:
    """``losskit export SRC OUT_DIR``: ``tinker://`` checkpoints here, run directories by the run exporter."""
    args = build_parser().parse_args(argv)
    if not args.src.startswith(TINKER_SCHEME):
        return export_from_args(args)
    try:
        export_checkpoint(args.src, args.out_dir, state_dir=args.state_dir, models=args.model)
    except ConfigError as exc:
        print(f"losskit export: error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {args.src} -> {args.out_dir} (adapter merged)")
    return 0
