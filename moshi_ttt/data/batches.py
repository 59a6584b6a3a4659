"""Training batches: random windows of a token stream, with document boundaries as resets."""

from __future__ import annotations

import numpy as np
import torch


def doc_starts(n_tokens: int, doc_bounds: np.ndarray) -> np.ndarray:
    """bool [n_tokens]: True at the first token of every document. doc_bounds int [n_docs, 2]."""
    starts = np.zeros(n_tokens, dtype=bool)
    starts[doc_bounds[:, 0]] = True
    return starts


def sample_windows(
    stream: np.ndarray, starts: np.ndarray, batch_size: int, seq_len: int, rng: np.random.Generator
):
    """Random windows of ``seq_len + 1`` tokens.

    Returns inputs [B, T] int64, targets [B, T] int64, resets [B, T] bool (a document starts at
    the input token) and weights [B, T] float (0 where the target opens a new document: it cannot
    be predicted from the previous one).
    """
    n = len(stream)
    if n < seq_len + 2:
        raise ValueError(
            f"the token stream ({n} tokens) is shorter than seq_len + 2 = {seq_len + 2}"
        )
    offs = rng.integers(0, n - seq_len - 1, size=batch_size)
    idx = offs[:, None] + np.arange(seq_len + 1)  # [B, T + 1]
    toks = torch.from_numpy(np.asarray(stream[idx], dtype=np.int64))
    st = torch.from_numpy(starts[idx])
    resets = st[:, :-1].clone()
    resets[:, 0] = False  # a window's first token starts its memory anyway
    weights = (~st[:, 1:]).float()
    return toks[:, :-1], toks[:, 1:], resets, weights
