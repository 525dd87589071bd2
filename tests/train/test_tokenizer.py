"""The byte-level tokenizer of losskit/tiny-lm: exact bytes, special ids, HF round trip."""

from losskit.train.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    VOCAB_SIZE,
    decode,
    encode,
    prompt_ids,
    save_hf_tokenizer,
)

TEXT = "héllo wörld\n\t  x€😀 " + "".join(map(chr, range(1, 300)))


def test_ids():
    assert (PAD_ID, BOS_ID, EOS_ID, VOCAB_SIZE) == (256, 257, 258, 264)
    assert encode("A\u00e9") == [65, 0xC3, 0xA9]
    assert decode(encode(TEXT)) == TEXT
    assert decode([BOS_ID, 104, 105, EOS_ID, PAD_ID]) == "hi"


def test_hf_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    save_hf_tokenizer(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"tokenizer.json", "tokenizer_config.json"}
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(tok, PreTrainedTokenizerFast)
    # like training documents and `losskit sample`, the default call prepends <s>; without specials: bare bytes
    for text in (TEXT, "", "a", "def f(x):\n"):
        assert tok(text)["input_ids"] == prompt_ids(text) == [BOS_ID] + encode(text)
        assert tok(text, add_special_tokens=False)["input_ids"] == encode(text)
    assert tok([TEXT, "b"])["input_ids"] == [prompt_ids(TEXT), prompt_ids("b")]
    assert tok.decode(prompt_ids(TEXT), skip_special_tokens=True) == TEXT
    assert tok.decode(encode(TEXT)) == TEXT
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert tok.convert_tokens_to_ids(["<pad>", "<s>", "</s>"]) == [256, 257, 258]
