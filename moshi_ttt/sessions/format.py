"""The session store's format: blob layout (safetensors with the session's row in its
metadata), the index schema, ids, checks of blobs, identities and index files."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sqlite3
import struct
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from urllib.parse import quote

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .identity import ModelIdentity

SESSION_FORMAT = 1  # the row and blob layout; a store written by another format is refused
BLOB_TAG = f"moshi_ttt.session/{SESSION_FORMAT}"
ENTRY_KEY = "moshi_ttt.session"  # the blob's own row, as JSON, in its safetensors metadata
SCHEMA = """CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, format INTEGER NOT NULL, state_kind TEXT NOT NULL,
    config_hash TEXT NOT NULL, weights_hash TEXT NOT NULL, memory TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL, tokens INTEGER, bytes INTEGER NOT NULL,
    blob TEXT NOT NULL UNIQUE, blob_sha256 TEXT NOT NULL, meta TEXT NOT NULL, config TEXT NOT NULL)"""  # noqa: E501 (kept verbatim)
COLUMNS = (
    "id",
    "format",
    "state_kind",
    "config_hash",
    "weights_hash",
    "memory",
    "created",
    "updated",
    "tokens",
    "bytes",
    "blob",
    "blob_sha256",
    "meta",
    "config",
)
INSERT = (
    f"INSERT OR REPLACE INTO sessions ({', '.join(COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(COLUMNS))})"
)
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")


def check_id(cid) -> str:
    if not isinstance(cid, str) or not ID_RE.fullmatch(cid):
        raise ValueError(
            f"bad conversation id {cid!r}: ids are 1-128 characters from A-Z a-z 0-9 . _ : @ + -, "
            "starting with a letter or digit"
        )
    return cid


def serialize(tensors: dict[str, torch.Tensor]) -> bytes:
    """The state's safetensors bytes: CPU copies of ``tensors`` (any device, any dtype). A stored
    blob is these bytes with the session's row added to the header (``stamp``)."""
    bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
    if bad or not isinstance(tensors, dict):
        raise ValueError(f"tensors must be a dict of torch.Tensor; not tensors: {bad}")
    return st_save(
        {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()},
        metadata={"format": BLOB_TAG},
    )


def read_header(data: bytes | memoryview, what: str) -> tuple[dict, int]:
    """(header, offset of the tensor data) of a safetensors blob; ValueError naming ``what`` if it
    is not one (too short, a bad length, not JSON, not an object, metadata not strings)."""
    if len(data) < 8:
        raise ValueError(
            f"{what} is not a safetensors blob: {len(data)} bytes, shorter than "
            "its 8-byte header length"
        )
    n = struct.unpack("<Q", bytes(data[:8]))[0]
    if n > len(data) - 8:
        raise ValueError(
            f"{what} is not a safetensors blob: header of {n} bytes, "
            f"but {len(data) - 8} bytes follow"
        )
    try:
        head = json.loads(bytes(data[8 : 8 + n]).decode("utf-8"))
    except ValueError as e:
        raise ValueError(
            f"{what} is not a safetensors blob: its header is not JSON ({e})"
        ) from None
    if not isinstance(head, dict):
        kind = {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
            type(head), "number"
        )
        raise ValueError(
            f"{what} is not a safetensors blob: its header is a JSON {kind}, not an object"
        )
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
        return tuple(
            json.dumps(v, sort_keys=True) if k in ("meta", "config") else v
            for k, v in self.to_dict().items()
        )


_FIELD_TYPES = {
    "id": str,
    "format": int,
    "state_kind": str,
    "config_hash": str,
    "weights_hash": str,
    "memory": str,
    "created": (int, float),
    "updated": (int, float),
    "tokens": (int, type(None)),
    "bytes": int,
    "blob": str,
    "blob_sha256": str,
    "meta": dict,
    "config": dict,
}


def check_blob(data: bytes, sha256: str, what: str) -> None:
    """ValueError naming ``what`` unless ``data`` hashes to ``sha256`` and is a blob of this
    format."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ValueError(f"{what} is corrupt (sha256 {digest[:16]}... != stored {sha256[:16]}...)")
    tag = blob_format(data, what)
    if tag != BLOB_TAG:
        raise ValueError(f"{what} has format {tag!r}; this moshi_ttt reads {BLOB_TAG!r}")


def check_identity(info: SessionInfo, identity: ModelIdentity) -> None:
    """ValueError unless the stored state belongs to the model named by ``identity``."""
    if info.state_kind != identity.state_kind:
        raise ValueError(
            f"session {info.id!r} holds a {info.state_kind} state, not a {identity.state_kind}"
        )
    if info.config_hash != identity.config_hash:
        raise ValueError(
            f"session {info.id!r} belongs to a different model config "
            f"(stored {info.config_hash}, model {identity.config_hash})"
        )
    if info.weights_hash != identity.weights_hash:
        raise ValueError(
            f"session {info.id!r} belongs to different model weights "
            f"(stored weights hash {info.weights_hash[:16]}..., model "
            f"{identity.weights_hash[:16]}...)"
        )


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
    return (
        f"a version of session {entry.get('id')!r}, which the index does not hold "
        "(`moshi-ttt sessions rebuild` indexes it)"
    )


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
                raise ValueError(
                    f"session store {db.parent} has format version {version}; "
                    f"this moshi_ttt reads format {SESSION_FORMAT}"
                )
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
    return (
        f"session index {db} is unreadable ({why}): run `moshi-ttt sessions rebuild "
        f"--store {root}` to move it aside and rebuild the index from the blobs"
    )


def _uri(db: Path, mode: str) -> str:
    return f"file:{quote(str(db.absolute()))}?mode={mode}"


def index_error(db: Path, root: Path, e: sqlite3.Error) -> str:
    """The message of a failed index operation."""
    if not db.exists():
        return (
            f"session index {db} is missing: open the store again or run "
            f"`moshi-ttt sessions rebuild --store {root}` to rebuild it from the blobs"
        )
    if isinstance(e, sqlite3.OperationalError):  # locked, busy, I/O, permissions: not the content
        return f"session index {db}: {e}"
    return unreadable_index(db, root, str(e))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
