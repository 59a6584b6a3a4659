"""SessionStore: saved vs loaded states, rows of a batch, every bad input, a writer killed mid-save,
concurrent writers, and storage that does not grow with the conversation."""

import multiprocessing as mp
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch
from conftest import stream, tiny_config

import moshi_ttt as mt
from moshi_ttt.checkpoint import save_checkpoint
from moshi_ttt.sessions import (
    ModelIdentity,
    SessionStore,
    identity_of,
    load_into,
    session_bytes,
)

KINDS = ("full", "window", "sink", "pooled", "infini", "ttt_cache")


def config(kind: str, ttt: bool = False, window: int = 6) -> mt.ModelConfig:
    cfg = tiny_config(kind, window=window)
    cfg = mt.ModelConfig(
        **{**cfg.__dict__, "memory": mt.MemoryConfig(kind=kind, window=window, num_sink=2, block=4)}
    )
    return (
        mt.ModelConfig(
            **{**cfg.__dict__, "inplace_ttt": mt.InPlaceTTTConfig(layers=(1,), chunk_size=8)}
        )
        if ttt
        else cfg
    )


def model_of(cfg: mt.ModelConfig, seed: int = 0) -> mt.StreamingLM:
    """Every parameter perturbed, so zero-initialised parts (TTT conv, memory outputs) matter
    too."""
    torch.manual_seed(seed)
    model = mt.StreamingLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def streamed(model, T: int = 47, B: int = 1, k: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return stream(model, torch.randint(0, 50, (B, T), generator=g), k)[1]


def same_state(a, b) -> bool:
    return set(a.tensors) == set(b.tensors) and all(torch.equal(a[n], b[n]) for n in a.tensors)


@pytest.mark.parametrize("kind,ttt", [("ttt_cache", True), ("full", False)])
def test_saved_state_loads_exactly(kind, ttt, tmp_path):
    model = model_of(config(kind, ttt))
    state = streamed(model)
    store = SessionStore(tmp_path)
    info = store.save("alice-1", state, model)
    loaded = store.load("alice-1", model)
    assert same_state(loaded, state) and loaded.meta == state.meta and loaded.fills == state.fills
    assert info.tokens == 47 and info.bytes == (tmp_path / "blobs" / info.blob).stat().st_size
    assert 0 < info.bytes - session_bytes(state) < 4096  # the blob also carries its session row
    assert [r.id for r in store.list()] == ["alice-1"] and store.info(
        "alice-1"
    ).memory == info.memory
    # a second save replaces the row and removes the previous blob
    more = streamed(model, T=30, seed=2)
    info2 = store.save("alice-1", more, model)
    assert same_state(store.load("alice-1", model), more) and info2.created == info.created
    assert sorted(p.name for p in (tmp_path / "blobs").iterdir()) == [info2.blob]


def test_rows_of_a_batch_reassemble_the_batch(tmp_path):
    model = model_of(config("ttt_cache", ttt=True))
    x = torch.randint(0, 50, (3, 41))
    with torch.no_grad():
        _, state = stream(model, x, 8, resets_at={20: torch.tensor([False, True, False])})
    store = SessionStore(tmp_path)
    for r in range(3):
        store.save(f"conv-{r}", state, model, row=r)
    # row 1 restarted at 20
    assert [store.info(f"conv-{r}").tokens for r in range(3)] == [41, 21, 41]
    back = model.init_state(3)
    for r in (2, 0, 1):
        load_into(store, f"conv-{r}", model, back, row=r)
    assert same_state(back, state)
    b = torch.randint(0, 50, (3, 13))
    with torch.no_grad():
        assert torch.equal(stream(model, b, 5, state=back)[0], stream(model, b, 5, state=state)[0])


def test_storage_does_not_grow_with_the_conversation(tmp_path):
    store = SessionStore(tmp_path)
    for kind in KINDS:
        model = model_of(config(kind, ttt=True, window=5))
        short, long = streamed(model, T=5), streamed(model, T=100, k=25)  # 1x and 20x the window
        info = store.save(kind, long, model)
        assert 0 < info.bytes - session_bytes(long) < 4096  # the state plus its session row
        if kind == "full":
            assert session_bytes(long) > session_bytes(short)
        else:
            assert session_bytes(long) == session_bytes(short), kind


def test_generic_tensors_and_meta_round_trip(tmp_path):
    ident = ModelIdentity("moshi.LMGen", "a" * 16, "b" * 64, "ttt_cache", {"dim": 8})
    tensors = {
        "cache": torch.randn(1, 2, 5, 4).to(torch.bfloat16),
        "offset": torch.tensor([7]),
        "mask": torch.tensor([[True, False]]),
        "fast.w": torch.randn(1, 3, 3),
    }
    meta = {"step": 7, "nested": {"a": [1, 2]}}
    store = SessionStore(tmp_path)
    info = store.put_tensors("lmgen-1", tensors, meta, ident, tokens=7)
    back, meta2 = store.get_tensors("lmgen-1", ident)
    assert meta2 == meta and set(back) == set(tensors)
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())
    assert (info.tokens, info.memory, info.config, info.state_kind) == (
        7,
        "ttt_cache",
        {"dim": 8},
        "moshi.LMGen",
    )


# ---- bad input: each a ValueError naming the problem ----------------------------------------
def test_wrong_config_and_wrong_weights(tmp_path):
    store = SessionStore(tmp_path)
    model = model_of(config("window"))
    store.save("c", streamed(model), model)
    with pytest.raises(
        ValueError,
        match=r"session 'c' belongs to a different model config \(stored \w+, model \w+\)",
    ):
        store.load("c", model_of(config("window", window=7)))
    with pytest.raises(ValueError, match="session 'c' belongs to different model weights"):
        store.load("c", model_of(config("window"), seed=1))
    with pytest.raises(ValueError, match="state belongs to a different model config"):
        store.save("d", streamed(model), model_of(config("sink")))
    other = ModelIdentity("moshi.LMGen", "0" * 16, "0" * 64)
    store.put_tensors("lmgen", {"x": torch.zeros(2)}, {}, other)
    with pytest.raises(
        ValueError,
        match="session 'lmgen' holds a moshi.LMGen state, not a moshi_ttt.StreamingState",
    ):
        store.load("lmgen", model)
    store.put_tensors(
        "odd", {"x": torch.zeros(1, 2)}, {"fills": {}, "state_meta": {}}, identity_of(model)
    )
    with pytest.raises(
        ValueError, match=r"session 'odd' does not match the model's state: missing \['layers"
    ):
        store.load("odd", model)


def test_unknown_and_bad_ids(tmp_path):
    store = SessionStore(tmp_path)
    model = model_of(config("window"))
    with pytest.raises(ValueError, match=r"no session 'nobody' in store"):
        store.load("nobody", model)
    with pytest.raises(ValueError, match="no session 'nobody'"):
        store.delete("nobody")
    for bad in ("", "a/b", "../x", " x", "x y", "é", "x" * 129, 5, None):
        with pytest.raises(ValueError, match="bad conversation id"):
            store.save(bad, streamed(model), model)
        with pytest.raises(ValueError, match="bad conversation id"):
            store.load(bad, model)
    assert list((tmp_path / "blobs").iterdir()) == []  # nothing written for a refused id


def test_corrupt_blob_and_format_versions(tmp_path):
    store = SessionStore(tmp_path)
    model = model_of(config("ttt_cache"))
    info = store.save("c", streamed(model), model)
    blob = tmp_path / "blobs" / info.blob
    data = bytearray(blob.read_bytes())
    data[-5] ^= 0x01
    blob.write_bytes(bytes(data))
    with pytest.raises(
        ValueError,
        match=r"session 'c': blob .* is corrupt \(sha256 \w+\.\.\. != stored \w+\.\.\.\)",
    ):
        store.load("c", model)
    blob.unlink()
    with pytest.raises(ValueError, match="session 'c': its blob .* is missing"):
        store.load("c", model)
    store.save("c", streamed(model), model)
    with sqlite3.connect(tmp_path / "sessions.sqlite") as con:
        con.execute("UPDATE sessions SET format = 2 WHERE id = 'c'")
    with pytest.raises(
        ValueError,
        match="session 'c' was saved with session format 2; this moshi_ttt reads format 1",
    ):
        store.load("c", model)
    with sqlite3.connect(tmp_path / "sessions.sqlite") as con:
        con.execute("PRAGMA user_version = 7")
    with pytest.raises(ValueError, match="has format version 7; this moshi_ttt reads format 1"):
        SessionStore(tmp_path)


def test_other_bad_input(tmp_path):
    store = SessionStore(tmp_path)
    model = model_of(config("full"))
    state = streamed(model, B=2)
    with pytest.raises(ValueError, match="state has batch size 2: pass row="):
        store.save("c", state, model)
    with pytest.raises(ValueError, match=r"row must be an int in \[0, 2\)"):
        store.save("c", state, model, row=2)
    store.save("c", state, model, row=1)
    with pytest.raises(ValueError, match="load_into cannot place a 'full' memory"):
        load_into(store, "c", model, state, row=0)
    with pytest.raises(ValueError, match="session meta must be JSON-serialisable"):
        store.put_tensors("m", {"x": torch.zeros(1)}, {"bad": object()}, identity_of(model))
    with pytest.raises(ValueError, match="tensors must be a dict of torch.Tensor"):
        store.put_tensors("m", {"x": [1.0]}, {}, identity_of(model))


# ---- a writer killed in the middle of a save ------------------------------------------------
KILLED_WRITER = """
import pathlib, sys, time, torch
from moshi_ttt.checkpoint import load_checkpoint
from moshi_ttt.sessions import SessionStore
from moshi_ttt.sessions import store as S
stage, marker = sys.argv[3], pathlib.Path(sys.argv[4])

def pause():
    marker.touch()
    time.sleep(3600)  # killed here

class Torn:  # the blob file: pauses after its header, with half of the body written
    def __init__(self, f):
        self.f = f
    def write(self, data):
        if stage == "write" and self.f.tell() > 0:
            self.f.write(data[:len(data) // 2])
            self.f.flush()
            pause()
        return self.f.write(data)
    def __getattr__(self, name):
        return getattr(self.f, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

class Pausing:  # the index connection: pauses after the row is replaced, before the commit
    def __init__(self, con):
        self.con = con
    def execute(self, sql, *args):
        if stage == "commit" and sql == "COMMIT":
            pause()
        return self.con.execute(sql, *args)
    def __getattr__(self, name):
        return getattr(self.con, name)

S.open = lambda *a, **k: Torn(open(*a, **k))  # the store module's open (the builtin elsewhere)
enter = S._Closing.__enter__
S._Closing.__enter__ = lambda self: Pausing(enter(self))
model = load_checkpoint(sys.argv[1])[0].eval()
store = SessionStore(sys.argv[2])
state = store.load("c", model)
with torch.no_grad():
    model.step(torch.arange(17)[None] % 50, state)  # a different state
store.save("c", state, model)  # pauses at ``stage``, and is killed there
"""


@pytest.mark.parametrize("stage", ["write", "commit"])
def test_writer_killed_mid_save_leaves_previous_state(stage, tmp_path):
    model = model_of(config("ttt_cache", ttt=True))
    save_checkpoint(tmp_path / "m.pt", model)
    before = streamed(model)
    store = SessionStore(tmp_path / "store")
    info = store.save("c", before, model)
    marker = tmp_path / "paused"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            KILLED_WRITER,
            str(tmp_path / "m.pt"),
            str(tmp_path / "store"),
            stage,
            str(marker),
        ],
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "the writer never reached the pause"
        time.sleep(0.05)
    blobs = {p.name for p in (tmp_path / "store" / "blobs").iterdir()}
    assert len(blobs) == 2  # the previous blob and the new one (half-written temp, or complete)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    loaded = store.load("c", model)
    assert same_state(loaded, before) and loaded.meta == before.meta
    assert store.info("c").blob == info.blob and store.info("c").tokens == 47
    # the orphan goes, the live blob stays
    assert store.gc(min_age_s=0) == sorted(blobs - {info.blob})
    assert same_state(store.load("c", model), before)
    after = streamed(model, T=9, seed=3)
    store.save("c", after, model)  # no lock left behind
    assert same_state(store.load("c", model), after)


# ---- concurrent writers on one id -----------------------------------------------------------
IDENT = ModelIdentity("test.Tensors", "c" * 16, "w" * 64)


def _writer(root, w: int, n: int) -> None:
    store = SessionStore(root)
    for i in range(n):
        v = w * 1000 + i
        store.put_tensors(
            "shared",
            {"x": torch.full((64, 64), float(v)), "y": torch.full((3,), v)},
            {"v": v},
            IDENT,
            tokens=v,
        )


def _reader(root, n: int, q) -> None:
    store = SessionStore(root)
    bad = 0
    for _ in range(n):
        tensors, meta = store.get_tensors("shared", IDENT)
        bad += not (
            bool((tensors["x"] == meta["v"]).all()) and bool((tensors["y"] == meta["v"]).all())
        )
    q.put(bad)


def test_concurrent_writers_on_one_id(tmp_path):
    _writer(tmp_path, 9, 1)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(tmp_path, w, 8)) for w in range(3)]
    procs.append(ctx.Process(target=_reader, args=(tmp_path, 30, q)))
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert q.get(timeout=5) == 0  # every read saw one whole version
    store = SessionStore(tmp_path)
    tensors, meta = store.get_tensors("shared", IDENT)
    assert meta["v"] % 1000 == 7 and torch.equal(
        tensors["x"], torch.full((64, 64), float(meta["v"]))
    )
    assert store.info("shared").tokens == meta["v"]
    # no leaked blobs
    assert [p.name for p in (tmp_path / "blobs").iterdir()] == [store.info("shared").blob]
