"""Streaming evaluation equals the parallel evaluation; buckets cover every predicted token."""

import numpy as np
import torch
from conftest import assert_close, tiny_config

import moshi_ttt as mt
from moshi_ttt.evaluation import bucket_edges, loss_by_position, stream_predictions, task_accuracy


def test_loss_by_position_equals_parallel():
    model = mt.StreamingLM(tiny_config("window", window=8)).eval()
    docs = [np.random.default_rng(i).integers(0, 50, n) for i, n in enumerate([2300, 1500, 900])]
    rows = loss_by_position(model, docs, max_len=2200, step=64, progress=False)
    sums, counts = {}, {}
    with torch.no_grad():
        for d in docs:
            t = torch.as_tensor(d[:2200], dtype=torch.long)[None]
            nll = torch.nn.functional.cross_entropy(
                model(t)[0, :-1], t[0, 1:], reduction="none"
            ).numpy()
            for j, v in enumerate(nll, start=1):  # nll of token j
                b = 0 if j < 1000 else (1 if j < 2000 else 2)
                sums[b] = sums.get(b, 0.0) + v
                counts[b] = counts.get(b, 0) + 1
    assert [(r["lo"], r["hi"]) for r in rows] == [(0, 1000), (1000, 2000), (2000, 2200)]
    assert [r["tokens"] for r in rows] == [counts[0], counts[1], counts[2]]
    for b, r in enumerate(rows):
        assert_close(r["loss"], sums[b] / counts[b], 1e-4)


def test_bucket_edges_stop_at_max_len():
    assert bucket_edges(7000) == [(0, 1000), (1000, 2000), (2000, 5000), (5000, 7000)]
    assert bucket_edges(500) == [(0, 500)]


def test_stream_predictions_equal_parallel_argmax():
    model = mt.StreamingLM(tiny_config("sink", window=6)).eval()
    x = torch.randint(0, 50, (3, 131))
    with torch.no_grad():
        ref = model(x)[:, :-1].argmax(-1)
    assert torch.equal(stream_predictions(model, x, step=17), ref)


def test_task_accuracy_deterministic_and_bounded():
    model = mt.StreamingLM(mt.ModelConfig.preset("tiny")).eval()
    a = task_accuracy(model, "passkey", [16, 64], num=3, progress=False)
    b = task_accuracy(model, "passkey", [16, 64], num=3, progress=False)
    assert a == b
    assert all(
        0.0 <= r["token_accuracy"] <= 1.0 and r["accuracy"] <= r["token_accuracy"] for r in a
    )
