"""The offline model layer: the built-in ``losskit/tiny-lm``, ``--model NAME=DIR`` entries, local HF directories.

``losskit/tiny-lm`` is a ``LlamaForCausalLM`` (hidden 64, 2 layers, 4 heads, 2 KV heads, intermediate 176, 1024
positions, untied unembedding; 126,272 parameters) with the byte-level tokenizer of ``losskit train`` (ids 0-255
bytes, 256 ``<pad>``, 257 ``<s>``, 258 ``</s>``, vocabulary 264) and a plain-text chat template
(``<|user|>``/``<|assistant|>`` markers, EOS closing each assistant turn). Its float32 weights come from a fixed
seed (normal, std 0.02, the project's ``LlamaLM`` initialisation on CPU), so with the same torch version every
regeneration writes identical bytes; ``losskit_meta.json`` records the SHA-256 of every file.

It is written into the standard Hugging Face hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``) as the repo
``losskit/tiny-lm``: ``refs/main`` names a content-hash revision under ``snapshots/``. So
``AutoTokenizer.from_pretrained("losskit/tiny-lm")`` resolves offline, on the server and on a client sharing the
machine. Nothing in this module downloads: the server sets ``HF_HUB_OFFLINE=1`` before transformers is imported
and loads with ``local_files_only=True`` and ``trust_remote_code=False``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import tempfile

import torch

from losskit.service.errors import ServiceError
from losskit.service.settings import TINY_LM, ServeSettings

META_FILE = "losskit_meta.json"
TINY_LM_SEED = 0
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def set_offline_environment() -> None:
    """Make every Hugging Face library resolve from local files only (set before transformers is imported)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def hub_cache_dir() -> pathlib.Path:
    """The hub cache the HF libraries read: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return pathlib.Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or str(pathlib.Path.home() / ".cache" / "huggingface")
    return pathlib.Path(home) / "hub"


def _repo_dir(repo_id: str, cache: pathlib.Path) -> pathlib.Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def _sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny_lm_model_config():
    """The project ``ModelConfig`` of ``losskit/tiny-lm``."""
    from losskit.train.model import ModelConfig, swiglu_hidden_size

    return ModelConfig(vocab_size=264, block_size=1024, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                       intermediate_size=swiglu_hidden_size(64))


def write_tiny_lm(out_dir: pathlib.Path) -> dict[str, str]:
    """Generate ``losskit/tiny-lm`` into ``out_dir``; returns ``{file: sha256}`` (also written to the meta file)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from losskit.train.model import LlamaLM, hf_llama_config_dict
    from losskit.train.tokenizer import save_hf_tokenizer

    cfg = tiny_lm_model_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_LM_SEED)
        project = LlamaLM(cfg)
    hf = LlamaForCausalLM(LlamaConfig(**hf_llama_config_dict(cfg)))
    hf.load_state_dict(project.state_dict(), strict=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out_dir, safe_serialization=True)
    save_hf_tokenizer(out_dir, model_max_length=cfg.block_size)
    tok_cfg_path = out_dir / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["chat_template"] = CHAT_TEMPLATE
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
    hashes = {p.name: _sha256(p) for p in sorted(out_dir.iterdir()) if p.is_file() and p.name != META_FILE}
    meta = {"model": TINY_LM, "seed": TINY_LM_SEED, "torch": torch.__version__, "files": hashes}
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return hashes


def _snapshot_ok(snapshot: pathlib.Path) -> bool:
    try:
        meta = json.loads((snapshot / META_FILE).read_text())
        return all(_sha256(snapshot / name) == digest for name, digest in meta["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def materialize_tiny_lm(cache: pathlib.Path | None = None) -> pathlib.Path:
    """The snapshot directory of ``losskit/tiny-lm`` in the hub cache, generating it on first use.

    An existing snapshot whose files match its meta hashes is reused; otherwise the model is generated into a
    temporary directory beside the cache entry and renamed into ``snapshots/<revision>`` (the revision is a content
    hash of the files), then ``refs/main`` is written. Concurrent starts are safe: a rename onto an existing
    complete snapshot is skipped.
    """
    cache = cache or hub_cache_dir()
    repo = _repo_dir(TINY_LM, cache)
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshot = repo / "snapshots" / ref.read_text().strip()
        if _snapshot_ok(snapshot):
            return snapshot
    repo.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".tmp-", dir=repo))
    try:
        hashes = write_tiny_lm(staging)
        revision = hashlib.sha1("".join(f"{k}:{v}\n" for k, v in sorted(hashes.items())).encode()).hexdigest()
        snapshot = repo / "snapshots" / revision
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        if not _snapshot_ok(snapshot):
            if snapshot.exists():
                shutil.rmtree(snapshot)
            os.replace(staging, snapshot)
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp_ref = ref.with_name(f".main-{os.getpid()}")
        tmp_ref.write_text(revision)
        os.replace(tmp_ref, ref)
        return snapshot
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A resolved base model: its public name and the local directory it loads from."""

    name: str
    path: pathlib.Path
    source: str  # builtin | flag | directory | hub_cache


def _cached_hub_snapshot(repo_id: str) -> pathlib.Path | None:
    if repo_id.count("/") != 1 or any(part in ("", ".", "..") for part in repo_id.split("/")):
        return None
    repo = _repo_dir(repo_id, hub_cache_dir())
    ref = repo / "refs" / "main"
    if not ref.is_file():
        return None
    snapshot = repo / "snapshots" / ref.read_text().strip()
    return snapshot if (snapshot / "config.json").is_file() else None


class ModelRegistry:
    """Resolves ``base_model`` names (first match wins): the built-in ``losskit/tiny-lm``, a ``--model NAME=DIR``
    entry, a local directory in HF format, a hub id already in the local HF cache."""

    def __init__(self, settings: ServeSettings) -> None:
        self.flag_models = dict(settings.models)
        for name, path in self.flag_models.items():
            if not (pathlib.Path(path) / "config.json").is_file():
                raise ServiceError("unknown_base_model", f"--model {name}={path}: no config.json in that directory "
                                   "(expected a Hugging Face model directory, e.g. written by losskit export)")
        self._tiny: pathlib.Path | None = None

    def tiny_lm(self) -> pathlib.Path:
        if self._tiny is None:
            self._tiny = materialize_tiny_lm()
        return self._tiny

    def known(self) -> list[str]:
        return [TINY_LM, *self.flag_models]

    def resolve(self, name: str) -> ModelSource:
        if not isinstance(name, str) or not name:
            raise ServiceError("unknown_base_model", f"base_model must be a model name, got {name!r}")
        if name == TINY_LM:
            return ModelSource(name, self.tiny_lm(), "builtin")
        if name in self.flag_models:
            return ModelSource(name, pathlib.Path(self.flag_models[name]), "flag")
        path = pathlib.Path(name)
        if path.is_absolute() and (path / "config.json").is_file():
            return ModelSource(name, path, "directory")
        cached = _cached_hub_snapshot(name)
        if cached is not None:
            return ModelSource(name, cached, "hub_cache")
        raise ServiceError(
            "unknown_base_model",
            f"base_model {name!r} is not known (known: {', '.join(self.known())}; also an absolute path to a "
            "local Hugging Face model directory, or a hub id already in the local HF cache; nothing is downloaded)",
            detail={"argument": "base_model", "known": self.known()},
        )


@dataclasses.dataclass(frozen=True)
class BaseInfo:
    """What the request path needs of a base model without its weights: tokenizer, vocabulary, context, ids."""

    name: str
    path: pathlib.Path
    tokenizer: object
    vocab_size: int
    max_context: int
    eos_id: int | None
    pad_id: int
    architecture: str


def load_base_info(source: ModelSource) -> BaseInfo:
    """Tokenizer and config of a resolved base model (local files only)."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(source.path, local_files_only=True, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(source.path, local_files_only=True, trust_remote_code=False)
    vocab = int(getattr(config, "vocab_size", None) or len(tokenizer))
    context = int(getattr(config, "max_position_embeddings", None) or getattr(tokenizer, "model_max_length", 2048))
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else getattr(config, "eos_token_id", None)
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    return BaseInfo(source.name, source.path, tokenizer, vocab, context, eos, int(pad), arch)
