"""The trainer: loss falls, bit-exact resume, stage freezing, schedules, DDP equals one process."""

import dataclasses
import os

import numpy as np
import pytest
import torch
from conftest import assert_close, spawn_gloo_pair

import moshi_ttt as mt
from moshi_ttt.trainer import Trainer
from moshi_ttt.training import Stage, TrainConfig


def corpus(n_docs=30, seed=0):
    """English-like byte text: sentences from a small vocabulary, documents of varied length."""
    rng = np.random.default_rng(seed)
    words = "the a river stone light memory window of and to in is was it that long short".split()
    docs = [
        " ".join(rng.choice(words, size=int(rng.integers(100, 400)))).encode() + b". "
        for _ in range(n_docs)
    ]
    stream = np.frombuffer(b"".join(docs), dtype=np.uint8)
    ends = np.cumsum([len(d) for d in docs])
    return stream, np.stack([ends - [len(d) for d in docs], ends], 1)


def cache_model(seed=0):
    torch.manual_seed(seed)
    return mt.StreamingLM(
        mt.ModelConfig.preset("tiny", memory=mt.MemoryConfig(kind="ttt_cache", window=16, block=8))
    )


BASE = TrainConfig(steps=8, batch_size=4, seq_len=64, lr=3e-3, warmup=2, log_every=1)


def test_loss_falls_on_tiny_within_a_minute():
    torch.manual_seed(0)
    model = mt.StreamingLM(mt.ModelConfig.preset("tiny"))
    cfg = dataclasses.replace(BASE, steps=80, batch_size=8, seq_len=128)
    log = Trainer(model, cfg, corpus(), progress=False).fit()
    first = np.mean([r["loss"] for r in log[:3]])
    assert first > np.log(256) - 1.0  # starts near chance for bytes
    assert np.mean([r["loss"] for r in log[-5:]]) < 0.6 * first


def test_resume_is_bit_exact(tmp_path):
    cfg = dataclasses.replace(
        BASE,
        steps=10,
        seq_len=96,
        checkpoint_every=4,
        task_frac=0.25,
        tasks=("passkey",),
        task_distances=(4,),
        answer_weight=3.0,
    )
    straight = Trainer(cache_model(), cfg, corpus(), out=tmp_path / "a", progress=False)
    log_a = straight.fit()
    # stop after 4 steps (a checkpoint), then resume in a fresh trainer and model
    first = Trainer(cache_model(), cfg, corpus(), out=tmp_path / "b", progress=False)
    for _ in range(4):
        first.train_step()
    first.save()
    second = Trainer(cache_model(seed=99), cfg, corpus(), out=tmp_path / "b", progress=False)
    second.load(tmp_path / "b" / "train_state.pt")
    assert second.step == 4
    log_b = [first.log, second.fit(resume=False)]
    for name, p in straight.model.state_dict().items():
        assert torch.equal(p, second.model.state_dict()[name]), name
    assert [r["loss"] for r in log_a[4:]] == [r["loss"] for r in log_b[1][-6:]]


def test_mismatched_or_corrupt_checkpoint(tmp_path):
    t = Trainer(cache_model(), BASE, corpus(), out=tmp_path, progress=False)
    t.save()
    other = Trainer(cache_model(), dataclasses.replace(BASE, lr=1e-3), corpus(), progress=False)
    with pytest.raises(ValueError, match="another training config"):
        other.load(tmp_path / "train_state.pt")
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable training checkpoint"):
        other.load(tmp_path / "bad.pt")


def test_stages_freeze_exactly_what_they_say():
    stages = (
        Stage("memory", 2, ("*.memory.*",), "reconstruction"),
        Stage("attention", 2, ("*.memory.*", "*.self_attn.*"), frozen_layers_below=1),
        Stage("all", 2),
    )
    cfg = dataclasses.replace(BASE, stages=stages, seq_len=96)
    t = Trainer(cache_model(), cfg, corpus(), progress=False)
    expect = {
        "memory": lambda n: ".memory." in n,
        "attention": lambda n: (
            (".memory." in n or ".self_attn." in n) and not n.startswith("layers.0.")
        ),
        "all": lambda n: True,
    }
    for stage in stages:
        before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
        for _ in range(stage.steps):
            t.train_step()
        changed = {n for n, p in t.model.named_parameters() if not torch.equal(before[n], p)}
        trainable = {n for n, _ in t.model.named_parameters() if expect[stage.name](n)}
        assert {n for n, p in t.model.named_parameters() if p.requires_grad} == trainable, (
            stage.name
        )
        assert changed <= trainable, (stage.name, changed - trainable)  # frozen ones never move
        # (a few get no gradient from this loss)
        assert len(changed) >= 0.8 * len(trainable), stage.name


def test_reconstruction_needs_a_ttt_cache():
    cfg = dataclasses.replace(BASE, stages=(Stage("memory", 1, ("*",), "reconstruction"),))
    with pytest.raises(ValueError, match="reconstruction loss"):
        Trainer(
            mt.StreamingLM(mt.ModelConfig.preset("tiny")), cfg, corpus(), progress=False
        ).train_step()


def test_sequence_length_schedule():
    cfg = dataclasses.replace(BASE, steps=6, seq_schedule=((0, 32), (2, 48), (4, 64)))
    log = Trainer(cache_model(), cfg, corpus(), progress=False).fit()
    assert [r["seq_len"] for r in log] == [32, 32, 48, 48, 64, 64]


def _ddp_worker(rank, port, cfg, out):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2"
    )
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    t = Trainer(cache_model(), cfg, corpus(), progress=False)
    log = t.fit()
    if rank == 0:
        torch.save({"weights": t.model.state_dict(), "losses": [r["loss"] for r in log]}, out)
    torch.distributed.destroy_process_group()


def test_ddp_two_processes_equal_one(tmp_path):
    cfg = dataclasses.replace(BASE, steps=3, grad_accum=2)
    single = Trainer(cache_model(), cfg, corpus(), progress=False)
    losses = [r["loss"] for r in single.fit()]
    spawn_gloo_pair(_ddp_worker, cfg, tmp_path / "ddp.pt")
    ddp = torch.load(tmp_path / "ddp.pt")
    for n, p in single.model.state_dict().items():
        assert_close(p, ddp["weights"][n], 1e-5, n)
    assert_close(losses, ddp["losses"], 1e-5, "losses")  # the logged loss is the global batch's


def test_logs_csv_and_tensorboard_events(tmp_path):
    cfg = dataclasses.replace(BASE, steps=4, eval_every=2)
    log = Trainer(
        cache_model(), cfg, corpus(), val_data=corpus(seed=1), out=tmp_path, progress=False
    ).fit()
    rows = (tmp_path / "train_log.csv").read_text().splitlines()
    assert len(rows) == 1 + len(log) == 5 and rows[0].split(",")[-1] == "val_loss"
    assert_close(float(rows[-1].split(",")[3]), log[-1]["loss"], 1e-5)  # written to 6 digits
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (
        len(events) == 1
        and b"train/val_loss" in events[0].read_bytes()
        and b"train/loss" in events[0].read_bytes()
    )
