"""Tokenizers: byte-level (always available) and GPT-2 BPE (optional, offline ranks)."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, lossless on any text."""

    name: str = "byte"
    vocab_size: int = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class Gpt2Tokenizer:
    """GPT-2 BPE through tiktoken, with ranks read from a local ``gpt2.tiktoken`` file.

    ``tiktoken.get_encoding`` downloads its ranks; this reads them from disk instead
    (the ``openai-whisper`` sdist ships them as ``whisper/assets/gpt2.tiktoken``).
    """

    name = "gpt2"
    _PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

    def __init__(self, ranks_path: str | Path):
        try:
            import tiktoken
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ValueError("the gpt2 tokenizer needs tiktoken: pip install tiktoken") from e
        ranks_path = Path(ranks_path)
        if not ranks_path.is_file():
            raise ValueError(f"gpt2 ranks file not found: {ranks_path}")
        ranks = {}
        for line in ranks_path.read_text().splitlines():
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
        eot = len(ranks)
        self._enc = tiktoken.Encoding(
            "gpt2-local",
            pat_str=self._PATTERN,
            mergeable_ranks=ranks,
            special_tokens={"<|endoftext|>": eot},
        )
        self.vocab_size = eot + 1

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._enc.encode_ordinary(text), dtype=np.int64)

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids])


def get_tokenizer(name: str = "byte", ranks_path: str | Path | None = None):
    """Tokenizer by name: ``"byte"`` or ``"gpt2"`` (needs ``ranks_path``)."""
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        if ranks_path is None:
            raise ValueError("the gpt2 tokenizer needs ranks_path (a gpt2.tiktoken file)")
        return Gpt2Tokenizer(ranks_path)
    raise ValueError(f"unknown tokenizer {name!r}: expected 'byte' or 'gpt2'")
