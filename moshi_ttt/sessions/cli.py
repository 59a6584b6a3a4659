"""``moshi-ttt sessions list | show | delete | export | import | gc | rebuild``."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from .store import SessionStore, check_id

DEFAULT_STORE = Path("sessions")


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def cmd_list(a) -> None:
    rows = SessionStore(a.store, create=False).list()
    print(f"{'id':<32} {'memory':<28} {'tokens':>9} {'bytes':>13} {'updated':<19} config / weights")
    for r in rows:
        print(
            f"{r.id:<32} {r.memory:<28} {r.tokens if r.tokens is not None else '-':>9} "
            f"{r.bytes:>13,} "
            f"{_when(r.updated):<19} {r.config_hash} / {r.weights_hash[:16]}"
        )
    print(f"{len(rows)} sessions, {sum(r.bytes for r in rows):,} bytes in {a.store}")


def cmd_show(a) -> None:
    from safetensors import safe_open

    store = SessionStore(a.store, create=False)
    info = store.info(a.id)
    print(json.dumps(info.to_dict(), indent=2, sort_keys=True))
    store.verify(a.id)  # format and blob hash; ValueError (exit 2) if corrupt
    with safe_open(store.blobs / info.blob, "pt") as f:
        names = list(f.keys())
        shapes = {n: f.get_slice(n).get_shape() for n in names}
    print(f"blob ok: {len(names)} tensors")
    for n in names:
        print(f"  {n}: {shapes[n]}")


def cmd_delete(a) -> None:
    """Delete every existing id; then a missing one is an error naming them all."""
    for cid in a.ids:
        check_id(cid)
    store = SessionStore(a.store, create=False)
    missing = []
    for cid in dict.fromkeys(a.ids):
        if cid not in store:
            missing.append(cid)
            continue
        store.delete(cid)
        print(f"deleted {cid}")
    if missing:
        deleted = len(dict.fromkeys(a.ids)) - len(missing)
        raise ValueError(
            f"no session {', '.join(map(repr, missing))} in store {a.store}"
            + (f"; deleted the other {deleted}" if deleted else "")
        )


def cmd_export(a) -> None:
    path = SessionStore(a.store, create=False).export(a.id, a.out)
    print(f"exported {a.id} to {path} ({path.stat().st_size:,} bytes)")


def cmd_import(a) -> None:
    identity = None
    if a.checkpoint:
        from ..checkpoint import load_checkpoint
        from .identity import identity_of

        identity = identity_of(load_checkpoint(a.checkpoint)[0])
    info = SessionStore(a.store).import_file(
        a.file, cid=a.id, identity=identity, overwrite=a.overwrite
    )
    print(
        f"imported {a.file} as {info.id} ({info.bytes:,} bytes, {info.memory}, {info.tokens} "
        "tokens)"
    )


def cmd_gc(a) -> None:
    if not (math.isfinite(a.min_age) and a.min_age >= 0):
        raise ValueError(f"--min-age must be a number of seconds >= 0, got {a.min_age}")
    store = SessionStore(a.store, create=False)
    gone = store.gc(a.min_age, orphans=a.orphans)
    print(f"removed {len(gone)} unreferenced blobs" + "".join(f"\n  {name}" for name in gone))
    kept = store.strays()
    if kept:
        print(
            f"kept {len(kept)} files in {store.blobs} that no session names "
            "(`moshi-ttt sessions rebuild` indexes the session blobs among them, "
            "`gc --orphans` deletes them):"
        )
        for name, why in kept:
            print(f"  {name}: {why}")


def cmd_rebuild(a) -> None:
    from .rebuild import rebuild_index

    report = rebuild_index(a.store)
    lines = report.lines()
    print(f"session index {a.store / 'sessions.sqlite'}: {lines[0]}")
    for line in lines[1:]:
        print(f"  {line}")


def add_sessions_parser(sub) -> None:
    """Register ``sessions`` and its commands on the top-level subparsers."""
    sp = sub.add_parser(
        "sessions",
        description="Stored conversation states (a session store folder).",
        help="stored conversation states: list, show, delete, export, import, gc, rebuild",
    )
    cmds = sp.add_subparsers(dest="sessions_command", required=True)

    def add(name: str, func, help: str) -> argparse.ArgumentParser:
        p = cmds.add_parser(name, help=help)
        p.add_argument(
            "--store",
            type=Path,
            default=DEFAULT_STORE,
            help="session store folder (default: %(default)s)",
        )
        p.set_defaults(func=func)
        return p

    add("list", cmd_list, "one line per stored conversation")
    add("show", cmd_show, "a conversation's row and tensors; checks its blob").add_argument("id")
    add("delete", cmd_delete, "delete conversations").add_argument("ids", nargs="+")
    p = add("export", cmd_export, "write one conversation to a self-contained file")
    p.add_argument("id")
    p.add_argument("out", type=Path)
    p = add("import", cmd_import, "store an exported file (format, hash and values checked)")
    p.add_argument("file", type=Path)
    p.add_argument("--id", default=None, help="store under this id (default: the exported id)")
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="also check it belongs to this model checkpoint",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing conversation of that id"
    )
    p = add("gc", cmd_gc, "delete blobs left by interrupted saves; report other unindexed files")
    p.add_argument(
        "--min-age",
        type=float,
        default=3600.0,
        help="only files older than this many seconds (>= 0)",
    )
    p.add_argument(
        "--orphans",
        action="store_true",
        help="also delete the unindexed files gc cannot account for (blobs of ids the "
        "index does not hold, blobs without an embedded row, other files)",
    )
    add(
        "rebuild",
        cmd_rebuild,
        "rebuild the index from the rows the blobs carry (an unreadable index is moved aside)",
    )
