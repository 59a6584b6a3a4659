"""``moshi-ttt sessions``: list, show, export to one file, import it elsewhere (checked), delete."""

import zipfile

from test_sessions import config, model_of, same_state, streamed

from moshi_ttt import cli
from moshi_ttt.checkpoint import save_checkpoint
from moshi_ttt.sessions import SessionStore


def test_sessions_commands_round_trip(tmp_path, capsys):
    model = model_of(config("ttt_cache", ttt=True))
    save_checkpoint(tmp_path / "m.pt", model)
    state = streamed(model)
    a, b = tmp_path / "a", tmp_path / "b"
    SessionStore(a).save("alice-1", state, model)
    SessionStore(a).save("bob", streamed(model, T=9), model)

    assert cli.main(["sessions", "list", "--store", str(a)]) == 0
    out = capsys.readouterr().out
    assert (
        "alice-1" in out
        and "bob" in out
        and "ttt_cache+inplace_ttt[1]" in out
        and "2 sessions" in out
    )
    assert cli.main(["sessions", "show", "alice-1", "--store", str(a)]) == 0
    out = capsys.readouterr().out
    assert '"tokens": 47' in out and "blob ok:" in out and "layers.1.ttt.s: [1, 32, 88]" in out

    f = tmp_path / "alice.session"
    assert cli.main(["sessions", "export", "alice-1", str(f), "--store", str(a)]) == 0
    assert (
        cli.main(
            [
                "sessions",
                "import",
                str(f),
                "--store",
                str(b),
                "--checkpoint",
                str(tmp_path / "m.pt"),
            ]
        )
        == 0
    )
    # exported == imported, bit for bit
    assert same_state(SessionStore(b).load("alice-1", model), state)
    assert SessionStore(b).info("alice-1").created == SessionStore(a).info("alice-1").created
    assert cli.main(["sessions", "import", str(f), "--store", str(b), "--id", "alice-2"]) == 0
    assert same_state(SessionStore(b).load("alice-2", model), state)

    assert cli.main(["sessions", "delete", "alice-1", "bob", "--store", str(a)]) == 0
    assert SessionStore(a).list() == [] and list((a / "blobs").iterdir()) == []


def test_sessions_commands_report_bad_input(tmp_path, capsys):
    model = model_of(config("window"))
    SessionStore(tmp_path / "a").save("c", streamed(model), model)
    save_checkpoint(tmp_path / "other.pt", model_of(config("sink")))
    f = tmp_path / "c.session"
    assert cli.main(["sessions", "export", "c", str(f), "--store", str(tmp_path / "a")]) == 0
    capsys.readouterr()

    def fails(args, message):
        assert cli.main(["sessions", *args]) == 2
        assert message in capsys.readouterr().err

    fails(["show", "nobody", "--store", str(tmp_path / "a")], "no session 'nobody'")
    fails(["delete", "a/b", "--store", str(tmp_path / "a")], "bad conversation id 'a/b'")
    fails(["import", str(f), "--store", str(tmp_path / "a")], "session 'c' already exists")
    fails(
        [
            "import",
            str(f),
            "--store",
            str(tmp_path / "b"),
            "--checkpoint",
            str(tmp_path / "other.pt"),
        ],
        "belongs to a different model config",
    )
    fails(
        ["import", str(tmp_path / "missing"), "--store", str(tmp_path / "b")], "no exported session"
    )
    bad = tmp_path / "bad.session"
    with zipfile.ZipFile(f) as z, zipfile.ZipFile(bad, "w") as w:
        w.writestr("session.json", z.read("session.json"))
        data = bytearray(z.read("state.safetensors"))
        data[-1] ^= 1
        w.writestr("state.safetensors", bytes(data))
    fails(["import", str(bad), "--store", str(tmp_path / "b")], "is corrupt")
    with zipfile.ZipFile(f) as z, zipfile.ZipFile(bad, "w") as w:
        w.writestr(
            "session.json", z.read("session.json").replace(b"session-export/1", b"session-export/9")
        )
        w.writestr("state.safetensors", z.read("state.safetensors"))
    fails(
        ["import", str(bad), "--store", str(tmp_path / "b")],
        "of format 'moshi_ttt.session-export/9'",
    )
    (tmp_path / "junk").write_bytes(b"not a zip")
    fails(
        ["import", str(tmp_path / "junk"), "--store", str(tmp_path / "b")],
        "is not an exported session",
    )
    assert SessionStore(tmp_path / "b").list() == []
