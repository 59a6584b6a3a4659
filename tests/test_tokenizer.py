"""Tokenizers: byte-level round trip; GPT-2 BPE from a local ranks file (tiktoken) vs bytes."""

import base64

import numpy as np
import pytest

from moshi_ttt.data.tokenizer import ByteTokenizer, get_tokenizer

TEXT = "The pass key is 48213. Remember it!\n  naïve café — ok"


def test_byte_roundtrip():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids.dtype == np.int64 and ids.max() < 256
    assert tok.decode(ids) == TEXT
    assert bytes(ids.astype(np.uint8)) == TEXT.encode("utf-8")


def test_gpt2_local_ranks(tmp_path):
    pytest.importorskip("tiktoken")
    # every byte is a token, plus two merges: "th" and "the"
    ranks = [bytes([i]) for i in range(256)] + [b"th", b"the"]
    path = tmp_path / "ranks.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)))
    tok = get_tokenizer("gpt2", path)
    assert tok.vocab_size == 259  # 258 ranks + <|endoftext|>
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.encode("the").tolist() == [257] and tok.encode("th").tolist() == [256]
    text = "the cat and the hat then"  # "the" three times: each 3 bytes -> 1 token
    ids = tok.encode(text)
    assert len(ids) == len(text.encode()) - 6
    assert ids.tolist() == [257, *b" cat and ", 257, *b" hat ", 257, *b"n"]


def test_unknown_tokenizer():
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("sentencepiece")
    with pytest.raises(ValueError, match="ranks_path"):
        get_tokenizer("gpt2")
