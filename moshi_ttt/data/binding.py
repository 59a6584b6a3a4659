"""Key-value binding in token space: N keys stated with their values, filler, one key asked.

    [STX] k_1 v_1 k_2 v_2 ... k_N v_N [ETX] filler (d tokens) [ENQ] k_j -> v_j

Keys, values, filler and markers come from disjoint token ranges of a byte vocabulary (256), so
a model can only answer by binding k_j to v_j: one that knows only *which* values were stated
scores 1/N (the chance line), and with every key asked in turn it scores H_N / N (the bag line:
it rules out the values already answered). ``distance`` d counts the filler tokens between the
last fact and the question; the asked fact lies d + 2 (N - j) + 1 tokens before it.

Filler is random printable ASCII, or slices of a corpus (``filler``) with every id in the key,
value or marker ranges replaced by ``?``, so corpus text can surround the facts.
"""

from __future__ import annotations

import zlib

import numpy as np

from .tasks import TaskSample

KEYS = np.arange(128, 192)  # 64 key tokens
VALUES = np.arange(192, 256)  # 64 value tokens
PRINTABLE = np.arange(32, 127)  # synthetic filler
STX, ETX, ENQ = 2, 3, 5  # facts begin, facts end, question
VOCAB = 256
MAX_KEYS = len(KEYS)


def chance(num_keys: int) -> float:
    """Exact-answer accuracy of a model that knows only which values were stated: 1 / N."""
    return 1.0 / num_keys


def bag_line(num_keys: int) -> float:
    """Accuracy over all N questions asked in turn of a model that knows only the values and
    rules out those already answered: H_N / N."""
    return float(sum(1.0 / i for i in range(1, num_keys + 1)) / num_keys)


def clean_filler(filler: np.ndarray) -> np.ndarray:
    """Corpus tokens as filler: ids in the key, value and marker ranges become ``?``."""
    f = np.asarray(filler, np.int64).ravel().copy()
    f[(f >= KEYS[0]) | np.isin(f, (STX, ETX, ENQ))] = ord("?")
    return f


def _filler(rng: np.random.Generator, n: int, filler: np.ndarray | None) -> np.ndarray:
    if filler is None or n == 0:
        return rng.choice(PRINTABLE, n).astype(np.int64)
    if filler.size == 0:
        raise ValueError("filler is empty")
    start = int(rng.integers(filler.size))
    return np.resize(np.roll(filler, -start), n)


def make_binding(
    seed: int,
    distance: int,
    num_keys: int = 4,
    num_queries: int = 1,
    filler: np.ndarray | None = None,
    repeat: bool = False,
) -> TaskSample:
    """One sample: ``num_keys`` facts, ``distance`` filler tokens, ``num_queries`` distinct keys
    asked (1: binding; ``num_keys``: every key in turn, the all-questions variant). ``repeat``:
    keys asked are drawn with replacement, so ruling out the values already answered does not
    help (a bag scores 1/N on every question). Tokens int64 [2 N + 2 + d + 1 + 2 Q]; answer_mask
    True on the asked values. ``filler`` must be cleaned (``clean_filler``)."""
    for name, v in (("seed", seed), ("distance", distance)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    if not 1 <= num_keys <= MAX_KEYS:
        raise ValueError(f"num_keys must be in 1..{MAX_KEYS}, got {num_keys}")
    if not 1 <= num_queries <= num_keys:
        raise ValueError(f"num_queries must be in 1..num_keys={num_keys}, got {num_queries}")
    rng = np.random.default_rng(
        [int(seed), zlib.crc32(b"binding"), num_keys, num_queries] + ([1] if repeat else [])
    )
    keys = rng.choice(KEYS, num_keys, replace=False)
    vals = rng.choice(VALUES, num_keys, replace=False)
    asked = rng.choice(num_keys, num_queries, replace=bool(repeat))
    facts = np.stack([keys, vals], 1).ravel()  # k_1 v_1 k_2 v_2 ...
    questions = np.stack([keys[asked], vals[asked]], 1).ravel()
    tokens = np.concatenate([[STX], facts, [ETX], _filler(rng, distance, filler), [ENQ], questions])
    mask = np.zeros(len(tokens), bool)
    mask[-2 * num_queries + 1 :: 2] = True
    q = len(tokens) - 2 * num_queries - 1
    meta = {
        "keys": keys.tolist(),
        "values": vals.tolist(),
        "asked": asked.tolist(),
        "num_keys": num_keys,
        "fact_span": (1, 1 + 2 * num_keys),
        "question_start": q,
        "answer_start": int(np.flatnonzero(mask)[0]),
    }
    return TaskSample("binding", tokens.astype(np.int64), mask, int(distance), meta)


def binding_batch(
    seeds, distance: int, num_keys: int, num_queries: int = 1, filler: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``make_binding`` for each seed (all of one length): tokens [B, L], answer_mask [B, L]."""
    samples = [make_binding(int(s), distance, num_keys, num_queries, filler) for s in seeds]
    return np.stack([s.tokens for s in samples]), np.stack([s.answer_mask for s in samples])


def binding_rows(
    rng: np.random.Generator,
    n: int,
    length: int,
    keys,
    distances,
    num_queries: int = 0,
    filler: np.ndarray | None = None,
    repeat: bool = False,
    anywhere: bool = False,
):
    """``n`` training rows of exactly ``length`` tokens: a sample (N from ``keys``, d from
    ``distances``; ``num_queries`` 0 asks N keys: every key in turn, or with ``repeat`` N keys
    drawn with replacement) left-filled with filler; with ``anywhere`` the sample starts at a
    uniform offset in [0, length - len(sample)] with filler before and after it, so facts also
    open a stream (an empty memory).
    Returns tokens int64 [n, length], answer_mask bool [n, length]."""
    toks = np.empty((n, length), np.int64)
    mask = np.zeros((n, length), bool)
    for i in range(n):
        N = int(keys[int(rng.integers(len(keys)))])
        d = int(distances[int(rng.integers(len(distances)))])
        s = make_binding(int(rng.integers(2**31)), d, N, num_queries or N, filler, repeat)
        if len(s.tokens) > length:
            raise ValueError(
                f"a binding sample of {N} keys at distance {d} has {len(s.tokens)} "
                f"tokens, more than the row length {length}"
            )
        pad = length - len(s.tokens)
        lo = int(rng.integers(pad + 1)) if anywhere else pad  # the sample's first token
        hi = lo + len(s.tokens)
        toks[i, :lo] = _filler(rng, lo, filler)
        toks[i, hi:] = _filler(rng, length - hi, filler)
        toks[i, lo:hi], mask[i, lo:hi] = s.tokens, s.answer_mask
    return toks, mask
