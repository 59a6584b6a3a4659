"""The minimal trainer learns; batches respect document boundaries; checkpoints round-trip."""

import numpy as np
import pytest
import torch
from conftest import assert_close, tiny_config

import moshi_ttt as mt
from moshi_ttt.checkpoint import load_checkpoint, save_checkpoint
from moshi_ttt.data.batches import doc_starts, sample_windows
from moshi_ttt.trainer import train
from moshi_ttt.training import TrainConfig, lm_loss, lr_at


def toy_corpus(n_docs=40, length=300, seed=0):
    """Documents following a fixed successor rule from a random start: learnable, so loss must
    fall."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        d = [int(rng.integers(0, 50))]
        for _ in range(length - 1):
            d.append((3 * d[-1] + 1) % 50 if rng.random() < 0.9 else int(rng.integers(0, 50)))
        docs.append(np.array(d))
    stream = np.concatenate(docs).astype(np.uint8)
    ends = np.cumsum([len(d) for d in docs])
    return stream, np.stack([ends - length, ends], axis=1)


def test_loss_falls():
    stream, bounds = toy_corpus()
    model = mt.StreamingLM(tiny_config("window", window=16))
    cfg = TrainConfig(steps=60, batch_size=8, seq_len=64, lr=3e-3, warmup=5, log_every=1)
    rows = train(model, stream, bounds, cfg, progress=False)
    first = np.mean([r["loss"] for r in rows[:3]])
    last = np.mean([r["loss"] for r in rows[-3:]])
    assert first > np.log(50) - 0.5  # starts near chance for 50 symbols
    assert last < 0.5 * first


def test_windows_mark_document_starts():
    stream, bounds = toy_corpus(n_docs=5, length=30)
    starts = doc_starts(len(stream), bounds)
    x, y, resets, w = sample_windows(stream, starts, 16, 40, np.random.default_rng(0))
    offs = np.random.default_rng(0).integers(0, len(stream) - 41, size=16)  # the same draw
    idx = offs[:, None] + np.arange(41)
    assert torch.equal(x, torch.from_numpy(stream[idx[:, :-1]].astype(np.int64)))
    assert torch.equal(y, torch.from_numpy(stream[idx[:, 1:]].astype(np.int64)))
    assert torch.equal(resets[:, 1:], torch.from_numpy(starts[idx[:, 1:-1]]))
    assert not resets[:, 0].any()
    assert torch.equal(w == 0, torch.from_numpy(starts[idx[:, 1:]]))


def test_weighted_loss_equals_masked_mean():
    model = mt.StreamingLM(tiny_config("full"))
    x, y = torch.randint(0, 50, (2, 20)), torch.randint(0, 50, (2, 20))
    w = torch.ones(2, 20)
    w[0, 5:] = 0
    logits = model(x)
    nll = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), y.flatten(), reduction="none"
    ).view(2, 20)
    ref = torch.cat([nll[0, :5], nll[1]]).mean()
    assert_close(lm_loss(model, x, y, None, w), ref, 1e-5)


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=10)
    assert_close(lr_at(0, cfg), 0.1, 1e-7)
    assert_close(lr_at(9, cfg), 1.0, 1e-7)
    assert_close(lr_at(99, cfg), 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 89 / 90)), 1e-7)


def test_checkpoint_roundtrip(tmp_path):
    model = mt.StreamingLM(tiny_config("sink"))
    save_checkpoint(tmp_path / "m.pt", model, {"name": "x"})
    loaded, meta = load_checkpoint(tmp_path / "m.pt")
    x = torch.randint(0, 50, (1, 30))
    assert meta["name"] == "x" and loaded.cfg == model.cfg
    assert torch.equal(loaded(x), model(x))
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")


def test_task_rows_weight_answers():
    from moshi_ttt.data.tasks import TaskMixer
    from moshi_ttt.training import task_rows

    mixer = TaskMixer(("passkey",), (20,), seed=0)
    x, y, resets, w = task_rows(mixer, 3, 200, 5.0, np.random.default_rng(0))
    ref_tokens, ref_mask = TaskMixer(("passkey",), (20,), seed=0).batch(
        3, length=201, rng=np.random.default_rng(0)
    )
    assert torch.equal(torch.cat([x, y[:, -1:]], 1), torch.from_numpy(ref_tokens))
    assert torch.equal(w == 5.0, torch.from_numpy(ref_mask[:, 1:])) and torch.all(
        (w == 1.0) | (w == 5.0)
    )
    assert not resets.any()
    with pytest.raises(ValueError, match="do not fit seq_len"):
        task_rows(TaskMixer(("passkey",), (500,), seed=0), 1, 100, 5.0, np.random.default_rng(0))


def test_training_with_task_rows_runs_and_learns():
    stream, bounds = toy_corpus()
    model = mt.StreamingLM(tiny_config("window", window=16, vocab=256))
    cfg = TrainConfig(
        steps=30,
        batch_size=8,
        seq_len=160,
        lr=3e-3,
        warmup=3,
        log_every=1,
        task_frac=0.25,
        tasks=("passkey",),
        task_distances=(16, 32),
        answer_weight=5.0,
    )
    rows = train(model, stream, bounds, cfg, progress=False)
    assert rows[-1]["loss"] < rows[0]["loss"]
