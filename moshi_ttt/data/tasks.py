"""Synthetic long-range recall tasks: passkey, multi-key needle, MQAR, conversation fact recall.

A sample is a function of (task, seed, distance, tokenizer, filler) only. Segments are tokenised
separately and concatenated, so positions are exact for any tokenizer with
``encode``/``vocab_size``.

``distance`` = tokens strictly between the end of the fact statement and the start of the question
(the haystack separating them). It is exact for passkey, needle and mqar; conversation uses whole
turns, so it is the nearest reachable value (within half a turn). Every sample ends with its last
answer token; ``meta`` records ``fact_span``, ``question_start`` and ``answer_start``. Stated values
occur exactly once before the question (checked on tokens, and on text when ``decode`` exists).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from moshi_ttt.data.tokenizer import ByteTokenizer

_BYTE = ByteTokenizer()
_MAX_TRIES = 256

_NOUNS = (
    "grass sky river hill road garden window cloud forest bridge meadow lantern village kettle "
    "fence orchard candle pebble barn tower path field stream roof wagon lake"
).split()
_ADJS = (
    "green blue quiet warm bright calm old tall soft wide still golden grey small heavy clean "
    "dusty gentle pale steep"
).split()
_VERBS = "crosses follows faces shelters meets passes touches hides circles".split()
_PLACES = tuple("the " + p for p in "valley town coast square station market mill".split())
_PROSE = (
    "The {n} is {a}.",
    "The {a} {n} {v} the {m}.",
    "A {n} {v} the {m} near {p}.",
    "In {p} the {n} looks {a}.",
    "Every day the {n} {v} the {a} {m}.",
    "The {m} by the {n} is {a}.",
)
_CHAT = (
    "Did you notice the {a} {n} near {p}?",
    "I walked past the {n} in {p} today.",
    "The {n} looked {a} this morning.",
    "We could meet by the {n} later.",
    "Yes, {p} was {a} all afternoon.",
    "I heard the {n} in {p} is {a} now.",
    "That sounds nice, the {n} is always {a}.",
    "Maybe, but the {a} {n} {v} the {m} there.",
)
_NEEDLE_KEYS = (
    "apple violin comet falcon marble orchid glacier saddle tunnel anchor quartz lotus "
    "ember canyon walrus compass thimble raven cobalt summit"
).split()
_FACTS = {
    k: v.split()
    for k, v in {  # fact -> values; disjoint from the filler words
        "name": "Rosalind Theodore Ingrid Matthias Priya Tobias Leonora Emeric Saoirse Cassius",
        "favourite colour": (
            "teal maroon crimson lavender turquoise indigo magenta ochre scarlet chartreuse"
        ),
        "favourite food": (
            "lasagna sushi ramen paella dumplings risotto falafel goulash pancakes couscous"
        ),
        "favourite city": (
            "Lisbon Kyoto Montreal Nairobi Oslo Valparaiso Edinburgh Hanoi Marrakesh Reykjavik"
        ),
        "pet's name": "Biscuit Waffles Noodle Ziggy Mochi Pickles Juniper Tofu Clementine Pretzel",
        "favourite instrument": (
            "cello banjo oboe harp ukulele bassoon accordion marimba mandolin clarinet"
        ),
        "sister's name": (
            "Beatrice Ophelia Marguerite Yasmin Henrietta "
            "Isolde Philippa Rosamund Ottilie Wilhelmina"
        ),
    }.items()
}


@dataclass(frozen=True, eq=False)  # eq=False: arrays make field-wise == ambiguous
class TaskSample:
    """One sample; ``meta["chance"]``: the exact-answer accuracy of a model that knows only which
    values were stated (1 / N for one of N keys asked; H-style bag line when every key is asked in
    turn; 1 for a single fact, which measures retention, not binding)."""

    task: str
    tokens: np.ndarray  # int64 [T]
    answer_mask: np.ndarray  # bool [T]: True on answer tokens (predicted from the prefix)
    distance: int  # tokens between the end of the fact and the start of the question
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------- helpers
def _pick(rng, xs):
    return xs[int(rng.integers(len(xs)))]


def _sentence(rng, templates) -> str:
    return _pick(rng, templates).format(
        n=_pick(rng, _NOUNS),
        m=_pick(rng, _NOUNS),
        a=_pick(rng, _ADJS),
        v=_pick(rng, _VERBS),
        p=_pick(rng, _PLACES),
    )


def _numbers(rng, n: int, digits: int) -> list[str]:
    """``n`` distinct ``digits``-digit numbers without a leading zero."""
    low = 10 ** (digits - 1) if digits > 1 else 1
    if digits < 1 or 10**digits - low < n:
        raise ValueError(f"cannot draw {n} distinct {digits}-digit values")
    return [str(int(x) + low) for x in rng.choice(10**digits - low, n, replace=False)]


def _filler(rng, n: int, tok, filler, cuts: bool = False):
    """Exactly ``n`` filler tokens: a wrapped slice of ``filler`` at a random offset, else prose.
    With ``cuts``, also the positions where an insertion keeps sentences whole (any, for
    ``filler``)."""
    if filler is not None and n:
        f = np.asarray(filler, np.int64).ravel()
        if f.size == 0:
            raise ValueError("filler is empty")
        out, ends = np.resize(np.roll(f, -int(rng.integers(f.size))), n), np.arange(n + 1)
    else:
        parts, total = [], 0
        while total < n:
            parts.append(np.asarray(tok.encode(" " + _sentence(rng, _PROSE)), np.int64))
            total += len(parts[-1])
        out = np.concatenate(parts)[:n] if parts else np.zeros(0, np.int64)
        ends = np.unique(np.minimum(np.cumsum([0] + [len(p) for p in parts]), n))
    return (out, ends) if cuts else out


def _interleave(rng, base: tuple, inserts: list) -> np.ndarray:
    """Insert token arrays into ``base = (tokens, cut positions)`` at random cuts (distinct
    depths)."""
    tokens, ends = base
    cuts = np.sort(rng.choice(ends, len(inserts)))
    parts, prev = [], 0
    for c, ins in zip(cuts, inserts):
        parts += [tokens[prev:c], ins]
        prev = c
    return np.concatenate(parts + [tokens[prev:]])


def _count(hay: np.ndarray, pat: np.ndarray) -> int:
    if len(pat) == 0 or len(hay) < len(pat):
        return 0
    win = np.lib.stride_tricks.sliding_window_view(hay, len(pat))
    return int((win == pat).all(1).sum())


class _Seq:
    """Tokenised segments with tags: "fact", "ask" (question start), "ans" (answer) or None."""

    def __init__(self, tok):
        self.tok, self.parts, self.tags = tok, [], []

    def add(self, x, tag=None):
        self.parts.append(np.asarray(self.tok.encode(x) if isinstance(x, str) else x, np.int64))
        self.tags.append(tag)
        return self

    def build(self, task: str, meta: dict, values: list[str]) -> TaskSample | None:
        """The sample, or None when a value is not unique before the question (caller resamples)."""
        tokens = np.concatenate(self.parts)
        lens = np.array([len(p) for p in self.parts])
        ends = np.cumsum(lens)
        starts = ends - lens
        ask = self.tags.index("ask")
        facts = [i for i in range(ask) if self.tags[i] == "fact"]
        fact_span, q = (int(starts[facts[0]]), int(ends[facts[-1]])), int(starts[ask])
        mask = np.repeat(np.array([t == "ans" for t in self.tags]), lens)
        ctx = tokens[:q]
        text = self.tok.decode(ctx) if hasattr(self.tok, "decode") else None
        for v in values:
            if _count(ctx, np.asarray(self.tok.encode(v), np.int64)) != 1 or (
                text is not None and text.count(v) != 1
            ):
                return None
        meta = dict(
            meta, fact_span=fact_span, question_start=q, answer_start=int(np.flatnonzero(mask)[0])
        )
        return TaskSample(task, tokens, mask, q - fact_span[1], meta)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _make(task: str, seed: int, distance: int, tok, body) -> TaskSample:
    if not _is_int(distance) or distance < 0:
        raise ValueError(f"distance must be a non-negative int, got {distance!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    rng = np.random.default_rng([int(seed), zlib.crc32(task.encode())])
    for _ in range(_MAX_TRIES):
        seq = _Seq(tok)
        meta, values = body(rng, seq)
        sample = seq.build(task, meta, values)
        if sample is not None:
            return sample
    raise RuntimeError(f"{task}: no sample with unique values in {_MAX_TRIES} tries (seed {seed})")


# ---------------------------------------------------------------- tasks
def make_passkey(
    seed: int, distance: int, tokenizer=_BYTE, filler: np.ndarray | None = None, digits: int = 5
) -> TaskSample:
    """'The pass key is 48213. Remember it.' filler 'What is the pass key? The pass key is
    48213'."""

    def body(rng, s):
        v = _numbers(rng, 1, digits)[0]
        s.add("The pass key is ", "fact").add(v, "fact").add(". Remember it.\n", "fact")
        s.add(_filler(rng, distance, tokenizer, filler))
        s.add("\nWhat is the pass key? The pass key is ", "ask").add(v, "ans")
        return {"value": v, "chance": 1.0}, [v]

    return _make("passkey", seed, distance, tokenizer, body)


def make_needle(
    seed: int,
    distance: int,
    tokenizer=_BYTE,
    filler: np.ndarray | None = None,
    num_keys: int = 4,
    digits: int = 6,
    lead_tokens: int = 64,
) -> TaskSample:
    """Multi-key needle: ``num_keys`` facts 'The magic number for <key> is <value>.'; the queried
    one
    ``distance`` tokens before the question, distractors at random depths (in the gap if they fit,
    else in a ``lead_tokens`` filler prefix)."""
    if not 1 <= num_keys <= len(_NEEDLE_KEYS):
        raise ValueError(f"num_keys must be in 1..{len(_NEEDLE_KEYS)}, got {num_keys}")

    def body(rng, s):
        keys = [_NEEDLE_KEYS[i] for i in rng.choice(len(_NEEDLE_KEYS), num_keys, replace=False)]
        vals = _numbers(rng, num_keys, digits)
        enc = [
            [
                tokenizer.encode(f" The magic number for {k} is "),
                tokenizer.encode(v),
                tokenizer.encode("."),
            ]
            for k, v in zip(keys, vals)
        ]
        dis = [np.concatenate(e).astype(np.int64) for e in enc[1:]]
        n_gap = int(rng.integers(len(dis) + 1))
        while n_gap and sum(map(len, dis[:n_gap])) > distance:
            n_gap -= 1
        gap_len = distance - sum(map(len, dis[:n_gap]))
        s.add(_interleave(rng, _filler(rng, lead_tokens, tokenizer, filler, True), dis[n_gap:]))
        for piece in enc[0]:
            s.add(piece, "fact")
        s.add(_interleave(rng, _filler(rng, gap_len, tokenizer, filler, True), dis[:n_gap]))
        s.add(
            f"\nWhat is the magic number for {keys[0]}? The magic number for {keys[0]} is ", "ask"
        )
        s.add(vals[0], "ans")
        return {
            "key": keys[0],
            "value": vals[0],
            "keys": keys,
            "values": vals,
            "chance": 1.0 / num_keys,
        }, vals

    return _make("needle", seed, distance, tokenizer, body)


def make_mqar(
    seed: int,
    distance: int,
    tokenizer=_BYTE,
    filler: np.ndarray | None = None,
    num_pairs: int = 8,
    num_queries: int = 4,
    key_len: int = 3,
    digits: int = 3,
) -> TaskSample:
    """Multi-query associative recall: 'abc:417 xyz:230 ...\\n' filler '\\nxyz:230 abc:417 ...'."""
    if not 1 <= num_queries <= num_pairs:
        raise ValueError(f"need 1 <= num_queries <= num_pairs, got {num_queries}, {num_pairs}")
    if key_len < 1 or 26**key_len < num_pairs:
        raise ValueError(f"key_len {key_len} cannot give {num_pairs} distinct keys")

    def body(rng, s):
        keys: list[str] = []
        while len(keys) < num_pairs:
            k = "".join(chr(97 + int(c)) for c in rng.integers(26, size=key_len))
            keys += [k] if k not in keys else []
        vals = _numbers(rng, num_pairs, digits)
        for i, (k, v) in enumerate(zip(keys, vals)):
            s.add((" " if i else "") + f"{k}:", "fact").add(v, "fact")
        s.add("\n", "fact")
        s.add(_filler(rng, distance, tokenizer, filler))
        order = [int(i) for i in rng.choice(num_pairs, num_queries, replace=False)]
        for j, i in enumerate(order):
            s.add(("\n" if j == 0 else " ") + f"{keys[i]}:", None if j else "ask").add(
                vals[i], "ans"
            )
        bag = sum(1.0 / (num_pairs - i) for i in range(num_queries)) / num_queries
        return {
            "keys": keys,
            "values": vals,
            "queries": [keys[i] for i in order],
            "answers": [vals[i] for i in order],
            "chance": bag,
        }, vals

    return _make("mqar", seed, distance, tokenizer, body)


def make_conversation(
    seed: int,
    distance: int,
    tokenizer=_BYTE,
    filler: np.ndarray | None = None,
    fact: str | None = None,
    lead_turns: int = 2,
    fact_speaker: str = "A",
) -> TaskSample:
    """Dialogue 'A: ...\\nB: ...\\n': ``fact_speaker`` states 'my <fact> is <value>' after
    ``lead_turns`` small-talk turns; whole filler turns fill ~``distance`` tokens; then A asks for
    it and B answers. With ``filler``, turn contents are random 16-48-token slices of it."""
    if fact is not None and fact not in _FACTS:
        raise ValueError(f"unknown fact {fact!r}: expected one of {sorted(_FACTS)}")
    if fact_speaker not in ("A", "B"):
        raise ValueError(f"fact_speaker must be 'A' or 'B', got {fact_speaker!r}")
    other = "B" if fact_speaker == "A" else "A"

    def turn(rng, spk):
        body = (
            tokenizer.encode(
                " ".join(_sentence(rng, _CHAT) for _ in range(int(rng.integers(1, 3))))
            )
            if filler is None
            else _filler(rng, int(rng.integers(16, 49)), tokenizer, filler)
        )
        return np.concatenate([tokenizer.encode(f"{spk}: "), body, tokenizer.encode("\n")]).astype(
            np.int64
        )

    def body(rng, s):
        name = fact if fact is not None else _pick(rng, sorted(_FACTS))
        v = _pick(rng, _FACTS[name])
        for i in range(lead_turns):
            s.add(turn(rng, fact_speaker if (lead_turns - i) % 2 == 0 else other))
        s.add(f"{fact_speaker}: By the way, my {name} is ", "fact").add(v, "fact").add(
            ".\n", "fact"
        )
        total, spk = 0, other
        while total < distance:
            t = turn(rng, spk)
            if total + len(t) - distance > distance - total:  # stop at the nearest turn boundary
                break
            s.add(t)
            total, spk = total + len(t), fact_speaker if spk == other else other
        ask = (
            f"A: Sorry, what was my {name} again?\nB: Your {name} is "
            if fact_speaker == "A"
            else f"A: What did you say your {name} was?\nB: My {name} is "
        )
        s.add(ask, "ask").add(v, "ans")
        return {"fact": name, "value": v, "speaker": fact_speaker, "chance": 1.0}, [v]

    return _make("conversation", seed, distance, tokenizer, body)


_PEOPLE = (
    "Anna Bruno Clara Dmitri Elena Farid Greta Hugo Irene Jonas Kira Luca Maren Nikolai".split()
)
# attribute -> (statement, question, answer prefix, values or None for 3-digit numbers)
_ATTRIBUTES = {
    "city": (
        "{p} lives in {v}.",
        "Where does {p} live?",
        "{p} lives in ",
        _FACTS["favourite city"],
    ),
    "room": (
        "{p}'s room number is {v}.",
        "What is {p}'s room number?",
        "{p}'s room number is ",
        None,
    ),
    "dog": (
        "{p}'s dog is called {v}.",
        "What is {p}'s dog called?",
        "{p}'s dog is called ",
        _FACTS["pet's name"],
    ),
}


def make_facts(
    seed: int,
    distance: int,
    tokenizer=_BYTE,
    filler: np.ndarray | None = None,
    num_facts: int = 4,
    attribute: str | None = None,
    lead_turns: int = 2,
) -> TaskSample:
    """Conversation recall with several facts: in speaker turns, ``num_facts`` people each get a
    value of one attribute (a place, a number or a name: 'Clara lives in Oslo.'), whole filler turns
    follow (the last one cut so the gap is exactly ``distance`` tokens), then one person's value is
    asked. A model that knows only which values were said scores 1/num_facts
    (``meta["chance"]``)."""
    if attribute is not None and attribute not in _ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r}: expected one of {sorted(_ATTRIBUTES)}")
    if not 1 <= num_facts <= 8:
        raise ValueError(f"num_facts must be in 1..8, got {num_facts}")

    def turn(rng, spk, n=None):
        if n is None:
            body = (
                tokenizer.encode(
                    " ".join(_sentence(rng, _CHAT) for _ in range(int(rng.integers(1, 3))))
                )
                if filler is None
                else _filler(rng, int(rng.integers(16, 49)), tokenizer, filler)
            )
        else:
            body = _filler(rng, n, tokenizer, filler)
        return np.concatenate([tokenizer.encode(f"{spk}: "), body, tokenizer.encode("\n")]).astype(
            np.int64
        )

    def body(rng, s):
        attr = attribute or _pick(rng, sorted(_ATTRIBUTES))
        say, ask, prefix, pool = _ATTRIBUTES[attr]
        people = [_PEOPLE[i] for i in rng.choice(len(_PEOPLE), num_facts, replace=False)]
        vals = (
            _numbers(rng, num_facts, 3)
            if pool is None
            else [pool[i] for i in rng.choice(len(pool), num_facts, replace=False)]
        )
        for i in range(lead_turns):
            s.add(turn(rng, "AB"[i % 2]))
        for i, (p, v) in enumerate(zip(people, vals)):
            spk = "AB"[(lead_turns + i) % 2]
            head, _, tail = say.format(p=p, v="\0").partition("\0")
            s.add(f"{spk}: By the way, {head}", "fact").add(v, "fact").add(tail + "\n", "fact")
        total, spk = 0, "AB"[(lead_turns + num_facts) % 2]
        while total < distance:
            t = turn(rng, spk)
            if total + len(t) > distance:  # the last turn, cut to the exact gap (or spaces)
                rest = distance - total
                pre = len(tokenizer.encode(f"{spk}: ")) + len(tokenizer.encode("\n"))
                t = (
                    turn(rng, spk, rest - pre)
                    if rest > pre
                    else np.concatenate([tokenizer.encode(" ") for _ in range(rest)]).astype(
                        np.int64
                    )
                )
            s.add(t)
            total, spk = total + len(t), "B" if spk == "A" else "A"
        j = int(rng.integers(num_facts))
        s.add(f"A: {ask.format(p=people[j])}\nB: {prefix.format(p=people[j])}", "ask").add(
            vals[j], "ans"
        )
        return {
            "attribute": attr,
            "people": people,
            "values": vals,
            "asked": j,
            "value": vals[j],
            "chance": 1.0 / num_facts,
        }, vals

    return _make("facts", seed, distance, tokenizer, body)


TASKS = {
    "passkey": make_passkey,
    "needle": make_needle,
    "mqar": make_mqar,
    "conversation": make_conversation,
    "facts": make_facts,
}


def make_task(
    name: str, seed: int, distance: int, tokenizer=_BYTE, filler: np.ndarray | None = None
) -> TaskSample:
    """Dispatch to ``TASKS[name]`` with the task's default parameters."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: expected one of {sorted(TASKS)}")
    return TASKS[name](seed, distance, tokenizer=tokenizer, filler=filler)


# ---------------------------------------------------------------- batching and scoring
def pad_samples(
    samples: list[TaskSample],
    length: int | None = None,
    pad_id: int = 0,
    filler: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad to a common length (the longest, or ``length``) with ``filler``'s first tokens, else
    ``pad_id``; every row ends with its answers. Returns tokens int64 [B, L], answer_mask bool [B,
    L]."""
    if not samples:
        raise ValueError("no samples to pad")
    longest = max(len(s.tokens) for s in samples)
    L = longest if length is None else int(length)
    if L < longest:
        raise ValueError(f"length {L} is shorter than the longest sample ({longest} tokens)")
    tokens = np.full((len(samples), L), pad_id, np.int64)
    mask = np.zeros((len(samples), L), bool)
    for b, s in enumerate(samples):
        p = L - len(s.tokens)
        if filler is not None and p:
            tokens[b, :p] = np.resize(np.asarray(filler, np.int64).ravel(), p)
        tokens[b, p:], mask[b, p:] = s.tokens, s.answer_mask
    return tokens, mask


def task_batch(
    name: str,
    seeds: list[int],
    distance: int,
    tokenizer=_BYTE,
    filler: np.ndarray | None = None,
    length: int | None = None,
    pad_id: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """``make_task`` for each seed, left-padded by ``pad_samples``: tokens [B, L], answer_mask [B,
    L]."""
    return pad_samples(
        [make_task(name, s, distance, tokenizer, filler) for s in seeds], length, pad_id, filler
    )


def _np(x) -> np.ndarray:
    return np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)


def _answer_hits(pred, tokens, answer_mask):
    pred, tokens, mask = _np(pred), _np(tokens), _np(answer_mask).astype(bool)
    if tokens.ndim == 1:
        pred, tokens, mask = pred[None], tokens[None], mask[None]
    B, L = tokens.shape
    if mask.shape != (B, L) or pred.shape not in ((B, L - 1), (B, L)):
        raise ValueError(
            f"shapes: pred {pred.shape} must be [B, L-1] or [B, L] for tokens {tokens.shape}, "
            f"answer_mask {mask.shape} must equal tokens"
        )
    if mask[:, 0].any():
        raise ValueError("answer_mask is True at position 0, which no prefix predicts")
    m = mask[:, 1:]
    if not m.any(1).all():
        raise ValueError("a row has no answer tokens")
    return pred[:, : L - 1] == tokens[:, 1:], m


def answer_accuracy(pred, tokens, answer_mask) -> np.ndarray:
    """Per-sample exact match, bool [B]. ``pred`` [B, L-1] (or [B, L], last column ignored) is the
    argmax at positions 0..L-2, so ``pred[:, t]`` predicts ``tokens[:, t+1]``; numpy or torch."""
    hit, m = _answer_hits(pred, tokens, answer_mask)
    return (hit | ~m).all(1)


def answer_token_accuracy(pred, tokens, answer_mask) -> np.ndarray:
    """Per-sample fraction of answer tokens predicted exactly, float [B]; arguments as
    ``answer_accuracy``."""
    hit, m = _answer_hits(pred, tokens, answer_mask)
    return (hit & m).sum(1) / m.sum(1)


class TaskMixer:
    """Uniform mixture over ``tasks`` x ``distances``; samples come from the ``rng`` passed to
    ``sample``/``batch``, else from a generator seeded by ``seed`` (deterministic either way)."""

    def __init__(
        self,
        tasks=tuple(TASKS),
        distances=(64, 256, 1024),
        seed: int = 0,
        tokenizer=_BYTE,
        filler: np.ndarray | None = None,
    ):
        bad = [t for t in tasks if t not in TASKS]
        if bad or not tasks:
            raise ValueError(f"unknown or no tasks {bad}: expected a subset of {sorted(TASKS)}")
        if not distances or any(not _is_int(d) or d < 0 for d in distances):
            raise ValueError(f"distances must be non-negative ints, got {distances!r}")
        self.tasks, self.distances = tuple(tasks), tuple(int(d) for d in distances)
        self.tokenizer, self.filler = tokenizer, filler
        self._rng = np.random.default_rng(seed)

    def sample(self, rng: np.random.Generator | None = None, distances=None) -> TaskSample:
        """One sample; ``distances`` (optional) replaces the mixer's for this draw."""
        rng = self._rng if rng is None else rng
        name, d = _pick(rng, self.tasks), _pick(rng, distances or self.distances)
        return make_task(name, int(rng.integers(2**31)), d, self.tokenizer, self.filler)

    def batch(
        self,
        n: int,
        length: int | None = None,
        pad_id: int = 0,
        rng: np.random.Generator | None = None,
        distances=None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``n`` mixed samples left-padded: tokens int64 [n, L], answer_mask bool [n, L]."""
        return pad_samples(
            [self.sample(rng, distances) for _ in range(n)], length, pad_id, self.filler
        )
