"""Key-value binding: samples against a reading of their own facts, the chance and bag lines
against simulated bag models, the recall curriculum's options (near distances, key schedule,
answer-only loss, step scaling) against the rows they produce, and binding accuracy against a
per-sample parallel reference."""

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from moshi_ttt.config import ModelConfig, memory_variant
from moshi_ttt.data.binding import (
    ENQ,
    ETX,
    KEYS,
    STX,
    VALUES,
    bag_line,
    binding_batch,
    binding_rows,
    chance,
    clean_filler,
    make_binding,
)
from moshi_ttt.evaluation import binding_accuracy
from moshi_ttt.models.lm import StreamingLM
from moshi_ttt.pipeline import EvalConfig, binding_results, distance_unit, scale_steps
from moshi_ttt.recall_report import controls, study_window
from moshi_ttt.training import TRAIN_PRESETS, TaskRows, TrainConfig


def read_sample(tokens: np.ndarray) -> tuple[dict[int, int], int, list[tuple[int, int]]]:
    """A sample parsed from its tokens alone: (facts key -> value, filler length, questions)."""
    t = tokens.tolist()
    s, e, q = t.index(STX), t.index(ETX), t.index(ENQ)
    facts = dict(zip(t[s + 1 : e : 2], t[s + 2 : e : 2]))
    pairs = zip(t[q + 1 :: 2], t[q + 2 :: 2])  # questions, then any filler after the sample
    return facts, q - e - 1, list(itertools.takewhile(lambda kv: kv[0] in KEYS, pairs))


@pytest.mark.parametrize(
    "num_keys,num_queries,distance,repeat",
    [
        (1, 1, 0, False),
        (4, 1, 7, False),
        (8, 8, 3, False),
        (16, 5, 64, False),
        (4, 4, 2, True),
        (8, 8, 0, True),
    ],
)
def test_sample_answers_are_the_stated_values(num_keys, num_queries, distance, repeat):
    s = make_binding(11, distance, num_keys, num_queries, repeat=repeat)
    facts, d, questions = read_sample(s.tokens)
    assert d == distance and len(facts) == num_keys and len(questions) == num_queries
    assert all(facts[k] == v for k, v in questions)  # every answer is its key's stated value
    if not repeat:
        assert len({k for k, _ in questions}) == num_queries  # distinct keys asked
    assert set(facts) <= set(KEYS.tolist()) and set(facts.values()) <= set(VALUES.tolist())
    answers = s.tokens[s.answer_mask].tolist()
    assert answers == [v for _, v in questions]
    assert s.meta["answer_start"] == int(np.flatnonzero(s.answer_mask)[0])
    again = make_binding(11, distance, num_keys, num_queries, repeat=repeat)
    np.testing.assert_array_equal(again.tokens, s.tokens)


def test_repeated_questions_leave_a_bag_at_chance_on_every_question():
    """With keys asked with replacement, a bag that rules out answered values is wrong whenever a
    key comes back; guessing among all stated values scores 1/N on every question."""
    rng = np.random.default_rng(1)
    n, repeats, eliminate, uniform = 4, 0, [], []
    for seed in range(3000):
        facts, _, questions = read_sample(make_binding(seed, 0, n, n, repeat=True).tokens)
        repeats += len({k for k, _ in questions}) < n
        left = list(facts.values())
        for _, v in questions:
            uniform.append(rng.choice(list(facts.values())) == v)
            eliminate.append(bool(left) and rng.choice(left) == v)
            if v in left:
                left.remove(v)
    assert repeats > 2000  # most samples ask some key twice (1 - 4!/4^4 = 0.91)
    assert abs(np.mean(uniform) - chance(n)) < 0.02
    assert np.mean(eliminate) < bag_line(n) - 0.1  # elimination no longer reaches H_N/N


def test_chance_and_bag_lines_match_simulated_bag_models():
    """A model that knows only which values were stated: guessing uniformly among them scores
    1/N on one question; ruling out those already answered scores H_N/N over all questions."""
    rng = np.random.default_rng(0)
    for n in (1, 2, 4, 8):
        one, every = [], []
        for seed in range(3000):
            s = make_binding(seed, 0, n, n)
            facts, _, questions = read_sample(s.tokens)
            left = list(facts.values())
            one.append(rng.choice(left) == questions[0][1])
            for _, v in questions:
                guess = rng.choice(left)
                every.append(guess == v)
                left.remove(v)  # the answer is revealed as the next input
        assert abs(np.mean(one) - chance(n)) < 0.03
        assert abs(np.mean(every) - bag_line(n)) < 0.03


def test_corpus_filler_cannot_forge_keys_values_or_markers():
    corpus = np.arange(256).repeat(3)
    clean = clean_filler(corpus)
    assert not np.isin(clean, np.r_[KEYS, VALUES, [STX, ETX, ENQ]]).any()
    s = make_binding(3, 40, 4, 1, clean)
    facts, d, _ = read_sample(s.tokens)
    assert d == 40 and len(facts) == 4


def test_rows_end_with_a_sample_and_state_their_answers():
    rng = np.random.default_rng(1)
    toks, mask = binding_rows(rng, 32, 80, (2, 4, 8), (0, 5, 9), num_queries=0)
    assert toks.shape == mask.shape == (32, 80)
    for row, m in zip(toks, mask):
        facts, d, questions = read_sample(row)
        assert len(facts) in (2, 4, 8) and d in (0, 5, 9) and len(questions) == len(facts)
        assert row[m].tolist() == [facts[k] for k, _ in questions]
        assert row[-1] == questions[-1][1]  # the sample ends the row (left-filled)
    with pytest.raises(ValueError, match="more than the row length"):
        binding_rows(rng, 1, 20, (8,), (9,))


def test_rows_with_the_sample_anywhere_state_their_answers_at_every_offset():
    rng = np.random.default_rng(2)
    toks, mask = binding_rows(rng, 256, 40, (2, 4), (0, 3), num_queries=0, anywhere=True)
    ends = binding_rows(np.random.default_rng(2), 256, 40, (2, 4), (0, 3), num_queries=0)[0]
    starts = []
    for row, m in zip(toks, mask):
        facts, d, questions = read_sample(row)
        assert len(facts) in (2, 4) and d in (0, 3) and len(questions) == len(facts)
        assert row[m].tolist() == [facts[k] for k, _ in questions]
        starts.append(row.tolist().index(STX))
        last = int(np.flatnonzero(m)[-1])
        assert not np.isin(row[last + 1 :], np.r_[KEYS, VALUES, [STX, ETX, ENQ]]).any()
    assert min(starts) == 0 and max(starts) == 40 - 11  # first and last offsets (N 2, d 0)
    assert all(row[-1] in VALUES for row in ends)  # without: every row ends with its last answer


def facts_of_rows(rows) -> list[tuple[int, int]]:
    """(N, d) of every row of a TaskRows batch, read from its input tokens."""
    x = torch.cat([rows[0], rows[1][:, -1:]], 1).numpy()  # inputs + the last target
    return [(len(f), d) for f, d, _ in map(read_sample, x)]


def test_recall_curriculum_draws_keys_and_distances_by_step():
    cfg = TrainConfig(
        steps=30,
        batch_size=64,
        seq_len=120,
        task_frac=1.0,
        tasks=("binding",),
        binding_keys=(16,),
        keys_schedule=((0, (2,)), (10, (2, 4)), (20, (8,))),
        near_steps=15,
        near_distances=(0, 1),
        task_distances=(30, 40),
    )
    rows = TaskRows(cfg)
    rng = np.random.default_rng(0)
    for step, keys, dists in (
        (0, {2}, {0, 1}),
        (12, {2, 4}, {0, 1}),
        (17, {2, 4}, {30, 40}),
        (25, {8}, {30, 40}),
    ):
        seen = facts_of_rows(rows(64, cfg.seq_len, step, rng))
        assert {n for n, _ in seen} == keys == set(cfg.keys_at(step))
        assert {d for _, d in seen} == dists
    again = dataclasses.replace(cfg, binding_repeat=True)
    x, y, _, _ = TaskRows(again)(64, cfg.seq_len, 25, np.random.default_rng(0))
    asked = [[k for k, _ in read_sample(r)[2]] for r in torch.cat([x, y[:, -1:]], 1).numpy()]
    assert any(len(set(a)) < len(a) for a in asked)  # binding_repeat: some key asked twice
    for anywhere in (False, True):  # binding_anywhere: samples leave rows' ends to filler
        x, y, _, w = TaskRows(dataclasses.replace(cfg, binding_anywhere=anywhere))(
            64, cfg.seq_len, 0, np.random.default_rng(0)
        )
        ends_answered = np.isin(y[:, -1].numpy(), VALUES) & (w[:, -1] > 0).numpy()
        assert ends_answered.all() != anywhere and (w > 0).sum(1).min() >= 2
    late = dataclasses.replace(cfg, keys_schedule=((5, (2,)),))
    assert late.keys_at(4) == (16,) and late.keys_at(5) == (2,)  # binding_keys before the first


@pytest.mark.parametrize("context_weight", [0.0, 0.25, 1.0])
def test_answer_only_loss_weighs_answers_alone(context_weight):
    cfg = TrainConfig(
        steps=2,
        batch_size=8,
        seq_len=40,
        task_frac=1.0,
        tasks=("binding",),
        binding_keys=(3,),
        near_distances=(4,),
        near_steps=2,
        answer_weight=2.0,
        context_weight=context_weight,
    )
    x, y, _, w = TaskRows(cfg)(8, cfg.seq_len, 0, np.random.default_rng(2))
    expected = torch.full_like(w, context_weight)
    for i, row in enumerate(torch.cat([x, y[:, -1:]], 1).numpy()):
        facts, _, questions = read_sample(row)
        q = int(np.flatnonzero(row == ENQ)[-1])
        for j in range(len(questions)):
            expected[i, q + 1 + 2 * j] = 2.0  # the target after each asked key is its value
            assert y[i, q + 1 + 2 * j] == facts[questions[j][0]]
    torch.testing.assert_close(w, expected)


def test_scale_steps_scales_every_schedule():
    base = TRAIN_PRESETS["recall"]
    half = scale_steps(base, base.total_steps() // 2)
    f = half.total_steps() / base.total_steps()
    assert half.near_steps == round(base.near_steps * f)
    assert half.seq_schedule == tuple((round(s * f), n) for s, n in base.seq_schedule)
    assert half.keys_schedule == tuple((round(s * f), ns) for s, ns in base.keys_schedule)
    assert base.keys_schedule, "the recall recipe states few keys first"


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"keys_schedule": ((0, (2,)), (0, (4,)))}, "increasing"),
        ({"keys_schedule": ((0, ()),)}, "non-empty"),
        ({"keys_schedule": ((0, (65,)),)}, "1..64"),
        ({"keys_schedule": ((0, 4),)}, "pairs"),
        ({"keys_schedule": ((0, (1,)),), "binding_queries": 2}, "fewest keys"),
    ],
)
def test_keys_schedule_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad)


@pytest.mark.parametrize("spec", ["window", "full", "ttt_cache"])
def test_binding_accuracy_streamed_equals_a_parallel_reference(spec):
    """The streamed score against argmax of one parallel forward per sample."""
    torch.manual_seed(0)
    _, cfg = memory_variant(ModelConfig.preset("recall"), spec, 32, 32, 16)
    model = StreamingLM(dataclasses.replace(cfg, dim=32, num_heads=2)).eval()
    num, n, dists = 12, 4, [3, 50]
    rows = binding_accuracy(model, n, dists, num, seed=5, step=16, batch=5, progress=False)
    for row, d in zip(rows, dists):
        toks, mask = binding_batch([5 * 1_000_003 + i for i in range(num)], d, n)
        with torch.no_grad():
            pred = model(torch.as_tensor(toks)).argmax(-1)[:, :-1].numpy()
        assert row["accuracy"] == pytest.approx((pred == toks[:, 1:])[mask[:, 1:]].mean())
        assert row["chance"] == chance(n) and row["distance"] == d


def fake_metrics(inside: dict[str, float], beyond: dict[str, float]) -> dict:
    """metrics.json with N = 4 binding rows at 0.5 and 4 x W for models named like their kinds."""
    models = {}
    for name in inside:
        rows = [
            {"distance_w": 0.5, "distance": 16, "accuracy": inside[name]},
            {"distance_w": 4.0, "distance": 128, "accuracy": beyond[name]},
        ]
        models[name] = {
            "config": {"memory": {"kind": name.split("-")[0], "window": 32}, "num_layers": 2},
            "binding": {"one": {"4": rows}},
        }
    return {"models": models}


def test_report_names_models_in_which_binding_did_not_form():
    m = fake_metrics(
        {"full": 1.0, "window-32": 0.97, "ttt_cache-32": 0.3},
        {"full": 0.99, "window-32": 0.26, "ttt_cache-32": 0.31},
    )
    c = controls(m, 208)
    assert c["passed"] and c["full"]["min_binding_within_training"] == 0.99
    assert c["not_formed"] == {"ttt_cache-32": 0.3}
    m["models"]["window-32"]["binding"]["one"]["4"][1]["accuracy"] = 0.5  # window above chance
    assert not controls(m, 208)["passed"]
    m["models"]["window-32"]["binding"]["one"]["4"][1]["distance_w"] = 1.0  # within 2 layers' reach
    assert controls(m, 208)["window"]["max_binding_beyond_window"] is None


def test_a_study_window_sets_the_distances_of_every_model():
    """Models of other windows: the negative control is the study window's, and binding formed
    is judged inside each model's own window."""
    m = fake_metrics(
        {"window-128": 1.0, "full": 1.0, "window-32": 0.97},
        {"window-128": 0.02, "full": 0.99, "window-32": 0.02},
    )
    m["models"]["window-128"]["config"]["memory"]["window"] = 128
    far = m["models"]["window-128"]["binding"]["one"]["4"][1]
    far.update(distance_w=2.0, distance=64, accuracy=1.0)  # 2 x 32 tokens: inside its window
    assert study_window(m) == 128  # no evaluation window: the first model's
    m["eval"] = {"window": 32}
    c = controls(m, 208)
    assert study_window(m) == 32 and c["window"]["model"] == "window-32" and c["passed"]
    assert c["not_formed"] == {}
    m["models"]["window-128"]["binding"]["one"]["4"][0]["accuracy"] = 0.5
    assert controls(m, 208)["not_formed"] == {}  # its best inside its window: 1.0 at 64 tokens
    far["accuracy"] = 0.6
    assert controls(m, 208)["not_formed"] == {"window-128": 0.6}


@pytest.mark.parametrize("window,multiple", [(0, 2.0), (16, 3.0)])
def test_eval_window_scales_binding_distances(window, multiple):
    """A window-24 model at 2 x its own window and at 3 x an evaluation window of 16: both 48
    filler tokens, the same score."""
    torch.manual_seed(0)
    _, cfg = memory_variant(ModelConfig.preset("recall"), "window", 32, 24, 16)
    model = StreamingLM(dataclasses.replace(cfg, dim=32, num_heads=2)).eval()
    ec = EvalConfig(
        binding_keys=(2,),
        binding_distances=(multiple,),
        binding_num=6,
        perplexity=False,
        window=window,
    )
    row = binding_results(model, ec, distance_unit(model, ec), "cpu")["one"]["2"][0]
    ref = binding_accuracy(model, 2, [48], 6, progress=False)[0]
    assert row["distance"] == 48 and row["distance_w"] == multiple
    assert row["accuracy"] == ref["accuracy"]
    with pytest.raises(ValueError, match="EvalConfig.window"):
        EvalConfig(window=-1)


def test_a_full_model_that_does_not_bind_fails_the_positive_control():
    """Full attention on the bag inside its training length: the controls fail, whatever the
    window does."""
    m = fake_metrics({"full": 0.3, "window-32": 0.97}, {"full": 0.27, "window-32": 0.2})
    c = controls(m, 208)
    assert c["window"]["passed"] and not c["full"]["passed"] and not c["passed"]
    assert c["full"]["min_binding_within_training"] == 0.27
