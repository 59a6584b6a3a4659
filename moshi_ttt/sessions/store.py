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
import re
import sqlite3
import struct
import sys
import time
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from urllib.parse import quote

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .identity import ModelIdentity
from .values import check_values

SESSION_FORMAT = 1  # the row and blob layout; a store written by another format is refused
BLOB_TAG = f"moshi_ttt.session/{SESSION_FORMAT}"
ENTRY_KEY = "moshi_ttt.session"  # the blob's own row, as JSON, in its safetensors metadata
SCHEMA = """CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, format INTEGER NOT NULL, state_kind TEXT NOT NULL,
    config_hash TEXT NOT NULL, weights_hash TEXT NOT NULL, memory TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL, tokens INTEGER, bytes INTEGER NOT NULL,
    blob TEXT NOT NULL UNIQUE, blob_sha256 TEXT NOT NULL, meta TEXT NOT NULL, config TEXT NOT NULL)"""
COLUMNS = ("id", "format", "state_kind", "config_hash", "weights_hash", "memory", "created", "updated",
           "tokens", "bytes", "blob", "blob_sha256", "meta", "config")
INSERT = (f"INSERT OR REPLACE INTO sessions ({', '.join(COLUMNS)}) "
          f"VALUES ({', '.join('?' * len(COLUMNS))})")
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")
PAUSE_ENV = "MOSHI_TTT_SESSION_PAUSE"  # test hook "STAGE:MARKER": stop a save at STAGE (write | commit)


def check_id(cid) -> str:
    if not isinstance(cid, str) or not ID_RE.fullmatch(cid):
        raise ValueError(f"bad conversation id {cid!r}: ids are 1-128 characters from A-Z a-z 0-9 . _ : @ + -, "
                         "starting with a letter or digit")
    return cid


def serialize(tensors: dict[str, torch.Tensor]) -> bytes:
    """The state's safetensors bytes: CPU copies of ``tensors`` (any device, any dtype). A stored
    blob is these bytes with the session's row added to the header (``stamp``)."""
    bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
    if bad or not isinstance(tensors, dict):
        raise ValueError(f"tensors must be a dict of torch.Tensor; not tensors: {bad}")
    return st_save({k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()},
                   metadata={"format": BLOB_TAG})


def read_header(data: bytes | memoryview, what: str) -> tuple[dict, int]:
    """(header, offset of the tensor data) of a safetensors blob; ValueError naming ``what`` if it
    is not one (too short, a bad length, not JSON, not an object, metadata not strings)."""
    if len(data) < 8:
        raise ValueError(f"{what} is not a safetensors blob: {len(data)} bytes, shorter than "
                         "its 8-byte header length")
    n = struct.unpack("<Q", bytes(data[:8]))[0]
    if n > len(data) - 8:
        raise ValueError(f"{what} is not a safetensors blob: header of {n} bytes, "
                         f"but {len(data) - 8} bytes follow")
    try:
        head = json.loads(bytes(data[8:8 + n]).decode("utf-8"))
    except ValueError as e:
        raise ValueError(f"{what} is not a safetensors blob: its header is not JSON ({e})") \
            from None
    if not isinstance(head, dict):
        kind = {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
            type(head), "number")
        raise ValueError(f"{what} is not a safetensors blob: its header is a JSON {kind}, "
                         "not an object")
    meta = head.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError(f"{what} is not a safetensors blob: its metadata is not a map of strings")
    return head, 8 + n


def read_header_file(path: Path, what: str) -> dict:
    """The header of the safetensors file ``path`` (reads the header only)."""
    with open(path, "rb") as f:
        first = f.read(8)
        n = struct.unpack("<Q", first)[0] if len(first) == 8 else 0
        rest = f.read(min(n, 100_000_000))
    return read_header(first + rest, what)[0]


def blob_format(data: bytes, what: str = "blob") -> str | None:
    """The ``format`` entry of a safetensors header, or None if it has none."""
    return read_header(data, what)[0].get("__metadata__", {}).get("format")


def blob_entry(head: dict, what: str) -> dict | None:
    """The session row a blob carries (None for blobs written before blobs carried it)."""
    text = head.get("__metadata__", {}).get(ENTRY_KEY)
    if text is None:
        return None
    try:
        entry = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{what}: its embedded session row is not JSON ({e})") from None
    if not isinstance(entry, dict) or not isinstance(entry.get("data_sha256"), str):
        raise ValueError(f"{what}: its embedded session row is not an object with data_sha256")
    return entry


def stamp(data: bytes, entry: dict, what: str) -> tuple[bytes, memoryview]:
    """(header, tensor data) of ``data`` with ``entry`` (the session's row, plus the sha256 of the
    tensor data) in its metadata; the tensor data is not copied."""
    head, start = read_header(data, what)
    body = memoryview(data)[start:]
    entry = dict(entry, data_sha256=hashlib.sha256(body).hexdigest())
    meta = dict(head.get("__metadata__", {}))
    meta[ENTRY_KEY] = json.dumps(entry, sort_keys=True)
    head["__metadata__"] = meta
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, body


def parse_tensors(data: bytes, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors blob; ValueError naming ``what`` if they cannot be read."""
    try:
        return st_load(bytes(data))
    except Exception as e:  # safetensors raises its own error type for every malformed input
        raise ValueError(f"{what} is not a readable safetensors blob: {e}") from None


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

    @classmethod
    def checked(cls, d, what: str) -> "SessionInfo":
        """A row from untrusted JSON (an export, a blob's embedded row): ValueError naming
        ``what`` and the field unless every field is there with its type."""
        if not isinstance(d, dict):
            raise ValueError(f"{what}: its session row is not a JSON object")
        missing = [f.name for f in fields(cls) if f.name not in d]
        if missing:
            raise ValueError(f"{what}: its session row lacks {missing}")
        d = {f.name: d[f.name] for f in fields(cls)}
        for name, kinds in _FIELD_TYPES.items():
            v = d[name]
            number = isinstance(v, (int, float)) and not isinstance(v, bool)
            bad = isinstance(v, bool) or not isinstance(v, kinds)
            if bad or number and not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{what}: session field {name} is {v!r}")
        check_id(d["id"])
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    def entry(self) -> dict:
        """What a blob carries of its row (not its own name, size or hash)."""
        skip = ("bytes", "blob", "blob_sha256")
        return {k: v for k, v in self.to_dict().items() if k not in skip}

    def row(self) -> tuple:
        """The values of ``INSERT`` (meta and config as JSON)."""
        return tuple(json.dumps(v, sort_keys=True) if k in ("meta", "config") else v
                     for k, v in self.to_dict().items())


_FIELD_TYPES = {"id": str, "format": int, "state_kind": str, "config_hash": str,
                "weights_hash": str, "memory": str, "created": (int, float),
                "updated": (int, float), "tokens": (int, type(None)), "bytes": int, "blob": str,
                "blob_sha256": str, "meta": dict, "config": dict}


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
                raise ValueError(f"no session store at {self.root}" + (
                    " (no sessions.sqlite or blobs/ in it)" if self.root.is_dir() else ""))
            try:
                self.blobs.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ValueError(f"cannot create a session store at {self.root}: {e}") from e
            from .rebuild import rebuild_index

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
            con = sqlite3.connect(_uri(self.db, "rw"), uri=True, timeout=60,
                                  isolation_level=None)  # transactions are explicit
            con.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as e:
            raise ValueError(index_error(self.db, self.root, e)) from e
        return _Closing(con, self)

    # ---- generic interface: named tensors + JSON meta ---------------------------------------
    def put_tensors(self, cid: str, tensors: dict[str, torch.Tensor], meta: dict, identity: ModelIdentity,
                    tokens: int | None = None) -> SessionInfo:
        """Store ``tensors`` (any names, shapes, dtypes) and ``meta`` (JSON-able) under ``cid`` for the
        model named by ``identity``, replacing the previous version atomically. Non-finite floats
        (and, for StreamingLM states, positions or counters out of range) are a ValueError."""
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

    def get_tensors(self, cid: str, identity: ModelIdentity) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors on CPU, meta) of ``cid``, after checking format, model identity, blob hash and
        values."""
        info, data = self._read(cid, identity)
        tensors = parse_tensors(data, f"session {cid!r}: blob {self.blobs / info.blob}")
        check_values(tensors, info.meta, info.state_kind, f"session {cid!r}")
        return tensors, info.meta

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

    def gc(self, min_age_s: float = 3600.0, orphans: bool = False) -> list[str]:
        """Delete, among the files in ``blobs/`` that no row names and older than ``min_age_s``
        (younger ones may belong to a save in progress), those accounted for: temporary files of
        interrupted writes and superseded versions of indexed sessions. The others (``strays``)
        are deleted only with ``orphans``. Returns the names deleted."""
        if isinstance(min_age_s, bool) or not isinstance(min_age_s, (int, float)) \
                or not math.isfinite(min_age_s) or min_age_s < 0:
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
        """Write ``cid`` (row + blob, hash-checked) to one file (a zip: session.json, state.safetensors)."""
        from .bundle import write_bundle

        info, data = self._read(cid)
        return write_bundle(path, info, data)

    def import_file(self, path: str | os.PathLike, cid: str | None = None, identity: ModelIdentity | None = None,
                    overwrite: bool = False) -> SessionInfo:
        """Store an exported file under ``cid`` (default: its own id) after checking its format,
        hash and values (a StreamingLM state: also its layout against its config) and, with
        ``identity``, that it belongs to that model; keeps its meta and times."""
        from .bundle import read_bundle
        from .states import check_config_layout

        info, data = read_bundle(path)
        cid = check_id(cid if cid is not None else info.id)
        if identity is not None:
            check_identity(info, identity)
        what = f"exported session {path}"
        tensors = parse_tensors(data, what)
        check_values(tensors, info.meta, info.state_kind, what)
        check_config_layout(what, tensors, info)
        if not overwrite and cid in self:
            raise ValueError(f"session {cid!r} already exists in store {self.root} (pass overwrite to replace it)")
        ident = ModelIdentity(info.state_kind, info.config_hash, info.weights_hash, info.memory, info.config)
        return self._put_blob(cid, data, info.meta, ident, info.tokens, info.created)

    # ---- internals ---------------------------------------------------------------------------
    def _put_blob(self, cid: str, data: bytes, meta: dict, ident: ModelIdentity, tokens: int | None,
                  created: float | None = None) -> SessionInfo:
        """Write ``data`` (a blob of this format) with the session's row in its header, then
        the row."""
        now = time.time()
        if created is None:
            with self._connect() as con:
                prev = con.execute("SELECT created FROM sessions WHERE id = ?", (cid,)).fetchone()
            created = prev[0] if prev else now
        info = SessionInfo(cid, SESSION_FORMAT, ident.state_kind, ident.config_hash,
                           ident.weights_hash, ident.memory, created, now,
                           None if tokens is None else int(tokens), 0, "", "", meta,
                           json.loads(json.dumps(ident.config, sort_keys=True)))
        head, body = stamp(data, info.entry(), f"session {cid!r}")
        digest = hashlib.sha256(head)
        digest.update(body)
        name = f"{uuid.uuid4().hex}.safetensors"
        info = SessionInfo(**dict(info.to_dict(), bytes=len(head) + len(body), blob=name,
                                  blob_sha256=digest.hexdigest()))
        final, tmp = self.blobs / name, self.blobs / f".tmp-{name}"
        committed = False
        try:
            with open(tmp, "wb") as f:
                f.write(head)
                f.write(body[:len(body) // 2])
                f.flush()
                _pause("write")
                f.write(body[len(body) // 2:])
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            _fsync_dir(self.blobs)
            with self._connect() as con:
                con.execute("BEGIN IMMEDIATE")
                old = con.execute("SELECT blob FROM sessions WHERE id = ?", (cid,)).fetchone()
                con.execute(INSERT, info.row())
                _pause("commit")
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
    tag = blob_format(data, what)
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


def stray_reason(path: Path, ids: set[str]) -> str | None:
    """Why ``gc`` keeps a file of ``blobs/`` that no row names, or None if it is accounted for (a
    temporary file of an interrupted write, or a superseded version of an indexed id)."""
    if path.name.startswith(".tmp-"):
        return None
    if not path.is_file():
        return "not a file"
    try:
        head = read_header_file(path, "it")
        entry = blob_entry(head, "it")
    except (OSError, ValueError) as e:
        return f"not a session blob: {e}"
    tag = head.get("__metadata__", {}).get("format")
    if tag != BLOB_TAG:
        return f"format {tag!r}, not {BLOB_TAG!r}"
    if entry is None:
        return NO_ENTRY
    if entry.get("id") in ids:
        return None
    return (f"a version of session {entry.get('id')!r}, which the index does not hold "
            "(`moshi-ttt sessions rebuild` indexes it)")


NO_ENTRY = "no embedded identity (saved by an older moshi_ttt): which session it holds is unknown"


# ---- the index file --------------------------------------------------------------------------
def index_problem(db: Path) -> str | None:
    """Why the index ``db`` is unreadable (None if it is a readable index of this format). A
    readable index of another format version is a ValueError."""
    try:
        if db.stat().st_size == 0:
            return "an empty file"
    except FileNotFoundError:
        return "it is missing"
    try:
        con = sqlite3.connect(_uri(db, "ro"), uri=True, timeout=60)
        try:
            version = con.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SESSION_FORMAT):
                raise ValueError(f"session store {db.parent} has format version {version}; "
                                 f"this moshi_ttt reads format {SESSION_FORMAT}")
            check = [r[0] for r in con.execute("PRAGMA quick_check").fetchall()]
            if check != ["ok"]:
                return "; ".join(check[:3])
            cols = tuple(r[1] for r in con.execute("PRAGMA table_info(sessions)"))
            if version == 0 or cols != COLUMNS:
                return "no sessions table of this format in it"
        finally:
            con.close()
    except sqlite3.OperationalError as e:
        raise ValueError(index_error(db, db.parent, e)) from e
    except sqlite3.DatabaseError as e:
        return str(e)
    return None


def unreadable_index(db: Path, root: Path, why: str) -> str:
    return (f"session index {db} is unreadable ({why}): run `moshi-ttt sessions rebuild "
            f"--store {root}` to move it aside and rebuild the index from the blobs")


def _uri(db: Path, mode: str) -> str:
    return f"file:{quote(str(db.absolute()))}?mode={mode}"


def index_error(db: Path, root: Path, e: sqlite3.Error) -> str:
    """The message of a failed index operation."""
    if not db.exists():
        return (f"session index {db} is missing: open the store again or run "
                f"`moshi-ttt sessions rebuild --store {root}` to rebuild it from the blobs")
    if isinstance(e, sqlite3.OperationalError):  # locked, busy, I/O, permissions: not the content
        return f"session index {db}: {e}"
    return unreadable_index(db, root, str(e))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
