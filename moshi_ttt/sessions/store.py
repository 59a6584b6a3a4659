"""SessionStore: conversation states keyed by id, in one SQLite file plus safetensors blobs.

Layout under ``root``: ``sessions.sqlite`` (the index: one row per conversation: format, model
identity, times, tokens, bytes, blob name and its sha256, meta JSON) and
``blobs/<unique>.safetensors``. Each blob also carries its row (id, identity, times, tokens, meta
and the sha256 of its tensor data) in its safetensors metadata, so a lost or unreadable index is
rebuilt from the blobs (``rebuild.py``).

A write is crash-safe: the new blob goes to a temporary file (fsync), is renamed into place, and
only then is the row replaced in one transaction; the previous blob is deleted after the commit.
A crash at any point leaves the previous row and blob intact (at worst a superseded blob that
``gc`` removes). Concurrent writers on one id serialise on the transaction; the last commit
wins, and each deletes only the blob its own transaction replaced.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import sys
import time
import uuid
from pathlib import Path

import torch

from .bundle import read_bundle, write_bundle
from .format import (
    COLUMNS,
    INSERT,
    SESSION_FORMAT,
    SessionInfo,
    _fsync_dir,
    _uri,
    check_blob,
    check_id,
    check_identity,
    index_error,
    index_problem,
    parse_tensors,
    serialize,
    stamp,
    stray_reason,
    unreadable_index,
)
from .identity import ModelIdentity
from .rebuild import rebuild_index
from .states import check_config_layout, load_state, save_state
from .values import check_values


class SessionStore:
    """Conversation states keyed by id (see the module docstring for the on-disk layout).

    Opening a store whose index is missing rebuilds it from the blobs (saying so on stderr); an
    unreadable index raises ValueError pointing to ``moshi-ttt sessions rebuild``. With
    ``create=False`` a folder that holds no store is a ValueError, not a new store.
    """

    def __init__(self, root: str | os.PathLike, create: bool = True):
        self.root = Path(root)
        self.db, self.blobs = self.root / "sessions.sqlite", self.root / "blobs"
        if not self.db.exists():
            if not create and not self.blobs.is_dir():
                raise ValueError(
                    f"no session store at {self.root}"
                    + (" (no sessions.sqlite or blobs/ in it)" if self.root.is_dir() else "")
                )
            try:
                self.blobs.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ValueError(f"cannot create a session store at {self.root}: {e}") from e
            report = rebuild_index(self.root, only_if_missing=True)
            if report is not None and (report.sessions or report.kept):
                first, *rest = report.lines()
                print(f"moshi-ttt: session index {self.db} was missing: {first}", file=sys.stderr)
                for line in rest:
                    print(f"moshi-ttt:   {line}", file=sys.stderr)
        elif create:
            self.blobs.mkdir(parents=True, exist_ok=True)
        why = index_problem(self.db)
        if why is not None:
            raise ValueError(unreadable_index(self.db, self.root, why))

    def _connect(self) -> "_Closing":
        try:  # mode=rw: never creates an empty index in place of a missing one
            con = sqlite3.connect(
                _uri(self.db, "rw"), uri=True, timeout=60, isolation_level=None
            )  # transactions are explicit
            con.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as e:
            raise ValueError(index_error(self.db, self.root, e)) from e
        return _Closing(con, self)

    # ---- generic interface: named tensors + JSON meta ---------------------------------------
    def put_tensors(
        self,
        cid: str,
        tensors: dict[str, torch.Tensor],
        meta: dict,
        identity: ModelIdentity,
        tokens: int | None = None,
    ) -> SessionInfo:
        """Store ``tensors`` (any names, shapes, dtypes) and ``meta`` (JSON-able) under ``cid`` for
        the model named by ``identity``, replacing the previous version atomically. Non-finite
        floats (and, for StreamingLM states, positions or counters out of range) are a
        ValueError."""
        check_id(cid)
        if not isinstance(identity, ModelIdentity):
            raise ValueError(f"identity must be a ModelIdentity, got {type(identity).__name__}")
        try:
            meta = json.loads(json.dumps(meta, sort_keys=True))
        except TypeError as e:
            raise ValueError(f"session meta must be JSON-serialisable: {e}") from e
        data = serialize(tensors)
        check_values(tensors, meta, identity.state_kind, f"session {cid!r}")
        return self._put_blob(cid, data, meta, identity, tokens)

    def get_tensors(
        self, cid: str, identity: ModelIdentity
    ) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors on CPU, meta) of ``cid``, after checking format, model identity, blob hash and
        values."""
        info, data = self._read(cid, identity)
        tensors = parse_tensors(data, f"session {cid!r}: blob {self.blobs / info.blob}")
        check_values(tensors, info.meta, info.state_kind, f"session {cid!r}")
        return tensors, info.meta

    # ---- StreamingLM states (sessions/states.py) ----------------------------------------------
    def save(
        self, cid: str, state, model, row: int | None = None, identity: ModelIdentity | None = None
    ) -> SessionInfo:
        """Store row ``row`` of ``state`` (or the whole batch-1 state) of ``model`` under
        ``cid``."""
        return save_state(self, cid, state, model, row, identity)

    def load(self, cid: str, model, device=None, identity: ModelIdentity | None = None):
        """The batch-1 StreamingState stored under ``cid``, checked against ``model``."""
        return load_state(self, cid, model, device, identity)

    # ---- rows --------------------------------------------------------------------------------
    def info(self, cid: str) -> SessionInfo:
        check_id(cid)
        with self._connect() as con:
            row = con.execute(
                f"SELECT {', '.join(COLUMNS)} FROM sessions WHERE id = ?", (cid,)
            ).fetchone()
        if row is None:
            raise ValueError(f"no session {cid!r} in store {self.root}")
        return SessionInfo.from_row(row)

    def verify(self, cid: str) -> SessionInfo:
        """The row of ``cid`` after checking its format and its blob's sha256."""
        return self._read(cid)[0]

    def list(self) -> list[SessionInfo]:
        with self._connect() as con:
            rows = con.execute(f"SELECT {', '.join(COLUMNS)} FROM sessions ORDER BY id").fetchall()
        return [SessionInfo.from_row(r) for r in rows]

    def __contains__(self, cid: str) -> bool:
        check_id(cid)
        with self._connect() as con:
            return con.execute("SELECT 1 FROM sessions WHERE id = ?", (cid,)).fetchone() is not None

    def delete(self, cid: str) -> None:
        check_id(cid)
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            row = con.execute("SELECT blob FROM sessions WHERE id = ?", (cid,)).fetchone()
            if row is None:
                con.execute("ROLLBACK")
                raise ValueError(f"no session {cid!r} in store {self.root}")
            con.execute("DELETE FROM sessions WHERE id = ?", (cid,))
            con.execute("COMMIT")
        (self.blobs / row[0]).unlink(missing_ok=True)

    def gc(self, min_age_s: float = 3600.0, orphans: bool = False) -> list[str]:
        """Delete, among the files in ``blobs/`` that no row names and older than ``min_age_s``
        (younger ones may belong to a save in progress), those accounted for: temporary files of
        interrupted writes and superseded versions of indexed sessions. The others (``strays``)
        are deleted only with ``orphans``. Returns the names deleted."""
        if (
            isinstance(min_age_s, bool)
            or not isinstance(min_age_s, (int, float))
            or not math.isfinite(min_age_s)
            or min_age_s < 0
        ):
            raise ValueError(f"min_age_s must be a number >= 0 (seconds), got {min_age_s!r}")
        used, ids = self._indexed()
        now, gone = time.time(), []
        for p in sorted(self.blobs.iterdir()):
            try:
                young = now - p.stat().st_mtime < min_age_s
            except FileNotFoundError:
                continue
            if p.name in used or young:
                continue
            if orphans or stray_reason(p, ids) is None:
                p.unlink(missing_ok=True)
                gone.append(p.name)
        return sorted(gone)

    def strays(self) -> list[tuple[str, str]]:
        """(name, why) of the files in ``blobs/`` that no row names and ``gc`` keeps: blobs of ids
        the index does not hold (``rebuild_index`` indexes them), blobs without an embedded row
        (written before blobs carried it) and files that are not session blobs."""
        used, ids = self._indexed()
        out = []
        for p in sorted(self.blobs.iterdir()):
            why = None if p.name in used else stray_reason(p, ids)
            if why is not None:
                out.append((p.name, why))
        return out

    def _indexed(self) -> tuple[set[str], set[str]]:
        with self._connect() as con:
            rows = con.execute("SELECT blob, id FROM sessions").fetchall()
        return {r[0] for r in rows}, {r[1] for r in rows}

    # ---- export / import: one self-contained file --------------------------------------------
    def export(self, cid: str, path: str | os.PathLike) -> Path:
        """Write ``cid`` (row + blob, hash-checked) to one file (a zip: session.json,
        state.safetensors)."""
        info, data = self._read(cid)
        return write_bundle(path, info, data)

    def import_file(
        self,
        path: str | os.PathLike,
        cid: str | None = None,
        identity: ModelIdentity | None = None,
        overwrite: bool = False,
    ) -> SessionInfo:
        """Store an exported file under ``cid`` (default: its own id) after checking its format,
        hash and values (a StreamingLM state: also its layout against its config) and, with
        ``identity``, that it belongs to that model; keeps its meta and times."""
        info, data = read_bundle(path)
        cid = check_id(cid if cid is not None else info.id)
        if identity is not None:
            check_identity(info, identity)
        what = f"exported session {path}"
        tensors = parse_tensors(data, what)
        check_values(tensors, info.meta, info.state_kind, what)
        check_config_layout(what, tensors, info)
        if not overwrite and cid in self:
            raise ValueError(
                f"session {cid!r} already exists in store {self.root} (pass overwrite to replace "
                "it)"
            )
        ident = ModelIdentity(
            info.state_kind, info.config_hash, info.weights_hash, info.memory, info.config
        )
        return self._put_blob(cid, data, info.meta, ident, info.tokens, info.created)

    # ---- internals ---------------------------------------------------------------------------
    def _put_blob(
        self,
        cid: str,
        data: bytes,
        meta: dict,
        ident: ModelIdentity,
        tokens: int | None,
        created: float | None = None,
    ) -> SessionInfo:
        """Write ``data`` (a blob of this format) with the session's row in its header, then
        the row."""
        now = time.time()
        if created is None:
            with self._connect() as con:
                prev = con.execute("SELECT created FROM sessions WHERE id = ?", (cid,)).fetchone()
            created = prev[0] if prev else now
        info = SessionInfo(
            cid,
            SESSION_FORMAT,
            ident.state_kind,
            ident.config_hash,
            ident.weights_hash,
            ident.memory,
            created,
            now,
            None if tokens is None else int(tokens),
            0,
            "",
            "",
            meta,
            json.loads(json.dumps(ident.config, sort_keys=True)),
        )
        head, body = stamp(data, info.entry(), f"session {cid!r}")
        digest = hashlib.sha256(head)
        digest.update(body)
        name = f"{uuid.uuid4().hex}.safetensors"
        info = SessionInfo(
            **dict(
                info.to_dict(),
                bytes=len(head) + len(body),
                blob=name,
                blob_sha256=digest.hexdigest(),
            )
        )
        final, tmp = self.blobs / name, self.blobs / f".tmp-{name}"
        committed = False
        try:
            with open(tmp, "wb") as f:
                f.write(head)
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            _fsync_dir(self.blobs)
            with self._connect() as con:
                con.execute("BEGIN IMMEDIATE")
                old = con.execute("SELECT blob FROM sessions WHERE id = ?", (cid,)).fetchone()
                con.execute(INSERT, info.row())
                con.execute("COMMIT")
                committed = True
        finally:
            if not committed:
                tmp.unlink(missing_ok=True)
                final.unlink(missing_ok=True)
        if old is not None and old[0] != name:
            (self.blobs / old[0]).unlink(missing_ok=True)
        return info

    def _read(self, cid: str, identity: ModelIdentity | None = None) -> tuple[SessionInfo, bytes]:
        """The row and its blob bytes, checked (format, ``identity`` if given, sha256). A blob
        replaced
        by a concurrent writer between reading the row and the file is retried with the new row."""
        for _ in range(20):
            info = self.info(cid)
            if info.format != SESSION_FORMAT:
                raise ValueError(
                    f"session {cid!r} was saved with session format {info.format}; "
                    f"this moshi_ttt reads format {SESSION_FORMAT}"
                )
            if identity is not None:
                check_identity(info, identity)
            try:
                data = (self.blobs / info.blob).read_bytes()
            except FileNotFoundError:
                if self.info(cid).blob != info.blob:
                    continue  # replaced meanwhile: read the new version
                raise ValueError(
                    f"session {cid!r}: its blob {self.blobs / info.blob} is missing"
                ) from None
            check_blob(data, info.blob_sha256, f"session {cid!r}: blob {self.blobs / info.blob}")
            return info, data
        raise ValueError(f"session {cid!r} kept changing while being read")


class _Closing:
    """``with`` closes the connection (sqlite3's own context manager only ends a transaction) and
    turns SQLite errors into ValueError naming the index."""

    def __init__(self, con: sqlite3.Connection, store: SessionStore):
        self.con, self.store = con, store

    def __enter__(self) -> sqlite3.Connection:
        return self.con

    def __exit__(self, typ, exc, tb) -> None:
        try:
            if self.con.in_transaction:
                self.con.rollback()
        except sqlite3.Error:
            pass
        finally:
            self.con.close()
        if isinstance(exc, sqlite3.Error):
            raise ValueError(index_error(self.store.db, self.store.root, exc)) from exc
