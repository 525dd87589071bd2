"""The byte-level tokenizer of `losskit/tiny-lm`, shared by `losskit train`, `losskit sample` and export.

Ids 0-255 are the UTF-8 bytes, 256 is ``<pad>``, 257 ``<s>`` (BOS), 258 ``</s>`` (EOS); the model's
``vocab_size`` is 264 (the 5 ids above 258 are unused padding to a multiple of 8, which keeps the logits row
aligned). Encoding is exact and needs no library; ``build_hf_tokenizer`` writes the same mapping as a
``tokenizers`` byte-level BPE without merges, so ``AutoTokenizer`` loads it offline as
``PreTrainedTokenizerFast`` and gives identical ids. Its post-processor prepends ``<s>`` (as every training
document starts with it and ``losskit sample`` feeds it), so ``tok(text).input_ids == prompt_ids(text)``;
``add_special_tokens=False`` gives the bare bytes.
"""

from __future__ import annotations

import json
import pathlib

PAD_ID = 256
BOS_ID = 257
EOS_ID = 258
VOCAB_SIZE = 264
SPECIAL_TOKENS = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID}


def encode(text: str) -> list[int]:
    """UTF-8 bytes of ``text`` as ids 0-255 (no BOS/EOS added)."""
    return list(text.encode("utf-8"))


def prompt_ids(text: str) -> list[int]:
    """What the model is fed for a prompt: ``<s>`` then the bytes (``losskit sample`` and the exported tokenizer)."""
    return [BOS_ID] + encode(text)


def decode(ids) -> str:
    """Inverse of ``encode``: byte ids back to text; special and unused ids are dropped, bad UTF-8 replaced."""
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what the ByteLevel pre-tokenizer emits)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def build_hf_tokenizer():
    """A ``tokenizers.Tokenizer``: byte-level BPE with no merges, byte b -> id b, then the special tokens; a
    post-processor prepends ``<s>`` when special tokens are added (the default of ``tok(text)``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    table = _byte_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))  # ids 256, 257, 258 in this order
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B:1", special_tokens=[("<s>", BOS_ID)]
    )
    return tok


def save_hf_tokenizer(out_dir: str | pathlib.Path, *, model_max_length: int = 1024) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into ``out_dir``."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_hf_tokenizer()
    for name, idx in SPECIAL_TOKENS.items():
        assert tok.token_to_id(name) == idx, (name, tok.token_to_id(name))
    tok.save(str(out / "tokenizer.json"))
    special = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": True,
        "add_eos_token": False,
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
