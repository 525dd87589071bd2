"""Corpus loading, document split, padded sequences, user data errors, batch sampling."""

import pytest
import torch

from losskit.contract import ConfigError
from losskit.train.data import (
    IGNORE_INDEX,
    BatchSampler,
    Document,
    document_tokens,
    embedded_documents,
    load_lm_data,
    make_sequences,
    user_documents,
)
from losskit.train.tokenizer import BOS_ID, EOS_ID, PAD_ID, decode


def test_embedded_corpus_is_pydoc_topics():
    docs = embedded_documents()
    assert len(docs) == 79
    assert 400_000 < sum(len(d.text) for d in docs) < 600_000


def test_sequences_follow_documents_and_pad_the_last_chunk():
    docs = [Document("a", "x" * 10), Document("b", "y" * 3)]
    s = make_sequences(docs, block_size=4)
    # a: 12 tokens -> 11 targets -> windows of 4, 4, 3; b: 5 tokens -> 4 targets -> one window of 4
    assert len(s) == 4 and s.documents == ("a", "a", "a", "b")
    toks = document_tokens(docs[0])
    assert toks[0] == BOS_ID and toks[-1] == EOS_ID
    assert s.x[0].tolist() == toks[0:4] and s.y[0].tolist() == toks[1:5]
    assert s.x[2].tolist() == toks[8:11] + [PAD_ID]
    assert s.y[2].tolist() == toks[9:12] + [IGNORE_INDEX]
    # every target token of every document appears exactly once
    assert int((s.y != IGNORE_INDEX).sum()) == (12 - 1) + (5 - 1)


def test_default_data_split_by_document_and_baseline():
    d = load_lm_data(dataset="pydoc_topics", data=None, block_size=64, vocab_size=264, seed=0)
    assert not set(d.train.documents) & set(d.val.documents)
    assert len(set(d.val.documents)) == 8
    assert bool((d.train.y == IGNORE_INDEX).any())
    # a unigram model of bytes: between 2 and 4 nats/token for English text and code
    assert 2.0 < d.unigram_baseline < 4.0


def test_user_file_and_folder(tmp_path):
    text = "\n\n".join(f"paragraph {i} " + "word " * 200 for i in range(40))
    f = tmp_path / "one.txt"
    f.write_text(text)
    docs = user_documents(f)
    assert len(docs) > 2 and "".join(d.text for d in docs).replace("\n\n", "") == text.replace("\n\n", "")
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.txt").write_text(f"doc {i} " * 100)
    assert [d.name for d in user_documents(folder)] == ["0.txt", "1.txt", "2.txt"]
    d = load_lm_data(dataset="custom_text", data=str(folder), block_size=32, vocab_size=264)
    assert d.source == str(folder)


@pytest.mark.parametrize("case", ["missing", "empty", "latin1", "no_txt", "block"])
def test_bad_data_is_a_clear_error(tmp_path, case):
    path = tmp_path / "d.txt"
    if case == "empty":
        path.write_text("")
    elif case == "latin1":
        path.write_bytes("caf\xe9 ".encode("latin-1") * 10)
    elif case == "no_txt":
        path = tmp_path / "folder"
        path.mkdir()
    elif case == "block":
        path.write_text("\n\n".join("short paragraph " * 50 for _ in range(20)))
    expected = {"missing": "does not exist", "empty": "empty", "latin1": "not UTF-8", "no_txt": "no .txt",
                "block": "block_size must be at most"}[case]
    with pytest.raises(ConfigError, match=expected):
        load_lm_data(dataset="custom_text", data=str(path), block_size=100_000, vocab_size=264)


def test_custom_text_without_data_reads_data_custom_text(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="--data=PATH"):
        load_lm_data(dataset="custom_text", data=None, block_size=32, vocab_size=264)
    (tmp_path / "data" / "custom_text").mkdir(parents=True)
    (tmp_path / "data" / "custom_text" / "input.txt").write_text("\n\n".join("some text " * 50 for _ in range(30)))
    d = load_lm_data(dataset="custom_text", data=None, block_size=32, vocab_size=264)
    assert len(d.train) > 0 and len(d.val) > 0 and d.source == "data/custom_text"
    assert all(name.startswith("input.txt") for name in d.train.documents + d.val.documents)
    assert decode(d.train.x[0].tolist()).startswith("some text")  # the user's text, not the embedded corpus


def test_batch_sampler_ranks_partition_the_global_batch():
    docs = [Document(str(i), "abcdefgh" * (i + 1)) for i in range(10)]
    s = make_sequences(docs, block_size=8)
    whole = BatchSampler(s, 2, seed=3).step(8)
    r0 = BatchSampler(s, 2, seed=3, rank=0, world_size=2).step(4)
    r1 = BatchSampler(s, 2, seed=3, rank=1, world_size=2).step(4)
    got = sorted(tuple(row.tolist()) for x, _ in r0 + r1 for row in x)
    assert got == sorted(tuple(row.tolist()) for x, _ in whole for row in x)
    sampler = BatchSampler(s, 3, seed=0)
    sampler.step(2)
    state = sampler.state_dict()
    a = sampler.step(5)
    sampler.load_state_dict(state)
    b = sampler.step(5)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
