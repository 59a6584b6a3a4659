"""SessionStore: conversation states keyed by id, in one SQLite file plus safetensors blobs.

Layout under ``root``: ``sessions.sqlite`` (one row per conversation: format, model identity,
times, tokens, bytes, blob name and its sha256, meta JSON) and ``blobs/<unique>.safetensors``.

A write is crash-safe: the new blob goes to a temporary file (fsync), is renamed into place, and
only then is the row replaced in one transaction; the previous blob is deleted after the commit.
A crash at any point leaves the previous row and blob intact (at worst an orphan blob that
``gc`` removes). Concurrent writers on one id serialise on the transaction; the last commit
wins, and each deletes only the blob its own transaction replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import struct
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .identity import ModelIdentity

SESSION_FORMAT = 1  # the row and blob layout; a store written by another format is refused
BLOB_TAG = f"moshi_ttt.session/{SESSION_FORMAT}"
SCHEMA = """CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, format INTEGER NOT NULL, state_kind TEXT NOT NULL,
    config_hash TEXT NOT NULL, weights_hash TEXT NOT NULL, memory TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL, tokens INTEGER, bytes INTEGER NOT NULL,
    blob TEXT NOT NULL UNIQUE, blob_sha256 TEXT NOT NULL, meta TEXT NOT NULL, config TEXT NOT NULL)"""
COLUMNS = ("id", "format", "state_kind", "config_hash", "weights_hash", "memory", "created", "updated",
           "tokens", "bytes", "blob", "blob_sha256", "meta", "config")
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")
PAUSE_ENV = "MOSHI_TTT_SESSION_PAUSE"  # test hook "STAGE:MARKER": stop a save at STAGE (write | commit)


def check_id(cid) -> str:
    if not isinstance(cid, str) or not ID_RE.fullmatch(cid):
        raise ValueError(f"bad conversation id {cid!r}: ids are 1-128 characters from A-Z a-z 0-9 . _ : @ + -, "
                         "starting with a letter or digit")
    return cid


def serialize(tensors: dict[str, torch.Tensor]) -> bytes:
    """The blob: safetensors bytes of CPU copies of ``tensors`` (any device, any dtype)."""
    bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
    if bad or not isinstance(tensors, dict):
        raise ValueError(f"tensors must be a dict of torch.Tensor; not tensors: {bad}")
    return st_save({k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()},
                   metadata={"format": BLOB_TAG})


def blob_format(data: bytes) -> str | None:
    """The ``format`` entry of a safetensors header, or None if it has none."""
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]).get("__metadata__", {}).get("format")


def _pause(stage: str) -> None:
    hook = os.environ.get(PAUSE_ENV, "")
    if hook.partition(":")[0] == stage:
        Path(hook.partition(":")[2]).touch()
        time.sleep(3600)  # the test kills the process here


@dataclass(frozen=True)
class SessionInfo:
    """One row of the store (``meta``: the caller's JSON meta; ``config``: the model's config)."""

    id: str
    format: int
    state_kind: str
    config_hash: str
    weights_hash: str
    memory: str
    created: float
    updated: float
    tokens: int | None
    bytes: int
    blob: str
    blob_sha256: str
    meta: dict
    config: dict

    @classmethod
    def from_row(cls, row) -> "SessionInfo":
        d = dict(zip(COLUMNS, row))
        d["meta"], d["config"] = json.loads(d["meta"]), json.loads(d["config"])
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


class SessionStore:
    """Conversation states keyed by id (see the module docstring for the on-disk layout)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.db, self.blobs = self.root / "sessions.sqlite", self.root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            version = con.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SESSION_FORMAT):
                raise ValueError(f"session store {self.root} has format version {version}; "
                                 f"this moshi_ttt reads format {SESSION_FORMAT}")
            if version == 0:  # a new store (several processes may create it at once: all idempotent)
                con.execute("PRAGMA journal_mode=WAL")
                con.execute(SCHEMA)
                con.execute(f"PRAGMA user_version={SESSION_FORMAT}")

    def _connect(self) -> "_Closing":
        con = sqlite3.connect(self.db, timeout=60, isolation_level=None)  # transactions are explicit
        con.execute("PRAGMA synchronous=FULL")
        return _Closing(con)

    # ---- generic interface: named tensors + JSON meta ---------------------------------------
    def put_tensors(self, cid: str, tensors: dict[str, torch.Tensor], meta: dict, identity: ModelIdentity,
                    tokens: int | None = None) -> SessionInfo:
        """Store ``tensors`` (any names, shapes, dtypes) and ``meta`` (JSON-able) under ``cid`` for the
        model named by ``identity``, replacing the previous version atomically."""
        check_id(cid)
        if not isinstance(identity, ModelIdentity):
            raise ValueError(f"identity must be a ModelIdentity, got {type(identity).__name__}")
        try:
            meta_json = json.dumps(meta, sort_keys=True)
        except TypeError as e:
            raise ValueError(f"session meta must be JSON-serialisable: {e}") from e
        return self._put_blob(cid, serialize(tensors), meta_json, identity, tokens)

    def get_tensors(self, cid: str, identity: ModelIdentity) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors on CPU, meta) of ``cid``, after checking format, model identity and blob hash."""
        info, data = self._read(cid, identity)
        return st_load(data), info.meta

    # ---- StreamingLM states (sessions/states.py) ----------------------------------------------
    def save(self, cid: str, state, model, row: int | None = None, identity: ModelIdentity | None = None) -> SessionInfo:
        """Store row ``row`` of ``state`` (or the whole batch-1 state) of ``model`` under ``cid``."""
        from .states import save_state

        return save_state(self, cid, state, model, row, identity)

    def load(self, cid: str, model, device=None, identity: ModelIdentity | None = None):
        """The batch-1 StreamingState stored under ``cid``, checked against ``model``."""
        from .states import load_state

        return load_state(self, cid, model, device, identity)

    # ---- rows --------------------------------------------------------------------------------
    def info(self, cid: str) -> SessionInfo:
        check_id(cid)
        with self._connect() as con:
            row = con.execute(f"SELECT {', '.join(COLUMNS)} FROM sessions WHERE id = ?", (cid,)).fetchone()
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

    def gc(self, min_age_s: float = 3600.0) -> list[str]:
        """Delete blobs and temporary files no row names, older than ``min_age_s`` (younger ones may
        belong to a save in progress). Returns the names deleted."""
        with self._connect() as con:
            used = {r[0] for r in con.execute("SELECT blob FROM sessions")}
        now, gone = time.time(), []
        for p in self.blobs.iterdir():
            if p.name not in used and now - p.stat().st_mtime >= min_age_s:
                p.unlink(missing_ok=True)
                gone.append(p.name)
        return sorted(gone)

    # ---- export / import: one self-contained file --------------------------------------------
    def export(self, cid: str, path: str | os.PathLike) -> Path:
        """Write ``cid`` (row + blob, hash-checked) to one file (a zip: session.json, state.safetensors)."""
        from .bundle import write_bundle

        info, data = self._read(cid)
        return write_bundle(path, info, data)

    def import_file(self, path: str | os.PathLike, cid: str | None = None, identity: ModelIdentity | None = None,
                    overwrite: bool = False) -> SessionInfo:
        """Store an exported file under ``cid`` (default: its own id) after checking its format and
        hash (and, with ``identity``, that it belongs to that model); keeps its meta and times."""
        from .bundle import read_bundle

        info, data = read_bundle(path)
        cid = check_id(cid if cid is not None else info.id)
        if identity is not None:
            check_identity(info, identity)
        if not overwrite and cid in self:
            raise ValueError(f"session {cid!r} already exists in store {self.root} (pass overwrite to replace it)")
        ident = ModelIdentity(info.state_kind, info.config_hash, info.weights_hash, info.memory, info.config)
        return self._put_blob(cid, data, json.dumps(info.meta, sort_keys=True), ident, info.tokens, info.created)

    # ---- internals ---------------------------------------------------------------------------
    def _put_blob(self, cid: str, data: bytes, meta_json: str, ident: ModelIdentity, tokens: int | None,
                  created: float | None = None) -> SessionInfo:
        name = f"{uuid.uuid4().hex}.safetensors"
        final, tmp = self.blobs / name, self.blobs / f".tmp-{name}"
        committed = False
        try:
            with open(tmp, "wb") as f:
                f.write(data[:len(data) // 2])
                f.flush()
                _pause("write")
                f.write(data[len(data) // 2:])
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            _fsync_dir(self.blobs)
            now = time.time()
            with self._connect() as con:
                con.execute("BEGIN IMMEDIATE")
                old = con.execute("SELECT blob, created FROM sessions WHERE id = ?", (cid,)).fetchone()
                row = (cid, SESSION_FORMAT, ident.state_kind, ident.config_hash, ident.weights_hash, ident.memory,
                       created if created is not None else (old[1] if old else now), now,
                       None if tokens is None else int(tokens), len(data), name,
                       hashlib.sha256(data).hexdigest(), meta_json, json.dumps(ident.config, sort_keys=True))
                con.execute(f"INSERT OR REPLACE INTO sessions ({', '.join(COLUMNS)}) "
                            f"VALUES ({', '.join('?' * len(COLUMNS))})", row)
                _pause("commit")
                con.execute("COMMIT")
                committed = True
        finally:
            if not committed:
                tmp.unlink(missing_ok=True)
                final.unlink(missing_ok=True)
        if old is not None and old[0] != name:
            (self.blobs / old[0]).unlink(missing_ok=True)
        return SessionInfo.from_row(row)

    def _read(self, cid: str, identity: ModelIdentity | None = None) -> tuple[SessionInfo, bytes]:
        """The row and its blob bytes, checked (format, ``identity`` if given, sha256). A blob replaced
        by a concurrent writer between reading the row and the file is retried with the new row."""
        for _ in range(20):
            info = self.info(cid)
            if info.format != SESSION_FORMAT:
                raise ValueError(f"session {cid!r} was saved with session format {info.format}; "
                                 f"this moshi_ttt reads format {SESSION_FORMAT}")
            if identity is not None:
                check_identity(info, identity)
            try:
                data = (self.blobs / info.blob).read_bytes()
            except FileNotFoundError:
                if self.info(cid).blob != info.blob:
                    continue  # replaced meanwhile: read the new version
                raise ValueError(f"session {cid!r}: its blob {self.blobs / info.blob} is missing") from None
            check_blob(data, info.blob_sha256, f"session {cid!r}: blob {self.blobs / info.blob}")
            return info, data
        raise ValueError(f"session {cid!r} kept changing while being read")


def check_blob(data: bytes, sha256: str, what: str) -> None:
    """ValueError naming ``what`` unless ``data`` hashes to ``sha256`` and is a blob of this format."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ValueError(f"{what} is corrupt (sha256 {digest[:16]}... != stored {sha256[:16]}...)")
    tag = blob_format(data)
    if tag != BLOB_TAG:
        raise ValueError(f"{what} has format {tag!r}; this moshi_ttt reads {BLOB_TAG!r}")


def check_identity(info: SessionInfo, identity: ModelIdentity) -> None:
    """ValueError unless the stored state belongs to the model named by ``identity``."""
    if info.state_kind != identity.state_kind:
        raise ValueError(f"session {info.id!r} holds a {info.state_kind} state, not a {identity.state_kind}")
    if info.config_hash != identity.config_hash:
        raise ValueError(f"session {info.id!r} belongs to a different model config "
                         f"(stored {info.config_hash}, model {identity.config_hash})")
    if info.weights_hash != identity.weights_hash:
        raise ValueError(f"session {info.id!r} belongs to different model weights "
                         f"(stored weights hash {info.weights_hash[:16]}..., model {identity.weights_hash[:16]}...)")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Closing:
    """``with`` closes the connection (sqlite3's own context manager only ends a transaction)."""

    def __init__(self, con: sqlite3.Connection):
        self.con = con

    def __enter__(self) -> sqlite3.Connection:
        return self.con

    def __exit__(self, *exc) -> None:
        if self.con.in_transaction:
            self.con.rollback()
        self.con.close()
