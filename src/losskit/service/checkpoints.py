"""Atomic checkpoints under the state directory, named by strict ``tinker://`` paths.

Layout (``--state-dir``)::

    runs/<training_run_id>/run.json                     base model, LoRA config, seed, owner key fingerprint, created
    runs/<run>/weights/<name>/                          adapter_model.safetensors + adapter_config.json (peft format),
                                                        optimizer.safetensors + optimizer.json, meta.json
    runs/<run>/sampler_weights/<name>/                  adapter files + meta.json
    tmp/                                                staging (emptied at startup)

Checkpoints hold only safetensors and JSON, never pickles: loading one never runs code. A checkpoint is written
into ``tmp/<random>/``; its files and the directory are fsynced, the directory is renamed into place (same
filesystem), and the parent is fsynced. ``overwrite`` renames the old checkpoint aside, renames the new one in,
then deletes the old one. So a crash never leaves a partial checkpoint visible. ``meta.json`` lists the SHA-256 of
every file; loading verifies them (``checkpoint_corrupted``).

Paths are parsed strictly (prefix, exactly three parts, a regex for the run id and for the name): a request string
never reaches the filesystem unchecked, so neither ``..`` nor a separator gets through.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import secrets
import shutil
import time
from collections.abc import Mapping
from typing import Any

from losskit.service.errors import ServiceError

SCHEME = "tinker://"
KINDS = ("weights", "sampler_weights")
RUN_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}")
NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
META = "meta.json"
RUN_INFO = "run.json"


@dataclasses.dataclass(frozen=True)
class CheckpointPath:
    run_id: str
    kind: str
    name: str

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.run_id}/{self.kind}/{self.name}"


def run_id_of(model_id: str) -> str:
    """The training run id of a model id: ``:`` becomes ``.`` (no ``/``, filesystem-safe, reversible)."""
    return model_id.replace(":", ".")


def check_name(name: Any, argument: str = "name") -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name) or set(name) == {"."}:
        raise ServiceError("validation_error", f"{argument} must match [A-Za-z0-9._-]{{1,128}} (not starting with "
                           f"a dot), got {name!r}", detail={"argument": argument})
    return name


def parse_path(path: Any) -> CheckpointPath:
    """``tinker://<run>/<weights|sampler_weights>/<name>``; anything else is a 400 naming the expected form."""
    form = "tinker://<training_run_id>/<weights|sampler_weights>/<name>"
    if not isinstance(path, str) or not path.startswith(SCHEME):
        raise ServiceError("validation_error", f"path must be {form}, got {path!r}", detail={"argument": "path"})
    parts = path[len(SCHEME):].split("/")
    if len(parts) != 3 or not RUN_ID.fullmatch(parts[0]) or parts[1] not in KINDS or not NAME.fullmatch(parts[2]) \
            or ".." in parts[0] or parts[2].startswith("."):
        raise ServiceError("validation_error", f"path must be {form} (no '..', no extra parts), got {path!r}",
                           detail={"argument": "path"})
    return CheckpointPath(*parts)


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: pathlib.Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class StateDir:
    """The state directory: checkpoints, run records and staging."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = pathlib.Path(root)
        self.runs = self.root / "runs"
        self.tmp = self.root / "tmp"
        self.runs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def clean_tmp(self) -> int:
        """Empty ``tmp/`` (startup: what a crash left behind there was never visible). Returns the count removed."""
        count = 0
        for child in self.tmp.iterdir():
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
            count += 1
        return count

    def checkpoint_dir(self, cp: CheckpointPath) -> pathlib.Path:
        return self.runs / cp.run_id / cp.kind / cp.name

    def run_info(self, run_id: str) -> dict[str, Any] | None:
        path = self.runs / run_id / RUN_INFO
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def ensure_run_info(self, run_id: str, info: Mapping[str, Any]) -> None:
        """Write ``run.json`` once (atomically); an existing record is kept."""
        run = self.runs / run_id
        run.mkdir(parents=True, exist_ok=True)
        target = run / RUN_INFO
        if target.exists():
            return
        staged = self.tmp / f"run-{secrets.token_hex(8)}.json"
        _write_file(staged, json.dumps(dict(info), indent=2, sort_keys=True).encode())
        os.replace(staged, target)
        _fsync_dir(run)

    def write(self, cp: CheckpointPath, files: Mapping[str, bytes], meta: Mapping[str, Any], *,
              overwrite: bool) -> pathlib.Path:
        """Write a checkpoint atomically; ``meta.json`` gets ``files`` (name -> SHA-256) added to ``meta``.

        Raises:
            ServiceError: ``checkpoint_exists`` when the name is taken and ``overwrite`` is false.
        """
        final = self.checkpoint_dir(cp)
        if final.exists() and not overwrite:
            raise ServiceError("checkpoint_exists", f"checkpoint {cp.uri} exists; pass overwrite=true to replace it",
                               detail={"path": cp.uri})
        stage = self.tmp / secrets.token_hex(12)
        stage.mkdir()
        try:
            hashes = {}
            for name, data in files.items():
                _write_file(stage / name, data)
                hashes[name] = hashlib.sha256(data).hexdigest()
            record = {**meta, "files": hashes}
            _write_file(stage / META, json.dumps(record, indent=2, sort_keys=True).encode())
            _fsync_dir(stage)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():
                aside = self.tmp / f"old-{secrets.token_hex(12)}"
                os.replace(final, aside)
                os.replace(stage, final)
                _fsync_dir(final.parent)
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.replace(stage, final)
                _fsync_dir(final.parent)
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)
        return final

    def read(self, cp: CheckpointPath) -> tuple[dict[str, bytes], dict[str, Any]]:
        """The verified files and meta of a checkpoint.

        Raises:
            ServiceError: ``checkpoint_not_found``; ``checkpoint_corrupted`` when a file is missing or its hash
                differs, or the meta is unreadable; ``checkpoint_not_found`` too when it has expired.
        """
        folder = self.checkpoint_dir(cp)
        if not folder.is_dir():
            raise ServiceError("checkpoint_not_found", f"no checkpoint at {cp.uri}", detail={"path": cp.uri})
        try:
            meta = json.loads((folder / META).read_text())
            hashes = dict(meta["files"])
        except (OSError, ValueError, KeyError, TypeError):
            raise ServiceError("checkpoint_corrupted", f"checkpoint {cp.uri}: meta.json is missing or unreadable",
                               detail={"path": cp.uri}) from None
        expires = meta.get("expires_at")
        if expires is not None and expires < time.time():
            raise ServiceError("checkpoint_not_found", f"checkpoint {cp.uri} has expired", detail={"path": cp.uri})
        files = {}
        for name, digest in hashes.items():
            if not NAME.fullmatch(name):
                raise ServiceError("checkpoint_corrupted", f"checkpoint {cp.uri}: bad file name {name!r} in meta.json")
            try:
                data = (folder / name).read_bytes()
            except OSError:
                raise ServiceError("checkpoint_corrupted", f"checkpoint {cp.uri}: file {name} is missing",
                                   detail={"path": cp.uri, "file": name}) from None
            if hashlib.sha256(data).hexdigest() != digest:
                raise ServiceError("checkpoint_corrupted", f"checkpoint {cp.uri}: file {name} does not match its "
                                   "SHA-256 in meta.json", detail={"path": cp.uri, "file": name})
            files[name] = data
        return files, meta

    def expire(self, now: float | None = None) -> list[str]:
        """Delete checkpoints whose ``expires_at`` has passed (the janitor, at startup and hourly)."""
        now = time.time() if now is None else now
        removed = []
        for meta_path in self.runs.glob(f"*/*/*/{META}"):
            try:
                expires = json.loads(meta_path.read_text()).get("expires_at")
            except (OSError, ValueError, AttributeError):
                continue
            if expires is not None and expires < now:
                aside = self.tmp / f"expired-{secrets.token_hex(8)}"
                try:
                    os.replace(meta_path.parent, aside)
                except OSError:
                    continue
                shutil.rmtree(aside, ignore_errors=True)
                removed.append(str(meta_path.parent.relative_to(self.runs)))
        return removed

    def list_checkpoints(self, run_id: str) -> list[CheckpointPath]:
        out = []
        for kind in KINDS:
            folder = self.runs / run_id / kind
            if folder.is_dir():
                out += [CheckpointPath(run_id, kind, p.name) for p in sorted(folder.iterdir()) if (p / META).is_file()]
        return out
