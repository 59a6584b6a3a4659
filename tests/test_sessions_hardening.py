"""SessionStore under damage and bad input: a lost or corrupt index is rebuilt from the blobs
(sessions continue bit for bit), gc keeps what it cannot account for, malformed blobs and
impossible states are refused with a ValueError, and the CLI says so in one line."""

import hashlib
import json
import os
import sqlite3
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from test_sessions import config, model_of, streamed

from moshi_ttt import sessions as S
from moshi_ttt.sessions import ModelIdentity, SessionStore
from moshi_ttt.sessions.format import BLOB_TAG

REPO = Path(__file__).resolve().parents[1]
IDENT = ModelIdentity("test.Tensors", "c" * 16, "w" * 64, "none", {"dim": 3})


def continue_b(model, b, state):
    with torch.no_grad():
        return torch.cat(
            [model.step(b[:, t : t + 3], state)[0] for t in range(0, b.shape[1], 3)], 1
        )


def process(*args, cwd):
    """Run ``moshi-ttt sessions ARGS`` as its own process."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    return subprocess.run(
        [sys.executable, "-m", "moshi_ttt.cli", "sessions", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )


def sessions(*args, cwd):
    """Run ``moshi-ttt sessions ARGS`` in this process (``cli.main``)."""
    return run_cli("sessions", *args, cwd=cwd)


def ok(*args, cwd):
    r = sessions(*args, cwd=cwd)
    assert r.returncode == 0, r.stderr
    return r


def fails(*args, cwd, message):
    """The command exits 2 with exactly one ``moshi-ttt: error:`` line naming ``message``."""
    r = sessions(*args, cwd=cwd)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith("moshi-ttt: error: "), r.stderr
    assert message in lines[0], lines[0]
    return lines[0]


def saved_sessions(root):
    """A store with StreamingLM sessions of several memories and one generic tensor session.
    -> {id: (model, continuation tokens, reference logits)}, generic tensors."""
    store = SessionStore(root)
    cases = {}
    for i, (cid, kind, ttt) in enumerate(
        [
            ("alice", "ttt_cache", True),
            ("bob", "window", False),
            ("carol", "full", False),
            ("dave", "sink", True),
        ]
    ):
        model = model_of(config(kind, ttt))
        state = streamed(model, seed=10 + i)
        store.save(cid, state, model)
        b = torch.randint(0, 50, (1, 17))
        cases[cid] = (model, b, continue_b(model, b, state))
    generic = {"x": torch.randn(2, 3), "n": torch.tensor([4, 5])}
    store.put_tensors("lmgen-1", generic, {"step": 3}, IDENT, tokens=3)
    return cases, generic


def write_old_blob(store, cid):
    """Rewrite ``cid``'s blob as moshi_ttt wrote it before blobs carried their identity."""
    info = store.info(cid)
    path = store.blobs / info.blob
    data = st_save(st_load(path.read_bytes()), metadata={"format": BLOB_TAG})
    path.write_bytes(data)
    with sqlite3.connect(store.db) as con:
        con.execute(
            "UPDATE sessions SET blob_sha256 = ?, bytes = ? WHERE id = ?",
            (hashlib.sha256(data).hexdigest(), len(data), cid),
        )
    return info.blob


# ---- a lost or corrupt index --------------------------------------------------------------
def test_deleted_index_is_rebuilt_and_every_session_continues_exactly(tmp_path, capsys):
    cases, generic = saved_sessions(tmp_path)
    before = {r.id: r for r in SessionStore(tmp_path).list()}
    capsys.readouterr()
    (tmp_path / "sessions.sqlite").unlink()
    store = SessionStore(tmp_path)
    err = capsys.readouterr().err
    assert "rebuilt" in err and "5 sessions" in err, err
    assert {r.id: r for r in store.list()} == before  # identity, times, tokens, meta, blob, sha
    for cid, (model, b, ref) in cases.items():
        assert torch.equal(continue_b(model, b, store.load(cid, model)), ref), cid
    tensors, meta = store.get_tensors("lmgen-1", IDENT)
    assert meta == {"step": 3} and all(torch.equal(tensors[k], v) for k, v in generic.items())
    assert store.gc(min_age_s=0) == [] and store.strays() == []


def test_rebuild_takes_the_newest_version_and_gc_removes_the_superseded_one(tmp_path):
    model = model_of(config("window"))
    store = SessionStore(tmp_path)
    v1 = store.save("c", streamed(model, T=10), model)
    old = (tmp_path / "blobs" / v1.blob).read_bytes()
    v2 = store.save("c", streamed(model, T=20), model)
    (tmp_path / "blobs" / v1.blob).write_bytes(old)  # a save that crashed before deleting v1
    (tmp_path / "sessions.sqlite").unlink()
    report = S.rebuild_index(tmp_path)
    assert report.sessions == 1 and [n for n, _ in report.kept] == [v1.blob]
    assert "superseded" in report.kept[0][1]
    store = SessionStore(tmp_path)
    assert store.info("c") == v2 and store.strays() == []
    assert store.gc(min_age_s=0) == [v1.blob]  # accounted for: an older version of an indexed id


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_index_is_refused_then_rebuilt(damage, tmp_path):
    cases, _ = saved_sessions(tmp_path)
    db = tmp_path / "sessions.sqlite"
    before = {r.id: r for r in SessionStore(tmp_path).list()}
    size = db.stat().st_size
    assert size > 4096 and not (tmp_path / "sessions.sqlite-wal").exists()
    broken = {
        "garbage": b"this is not an sqlite file" * 300,
        "truncated": db.read_bytes()[:4096],
        "empty": b"",
    }[damage]
    db.write_bytes(broken)
    with pytest.raises(
        ValueError,
        match=r"session index .*sessions.sqlite is unreadable .*"
        r"run `moshi-ttt sessions rebuild --store ",
    ):
        SessionStore(tmp_path)
    assert db.read_bytes() == broken  # never replaced by an empty index
    report = S.rebuild_index(tmp_path)
    assert report.moved is not None and report.moved.name.startswith("sessions.sqlite.corrupt-")
    assert report.moved.read_bytes() == broken and report.sessions == 5
    store = SessionStore(tmp_path)
    assert {r.id: r for r in store.list()} == before
    model, b, ref = cases["alice"]
    assert torch.equal(continue_b(model, b, store.load("alice", model)), ref)


def test_index_damaged_while_open_raises_value_error(tmp_path):
    saved_sessions(tmp_path)
    store = SessionStore(tmp_path)
    (tmp_path / "sessions.sqlite").write_bytes(b"\0" * 8192)
    for call in (store.list, lambda: store.info("alice"), lambda: store.gc(0)):
        with pytest.raises(ValueError, match="moshi-ttt sessions rebuild"):
            call()


def test_blobs_saved_before_they_carried_their_identity(tmp_path, capsys):
    cases, _ = saved_sessions(tmp_path)
    store = SessionStore(tmp_path)
    old = write_old_blob(store, "bob")
    model, b, ref = cases["bob"]
    assert torch.equal(continue_b(model, b, store.load("bob", model)), ref)  # still loads
    report = S.rebuild_index(tmp_path)  # a readable index keeps its row
    assert report.sessions == 5 and report.kept == [] and "bob" in SessionStore(tmp_path)
    (tmp_path / "sessions.sqlite").unlink()
    capsys.readouterr()
    store = SessionStore(tmp_path)
    err = capsys.readouterr().err
    assert "4 sessions" in err and old in err and "no embedded identity" in err, err
    assert sorted(r.id for r in store.list()) == ["alice", "carol", "dave", "lmgen-1"]
    assert (tmp_path / "blobs" / old).is_file()  # kept, reported
    assert store.gc(min_age_s=0) == [] and [n for n, _ in store.strays()] == [old]
    assert store.gc(min_age_s=0, orphans=True) == [old]


def test_gc_keeps_blobs_it_cannot_account_for(tmp_path):
    model = model_of(config("window"))
    a, b = SessionStore(tmp_path / "a"), SessionStore(tmp_path / "b")
    stray = a.save("elsewhere", streamed(model), model).blob
    kept = b.save("here", streamed(model), model).blob
    (b.blobs / stray).write_bytes((a.blobs / stray).read_bytes())  # e.g. a delete that crashed
    (b.blobs / "notes.txt").write_text("not a blob")
    (b.blobs / ".tmp-0123.safetensors").write_bytes(b"half a blob")  # an interrupted write
    assert b.gc(min_age_s=0) == [".tmp-0123.safetensors"]
    assert dict(b.strays()).keys() == {stray, "notes.txt"}
    assert "'elsewhere'" in dict(b.strays())[stray]
    assert b.gc(min_age_s=0, orphans=True) == sorted(["notes.txt", stray])
    assert [p.name for p in b.blobs.iterdir()] == [kept]
    with pytest.raises(ValueError, match="min_age_s must be a number >= 0"):
        b.gc(min_age_s=-5)


# ---- malformed blobs and impossible states ------------------------------------------------
def export_of(tmp_path, kind="ttt_cache", ttt=True):
    model = model_of(config(kind, ttt))
    SessionStore(tmp_path / "src").save("c", streamed(model), model)
    f = tmp_path / "c.session"
    SessionStore(tmp_path / "src").export("c", f)
    return model, f


def rehashed(src, dst, blob=None, edit=None):
    """A copy of the export ``src`` whose blob is ``blob`` (or its tensors after ``edit``), with
    session.json's hash and size updated to match: only the content checks can refuse it."""
    with zipfile.ZipFile(src) as z:
        head, data = json.loads(z.read("session.json")), z.read("state.safetensors")
    if edit is not None:
        tensors = st_load(data)
        edit(tensors)
        blob = st_save(tensors, metadata={"format": BLOB_TAG})
    head["session"].update(blob_sha256=hashlib.sha256(blob).hexdigest(), bytes=len(blob))
    with zipfile.ZipFile(dst, "w") as w:
        w.writestr("session.json", json.dumps(head))
        w.writestr("state.safetensors", blob)
    return dst


def test_malformed_blobs_in_an_export(tmp_path):
    _, f = export_of(tmp_path, "window", False)
    store = SessionStore(tmp_path / "dst")
    for blob, message in [
        (b"abc", "shorter than"),
        (struct.pack("<Q", 2) + b"[]", "JSON list"),
        (struct.pack("<Q", 99) + b"{}", "header of 99 bytes"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "not JSON"),
        (struct.pack("<Q", 2) + b"{}", "format None"),
    ]:
        with pytest.raises(ValueError, match=f"exported session .*{message}"):
            store.import_file(rehashed(f, tmp_path / "bad.session", blob=blob))
    blob = st_save({"x": torch.zeros(2)}, metadata={"format": BLOB_TAG})
    with pytest.raises(ValueError, match=r"missing \['layers"):
        store.import_file(rehashed(f, tmp_path / "bad.session", blob=blob))
    assert store.list() == []


def _set(name, index, value):
    def edit(tensors):
        tensors[name][index] = value

    return edit


@pytest.mark.parametrize(
    "name,index,value,message",
    [
        ("pos", 0, -1000, "state tensor pos holds -1000"),
        ("layers.0.kpos", (0, 2), 10**6, "state tensor layers.0.kpos holds position 1000000"),
        ("layers.0.kpos", (0, 2), -7, "state tensor layers.0.kpos holds position -7"),
        ("layers.1.ttt.count", 0, 99, "state tensor layers.1.ttt.count holds 99"),
        ("layers.0.ecount", 0, -1, "state tensor layers.0.ecount holds -1"),
        ("layers.1.ttt.s", (0, 1, 2), float("nan"), "state tensor layers.1.ttt.s has 1 non-finite"),
        ("layers.0.vk", (0, 0, 0, 0), float("inf"), "state tensor layers.0.vk has 1 non-finite"),
    ],
)
def test_impossible_states_are_refused_on_import(name, index, value, message, tmp_path):
    model, f = export_of(tmp_path)
    store = SessionStore(tmp_path / "dst")
    with pytest.raises(ValueError, match=message):
        store.import_file(rehashed(f, tmp_path / "bad.session", edit=_set(name, index, value)))
    assert store.list() == []
    store.import_file(f)  # the untouched export imports
    store.load("c", model)


def test_non_finite_states_are_refused_on_save_and_load(tmp_path):
    model = model_of(config("ttt_cache", ttt=True))
    store = SessionStore(tmp_path)
    state = streamed(model)
    state["layers.1.ttt.s"][0, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="session 'c': state tensor layers.1.ttt.s has 1 non-fin"):
        store.save("c", state, model)
    with pytest.raises(ValueError, match="session 'g': state tensor x has 2 non-finite"):
        store.put_tensors("g", {"x": torch.tensor([1.0, float("inf"), float("-inf")])}, {}, IDENT)
    assert store.list() == [] and list(store.blobs.iterdir()) == []
    info = store.save("c", streamed(model), model)
    path = store.blobs / info.blob
    tensors = st_load(path.read_bytes())
    tensors["pos"][0] = -3
    data = st_save(tensors, metadata={"format": BLOB_TAG})
    path.write_bytes(data)
    with sqlite3.connect(store.db) as con:
        con.execute(
            "UPDATE sessions SET blob_sha256 = ? WHERE id = 'c'",
            (hashlib.sha256(data).hexdigest(),),
        )
    with pytest.raises(ValueError, match="session 'c': state tensor pos holds -3"):
        store.load("c", model)


# ---- the command line ------------------------------------------------------------------------
def test_cli_store_that_does_not_exist_is_not_created(tmp_path):
    for args in (
        ["list"],
        ["show", "c"],
        ["export", "c", "out.session"],
        ["gc"],
        ["delete", "c"],
        ["rebuild"],
    ):
        fails(*args, "--store", "typo", cwd=tmp_path, message="no session store at typo")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    (tmp_path / "plain").mkdir()
    fails("list", "--store", "plain", cwd=tmp_path, message="no session store at plain")
    assert list((tmp_path / "plain").iterdir()) == []


def test_cli_rebuild_gc_delete_and_bad_input(tmp_path):
    model = model_of(config("window"))
    store = SessionStore(tmp_path / "s")
    for cid in ("a", "b", "c"):
        store.save(cid, streamed(model), model)
    db = tmp_path / "s" / "sessions.sqlite"
    db.write_bytes(b"junk" * 2000)
    fails("list", "--store", "s", cwd=tmp_path, message="`moshi-ttt sessions rebuild --store s`")
    out = ok("rebuild", "--store", "s", cwd=tmp_path).stdout
    assert "3 sessions" in out and "sessions.sqlite.corrupt-" in out, out
    assert len(list((tmp_path / "s").glob("sessions.sqlite.corrupt-*"))) == 1
    assert "3 sessions" in ok("list", "--store", "s", cwd=tmp_path).stdout

    db.unlink()
    r = ok("list", "--store", "s", cwd=tmp_path)
    assert "3 sessions" in r.stdout and "rebuilt" in r.stderr and "Traceback" not in r.stderr

    fails("gc", "--min-age", "-5", "--store", "s", cwd=tmp_path, message="--min-age")
    other = SessionStore(tmp_path / "t").save("z", streamed(model), model).blob
    (tmp_path / "s" / "blobs" / other).write_bytes((tmp_path / "t" / "blobs" / other).read_bytes())
    out = ok("gc", "--min-age", "0", "--store", "s", cwd=tmp_path).stdout
    assert "removed 0" in out and other in out and "--orphans" in out, out
    out = ok("gc", "--min-age", "0", "--orphans", "--store", "s", cwd=tmp_path).stdout
    assert "removed 1" in out and not (tmp_path / "s" / "blobs" / other).exists()

    line = fails("delete", "a", "missing", "b", "--store", "s", cwd=tmp_path, message="'missing'")
    assert "no session" in line
    assert [r.id for r in SessionStore(tmp_path / "s").list()] == ["c"]  # a and b deleted anyway

    ok("export", "c", "c.session", "--store", "s", cwd=tmp_path)
    rehashed(tmp_path / "c.session", tmp_path / "short.session", blob=b"abc")
    fails(
        "import", "short.session", "--store", "s", "--id", "d", cwd=tmp_path, message="shorter than"
    )
    rehashed(tmp_path / "c.session", tmp_path / "list.session", blob=struct.pack("<Q", 2) + b"[]")
    fails("import", "list.session", "--store", "s", "--id", "d", cwd=tmp_path, message="JSON list")
    rehashed(tmp_path / "c.session", tmp_path / "pos.session", edit=_set("pos", 0, -1000))
    fails(
        "import",
        "pos.session",
        "--store",
        "s",
        "--id",
        "d",
        cwd=tmp_path,
        message="state tensor pos",
    )
    assert [r.id for r in SessionStore(tmp_path / "s").list()] == ["c"]


def test_cli_help_names_every_sessions_command(tmp_path):
    commands = ("list", "show", "delete", "export", "import", "gc", "rebuild")
    r = subprocess.run(
        [sys.executable, "-m", "moshi_ttt.cli", "--help"], cwd=REPO, capture_output=True, text=True
    )
    top = " ".join(r.stdout.split()).split(" sessions ", 1)[1].split("options:")[0]
    assert r.returncode == 0 and all(c in top for c in commands), top
    out = ok("--help", cwd=tmp_path).stdout
    assert out == process("--help", cwd=tmp_path).stdout  # in this process as in its own
    assert all(f"    {c} " in out for c in commands), out
    assert "--overwrite" in ok("import", "--help", cwd=tmp_path).stdout
