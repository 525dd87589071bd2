"""Text data for the `lm` task: the embedded corpus or the user's own text, cut into padded sequences.

The default corpus is the text of Python's bundled documentation topics (``pydoc_data.topics``: 79 documents,
about 465 KB, shipped with every CPython), so training needs no download. ``data=PATH`` takes a ``.txt`` file
or a folder of them instead (``dataset=custom_text`` without ``data`` reads ``data/custom_text/``, nanoGPT's
place for a dataset).

Each document becomes ``<s> bytes </s>`` and is cut into windows of ``block_size + 1`` tokens that overlap by
one (input ``x = w[:-1]``, target ``y = w[1:]``). Windows never cross a document boundary, so the last window
of each document is short: its input is padded with ``<pad>`` and its target with ``ignore_index``, which
gives the mask-ratio modifier real work. Train and validation are split by document.
"""

from __future__ import annotations

import dataclasses
import pathlib

import torch

from losskit.contract import ConfigError
from losskit.train.tokenizer import BOS_ID, EOS_ID, PAD_ID, encode

IGNORE_INDEX = -100
# A single user file is cut into documents at blank lines, each at least this many characters, so that a
# train/validation split by document is possible.
MIN_DOC_CHARS = 4096


@dataclasses.dataclass(frozen=True)
class Document:
    name: str
    text: str


@dataclasses.dataclass(frozen=True)
class SequenceSet:
    """Padded sequences ``x`` (pad id) and ``y`` (ignore_index) ``(N, block_size)`` int64, plus provenance."""

    x: torch.Tensor
    y: torch.Tensor
    documents: tuple[str, ...]

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def num_tokens(self) -> int:
        return int((self.y != IGNORE_INDEX).sum())


@dataclasses.dataclass(frozen=True)
class LMData:
    train: SequenceSet
    val: SequenceSet
    source: str
    unigram_baseline: float  # nats/token: entropy of the train targets' unigram distribution, scored on val


def embedded_documents() -> list[Document]:
    """The 79 documents of ``pydoc_data.topics`` in sorted key order."""
    from pydoc_data.topics import topics

    return [Document(name, topics[name]) for name in sorted(topics)]


def _read_text(path: pathlib.Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"data: {path} is not UTF-8 text (invalid byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "expected a UTF-8 .txt file"
        ) from None


def split_paragraph_documents(name: str, text: str, min_chars: int = MIN_DOC_CHARS) -> list[Document]:
    """Cut one long text into documents at blank lines, each at least ``min_chars`` long (the last may be shorter)."""
    docs: list[Document] = []
    current: list[str] = []
    size = 0
    for para in text.split("\n\n"):
        current.append(para)
        size += len(para) + 2
        if size >= min_chars:
            docs.append(Document(f"{name}#{len(docs)}", "\n\n".join(current)))
            current, size = [], 0
    if current and "".join(current).strip():
        docs.append(Document(f"{name}#{len(docs)}", "\n\n".join(current)))
    return docs


def user_documents(path: str | pathlib.Path) -> list[Document]:
    """Documents of a ``.txt`` file (cut at blank lines) or of a folder (one document per ``.txt`` file)."""
    p = pathlib.Path(path)
    if not p.exists():
        raise ConfigError(f"data: {str(p)!r} does not exist; expected a .txt file or a folder of .txt files")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.txt") if f.is_file())
        if not files:
            raise ConfigError(f"data: folder {str(p)!r} holds no .txt files; expected at least one")
        docs = [Document(str(f.relative_to(p)), _read_text(f)) for f in files]
        docs = [d for d in docs if d.text.strip()]
        if len(docs) == 1:
            docs = split_paragraph_documents(docs[0].name, docs[0].text)
    else:
        docs = split_paragraph_documents(p.name, _read_text(p))
    if not docs or not any(d.text.strip() for d in docs):
        raise ConfigError(f"data: {str(p)!r} is empty; expected some UTF-8 text")
    return docs


def document_tokens(doc: Document) -> list[int]:
    return [BOS_ID] + encode(doc.text) + [EOS_ID]


def make_sequences(docs: list[Document], block_size: int) -> SequenceSet:
    """Cut every document into ``(x, y)`` windows of ``block_size``; the last window of each is padded."""
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    names: list[str] = []
    for doc in docs:
        toks = torch.tensor(document_tokens(doc), dtype=torch.int64)
        for start in range(0, len(toks) - 1, block_size):
            w = toks[start : start + block_size + 1]
            n = len(w) - 1
            x = torch.full((block_size,), PAD_ID, dtype=torch.int64)
            y = torch.full((block_size,), IGNORE_INDEX, dtype=torch.int64)
            x[:n], y[:n] = w[:-1], w[1:]
            xs.append(x)
            ys.append(y)
            names.append(doc.name)
    if not xs:
        return SequenceSet(torch.empty(0, block_size, dtype=torch.int64),
                           torch.empty(0, block_size, dtype=torch.int64), ())
    return SequenceSet(torch.stack(xs), torch.stack(ys), tuple(names))


def split_documents(docs: list[Document], val_fraction: float = 0.1, seed: int = 0) -> tuple[list, list]:
    """A seeded split by document: about ``val_fraction`` of the documents (at least one) go to validation."""
    if len(docs) < 2:
        raise ConfigError(
            f"data: found {len(docs)} document(s); expected at least 2 to split train/validation by document "
            f"(give a folder of .txt files, or a file of at least {2 * MIN_DOC_CHARS} characters)"
        )
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(docs), generator=g).tolist()
    n_val = max(1, round(val_fraction * len(docs)))
    val_idx = set(order[:n_val])
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val


def unigram_baseline(train: SequenceSet, val: SequenceSet, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on val of the add-one-smoothed unigram distribution of the train targets."""
    counts = torch.bincount(train.y[train.y != IGNORE_INDEX], minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    yv = val.y[val.y != IGNORE_INDEX]
    return float(-logp[yv].mean())


def load_lm_data(
    *, dataset: str, data: str | None, block_size: int, vocab_size: int, seed: int = 0
) -> LMData:
    """Load, split and cut the corpus; every problem is a ``ConfigError`` raised before training starts."""
    if data:
        docs, source = user_documents(data), str(data)
    elif dataset == "custom_text":
        default = pathlib.Path("data") / "custom_text"
        if not default.exists():
            raise ConfigError(
                "dataset='custom_text' trains on your own text: pass --data=PATH (a .txt file or a folder), "
                f"or put .txt files in {default}/ (not found in {pathlib.Path.cwd()})"
            )
        docs, source = user_documents(default), str(default)
    else:
        docs, source = embedded_documents(), "pydoc_data.topics"
    longest = max(len(document_tokens(d)) - 1 for d in docs)
    if block_size > longest:
        raise ConfigError(
            f"block_size must be at most the longest document ({longest} tokens in {source}), got {block_size}; "
            "every sequence would be mostly padding"
        )
    train_docs, val_docs = split_documents(docs, seed=seed)
    train, val = make_sequences(train_docs, block_size), make_sequences(val_docs, block_size)
    return LMData(train, val, source, unigram_baseline(train, val, vocab_size))


class BatchSampler:
    """Seeded random batches of ``batch_size`` sequences: an epoch-wise permutation, drawn on the CPU.

    ``rank``/``world_size`` give each DDP rank its own slice of each global batch, so 2 ranks x 4 micro-batches
    see exactly the sequences of 1 rank x 8 micro-batches.
    """

    def __init__(self, data: SequenceSet, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1):
        self.data, self.batch_size, self.rank, self.world = data, batch_size, rank, world_size
        self.gen = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(len(data), generator=self.gen)
        self.pos = 0

    def _take(self, n: int) -> torch.Tensor:
        out = []
        while n > 0:
            if self.pos >= len(self.perm):
                self.perm, self.pos = torch.randperm(len(self.data), generator=self.gen), 0
            k = min(n, len(self.perm) - self.pos)
            out.append(self.perm[self.pos : self.pos + k])
            self.pos += k
            n -= k
        return torch.cat(out)

    def step(self, micro_steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The micro-batches of one optimizer step for this rank (global order: micro-step, then rank)."""
        idx = self._take(micro_steps * self.world * self.batch_size).view(micro_steps * self.world, self.batch_size)
        mine = idx[self.rank :: self.world] if self.world > 1 else idx
        return [(self.data.x[i], self.data.y[i]) for i in mine]

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "perm": self.perm, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.perm, self.pos = state["perm"], int(state["pos"])
