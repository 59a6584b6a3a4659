"""Synthetic long-range tasks: determinism, exact distances, unique facts, scoring, batching."""

import re

import numpy as np
import pytest
import torch
from conftest import assert_close

from moshi_ttt.data.tasks import (
    TASKS,
    TaskMixer,
    answer_accuracy,
    answer_token_accuracy,
    make_conversation,
    make_passkey,
    make_task,
    task_batch,
)
from moshi_ttt.data.tokenizer import ByteTokenizer

BYTE = ByteTokenizer()
EXACT = ("passkey", "needle", "mqar", "facts")  # conversation distances snap to whole turns


class WordTokenizer:
    """Word-level fake: words, numbers, single spaces/punctuation are tokens (vocab grows)."""

    vocab_size = 100_000

    def __init__(self):
        self.ids, self.words = {}, []

    def encode(self, text):
        out = []
        for w in re.findall(r"[A-Za-z']+|\d+|\s|[^\w\s]", text):
            if w not in self.ids:
                self.ids[w] = len(self.words)
                self.words.append(w)
            out.append(self.ids[w])
        return np.asarray(out, np.int64)

    def decode(self, ids):
        return "".join(self.words[int(i)] for i in ids)


def runs(mask):
    """[start, end) of each run of True."""
    d = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


def char_to_token(tok, tokens):
    """Token index of every character offset of ``tok.decode(tokens)`` (plus the end)."""
    lens = [len(tok.decode([t])) for t in tokens]
    return np.repeat(np.arange(len(tokens) + 1), lens + [1])


def fact_and_question(s, text):
    """Character offsets (end of the fact statement, start of the question), found in the text."""
    m = s.meta
    if s.task == "passkey":
        fact, q = f"The pass key is {m['value']}. Remember it.\n", "\nWhat is the pass key?"
    elif s.task == "needle":
        fact, q = (
            f" The magic number for {m['key']} is {m['value']}.",
            "\nWhat is the magic number for",
        )
    elif s.task == "mqar":
        fact = " ".join(f"{k}:{v}" for k, v in zip(m["keys"], m["values"])) + "\n"
        q = f"\n{m['queries'][0]}:{m['answers'][0]}"
    elif s.task == "facts":
        last = m["people"][-1]
        end = text.index("\n", text.index(f"By the way, {last}")) + 1
        return end, text.rindex("A: ", 0, text.rindex("?\nB: "))
    else:
        fact, q = f"A: By the way, my {m['fact']} is {m['value']}.\n", "A: Sorry, what was my"
    assert text.count(fact) == 1
    return text.index(fact) + len(fact), text.rindex(q)


def expected_answers(s):
    return s.meta["answers"] if s.task == "mqar" else [s.meta["value"]]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_same_seed_same_sample_other_seeds_differ(name):
    a, b = make_task(name, 3, 200), make_task(name, 3, 200)
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.answer_mask, b.answer_mask)
    assert a.meta == b.meta
    assert not np.array_equal(a.tokens, make_task(name, 4, 200).tokens)
    values = {tuple(expected_answers(make_task(name, s, 50))) for s in range(12)}
    assert len(values) >= 6


@pytest.mark.parametrize("name", sorted(TASKS))
@pytest.mark.parametrize("distance", [0, 1, 7, 100, 1000, 5000])
def test_realised_distance_matches_request(name, distance):
    s = make_task(name, distance + 11, distance)
    fact_end, q_start = fact_and_question(s, BYTE.decode(s.tokens))  # bytes: char offset == token
    measured = q_start - fact_end
    if name in EXACT:
        assert measured == distance
    else:  # nearest whole turn: off by at most half a turn (turns are < 200 bytes)
        assert abs(measured - distance) <= 100
    assert measured == s.distance


@pytest.mark.parametrize("name", sorted(TASKS))
def test_answers_decode_to_value_stated_once_before_question(name):
    for seed in range(5):
        s = make_task(name, seed, 300)
        text = BYTE.decode(s.tokens)
        _, q_start = fact_and_question(s, text)
        decoded = [BYTE.decode(s.tokens[a:b]) for a, b in runs(s.answer_mask)]
        assert decoded == expected_answers(s)
        assert runs(s.answer_mask)[-1][1] == len(s.tokens)  # the sample ends with its answer
        for v in s.meta["values"] if "values" in s.meta else [s.meta["value"]]:
            assert text[:q_start].count(v) == 1


def induction_oracle(tokens, mask, rng, vocab):
    """Random predictions, except answers: copy what followed the longest earlier match of the
    tokens before the answer (the fact), as an induction head would. pred [B, L-1]."""
    B, L = tokens.shape
    pred = rng.integers(0, vocab, (B, L - 1))
    for b in range(B):
        for a, e in runs(mask[b]):
            match = np.zeros(a, int)  # match[j]: suffix match of tokens[:j] against tokens[:a]
            alive = np.ones(a, bool)
            for k in range(1, 64):
                j = np.arange(a)
                ok = alive & (j - k >= 0) & (tokens[b, np.maximum(j - k, 0)] == tokens[b, a - k])
                match += ok
                alive = ok
            j = a - 1 - int(np.argmax(match[::-1]))  # the latest of the longest matches
            pred[b, a - 1 : e - 1] = tokens[b, j : j + e - a]
    return pred


@pytest.mark.parametrize("name", sorted(TASKS))
def test_copying_oracle_scores_one_random_scores_chance(name):
    rng = np.random.default_rng(0)
    tokens, mask = task_batch(name, list(range(8)), 300, BYTE)
    oracle = induction_oracle(tokens, mask, rng, 256)
    assert answer_accuracy(oracle, tokens, mask).all()
    assert answer_accuracy(torch.from_numpy(oracle), torch.from_numpy(tokens), mask).all()
    assert np.all(answer_token_accuracy(oracle, tokens, mask) == 1.0)
    # 8 rows, 8 draws each
    rand = np.random.default_rng(1).integers(0, 256, (64, *oracle.shape[1:]))
    many = (np.tile(tokens, (8, 1)), np.tile(mask, (8, 1)))
    assert not answer_accuracy(rand, *many).any()
    assert answer_token_accuracy(rand, *many).mean() < 0.03  # 1/256 expected
    # one wrong answer token: the sample fails, its token accuracy drops by one token
    broken = oracle.copy()
    last = runs(mask[0])[-1][1] - 1
    broken[0, last - 1] = (tokens[0, last] + 1) % 256
    acc, tok_acc = (
        answer_accuracy(broken, tokens, mask),
        answer_token_accuracy(broken, tokens, mask),
    )
    assert not acc[0] and acc[1:].all()
    assert_close(tok_acc[0], 1 - 1 / mask[0].sum(), 1e-6)


def test_accuracy_pred_of_length_L_ignores_last_column():
    tokens, mask = task_batch("passkey", [0, 1], 50)
    pred = np.concatenate([tokens[:, 1:], np.full((2, 1), 7)], axis=1)  # [B, L]
    assert answer_accuracy(pred, tokens, mask).all()
    assert np.array_equal(
        answer_accuracy(pred, tokens, mask), answer_accuracy(pred[:, :-1], tokens, mask)
    )


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_batch_left_pads_and_keeps_answers(name):
    seeds, filler = [5, 6, 7], BYTE.encode("Natural filler text, no numbers here. " * 20)
    for fill, length, pad_id in ((None, None, 0), (filler, 900, 3)):
        samples = [make_task(name, s, 120, filler=fill) for s in seeds]
        tokens, mask = task_batch(name, seeds, 120, BYTE, filler=fill, length=length, pad_id=pad_id)
        assert tokens.shape[1] == (length or max(len(s.tokens) for s in samples))
        for row, s in enumerate(samples):
            T, p = len(s.tokens), tokens.shape[1] - len(s.tokens)
            assert np.array_equal(tokens[row, p:], s.tokens)
            assert np.array_equal(mask[row, p:], s.answer_mask) and not mask[row, :p].any()
            expect = np.full(p, pad_id) if fill is None else np.resize(filler, p)
            assert np.array_equal(tokens[row, :p], expect)
            assert T > 0
        assert mask[:, -1].all()  # every row ends with an answer token
    with pytest.raises(ValueError, match="shorter than the longest"):
        task_batch(name, seeds, 120, length=10)


def test_bad_inputs_raise_naming_the_problem():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        make_task("nope", 0, 10)
    with pytest.raises(ValueError, match="distance must be a non-negative int, got -1"):
        make_task("passkey", 0, -1)
    with pytest.raises(ValueError, match="distance"):
        task_batch("mqar", [0], -5)
    with pytest.raises(ValueError, match="seed"):
        make_task("needle", -2, 10)
    with pytest.raises(ValueError, match="unknown or no tasks"):
        TaskMixer(tasks=("passkey", "bogus"))
    with pytest.raises(ValueError, match="position 0"):
        answer_accuracy(np.zeros((1, 3)), np.zeros((1, 4)), np.array([[1, 0, 0, 1]], bool))
    with pytest.raises(ValueError, match="unknown fact"):
        make_conversation(0, 10, fact="shoe size")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_word_level_tokenizer(name):
    tok = WordTokenizer()
    for distance in (0, 40, 400):
        s = make_task(name, 1, distance, tokenizer=tok)
        text = tok.decode(s.tokens)
        to_tok = char_to_token(tok, s.tokens)
        fact_end, q_start = fact_and_question(s, text)
        measured = to_tok[q_start] - to_tok[fact_end]
        assert measured == distance if name in EXACT else abs(measured - distance) <= 40
        assert [tok.decode(s.tokens[a:b]) for a, b in runs(s.answer_mask)] == expected_answers(s)
        assert all(b - a == 1 for a, b in runs(s.answer_mask))  # a number / word is one token here


def test_given_filler_is_sliced_and_values_resampled_away_from_it():
    tok = WordTokenizer()
    filler = tok.encode("the sky holds 1 2 3 4 5 6 7 8 and more words. " * 30)
    for seed in range(6):  # 1..8 occur in every slice, so only 9 can stay unique
        s = make_passkey(seed, 60, tokenizer=tok, filler=filler, digits=1)
        assert s.meta["value"] == "9" and tok.decode(s.tokens).count("9") == 2
        gap = s.tokens[s.meta["fact_span"][1] : s.meta["question_start"]]
        doubled = np.concatenate([filler, filler])
        assert any(np.array_equal(doubled[i : i + 60], gap) for i in range(len(filler)))
    c = make_conversation(0, 200, tokenizer=tok, filler=filler)
    assert tok.decode(c.tokens[c.answer_mask]) == c.meta["value"]


def test_mixer_is_deterministic_and_covers_tasks():
    a = TaskMixer(distances=(16, 64), seed=1)
    b = TaskMixer(distances=(16, 64), seed=1)
    xs, ys = [a.sample() for _ in range(24)], [b.sample() for _ in range(24)]
    assert all(np.array_equal(x.tokens, y.tokens) for x, y in zip(xs, ys))
    assert {x.task for x in xs} == set(TASKS) and {
        x.distance for x in xs if x.task != "conversation"
    } == {16, 64}
    other = TaskMixer(distances=(16, 64), seed=2)
    c = [other.sample() for _ in range(4)]
    assert not all(np.array_equal(x.tokens, y.tokens) for x, y in zip(xs, c))
    t1, m1 = a.batch(4, rng=np.random.default_rng(9))
    t2, m2 = b.batch(4, rng=np.random.default_rng(9))
    assert np.array_equal(t1, t2) and np.array_equal(m1, m2) and m1[:, -1].all()
