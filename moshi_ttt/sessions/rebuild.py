"""Rebuilding a store's index (``sessions.sqlite``) from the rows its blobs carry.

Every blob written by this moshi_ttt carries its session's row (id, model identity, times,
tokens, meta) and the sha256 of its tensor data in its safetensors metadata. ``rebuild_index``
reads them all and:

- keeps each row of a readable index whose blob is intact (a blob written before blobs carried
  their row is only known through such a row);
- indexes each id found only in blobs, from its newest intact blob;
- re-points a row whose blob is missing or corrupt to the newest intact blob of that id, if any;
- leaves every other file in place and reports it (superseded versions, blobs without an
  embedded row, files that are not session blobs).

A missing index is rebuilt when a ``SessionStore`` opens; an unreadable one is moved aside to
``sessions.sqlite.corrupt-<time>`` first. One rebuild at a time (``sessions.lock``); a rebuild of
a readable index is one transaction, so concurrent saves stay safe.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from .format import (
    BLOB_TAG,
    COLUMNS,
    INSERT,
    NO_ENTRY,
    SCHEMA,
    SESSION_FORMAT,
    SessionInfo,
    _fsync_dir,
    _uri,
    blob_entry,
    index_error,
    index_problem,
    read_header,
)

LOCK = "sessions.lock"
SUFFIXES = ("", "-wal", "-shm", "-journal")  # an SQLite database and its side files


@dataclass
class RebuildReport:
    """What a rebuild did: ``sessions`` rows in the index now, ``recovered`` ids indexed from
    their blobs, ``kept`` (blob, why) left in place unindexed, ``problems`` (id, why) of rows
    whose blob is missing or corrupt, and where an unreadable index was ``moved``."""

    root: Path
    sessions: int = 0
    recovered: list[str] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    moved: Path | None = None

    def lines(self) -> list[str]:
        out = [
            f"rebuilt it from the blobs: {self.sessions} sessions "
            f"({len(self.recovered)} from the rows their blobs carry)"
        ]
        if self.moved is not None:
            out.append(f"the unreadable index was moved to {self.moved}")
        out += [f"session {cid!r}: {why}" for cid, why in self.problems]
        out += [f"kept blobs/{name}, not indexed: {why}" for name, why in self.kept]
        return out


@dataclass
class _Scanned:
    name: str
    sha256: str | None = None
    info: SessionInfo | None = None  # the row the blob carries, if intact
    why: str | None = None  # why it cannot be indexed from its own row


def rebuild_index(root: str | os.PathLike, only_if_missing: bool = False) -> RebuildReport | None:
    """Rebuild the index of the store at ``root`` from its blobs (see the module docstring).
    With ``only_if_missing``, do nothing (return None) if an index exists."""
    root = Path(root)
    db, blobs = root / "sessions.sqlite", root / "blobs"
    if not db.exists() and not blobs.is_dir():
        raise ValueError(
            f"no session store at {root}"
            + (" (no sessions.sqlite or blobs/ in it)" if root.is_dir() else "")
        )
    with _locked(root):
        report = RebuildReport(root)
        if db.exists():
            if only_if_missing:
                return None
            if index_problem(db) is None:
                _rebuild_in_place(db, blobs, report)
                return report
            report.moved = _move_aside(db, "corrupt")
        else:
            _move_aside(db, "stale")  # a write-ahead log left without its database
        _write_new(db, _decide({}, _scan(blobs), blobs, report))
        return report


def _scan(blobs: Path) -> dict[str, _Scanned]:
    out = {}
    for p in sorted(blobs.iterdir()) if blobs.is_dir() else []:
        if p.name.startswith(".tmp-") or not p.is_file():
            continue
        s = out[p.name] = _Scanned(p.name)
        try:
            data = p.read_bytes()
        except OSError as e:
            s.why = f"unreadable: {e}"
            continue
        s.sha256 = hashlib.sha256(data).hexdigest()
        try:
            head, start = read_header(data, "it")
            tag = head.get("__metadata__", {}).get("format")
            entry = blob_entry(head, "it")
            if tag != BLOB_TAG:
                s.why = f"format {tag!r}, not {BLOB_TAG!r}"
            elif entry is None:
                s.why = NO_ENTRY
            elif hashlib.sha256(memoryview(data)[start:]).hexdigest() != entry["data_sha256"]:
                s.why = "corrupt: its tensor data does not match the sha256 it carries"
            else:
                row = dict(entry, bytes=len(data), blob=p.name, blob_sha256=s.sha256)
                s.info = SessionInfo.checked(row, f"blob {p.name}")
        except ValueError as e:
            s.why = str(e)
    return out


def _decide(
    current: dict[str, SessionInfo],
    scanned: dict[str, _Scanned],
    blobs: Path,
    report: RebuildReport,
) -> dict[str, SessionInfo]:
    """The rows of the rebuilt index, from the ``current`` rows and the ``scanned`` blobs."""
    versions: dict[str, list[SessionInfo]] = {}
    for s in scanned.values():
        if s.info is not None:
            versions.setdefault(s.info.id, []).append(s.info)
    for v in versions.values():
        v.sort(key=lambda i: (i.updated, i.blob), reverse=True)
    rows = {}
    for cid, row in current.items():
        s = scanned.get(row.blob)
        written_since = s is None and (blobs / row.blob).is_file()
        if written_since or s is not None and s.sha256 == row.blob_sha256:
            rows[cid] = row
            continue
        state = "missing" if s is None else "corrupt (its sha256 differs from the index's)"
        if cid in versions:
            rows[cid] = versions[cid][0]
            why = (
                f"its blob {row.blob} is {state}: indexed {rows[cid].blob}, its newest "
                "intact version"
            )
        else:
            rows[cid] = row
            why = (
                f"its blob {row.blob} is {state} and no other version of it was found "
                f"(`moshi-ttt sessions delete {cid}` removes it)"
            )
        report.problems.append((cid, why))
    for cid, v in versions.items():
        if cid not in rows:
            rows[cid] = v[0]
            report.recovered.append(cid)
    used = {r.blob for r in rows.values()}
    for name, s in scanned.items():
        if name not in used:
            why = s.why or (
                f"superseded: session {s.info.id!r} is indexed with blob "
                f"{rows[s.info.id].blob} (`moshi-ttt sessions gc` removes it)"
            )
            report.kept.append((name, why))
    report.sessions = len(rows)
    return rows


def _rebuild_in_place(db: Path, blobs: Path, report: RebuildReport) -> None:
    """A readable index: add and re-point rows in one transaction."""
    scanned = _scan(blobs)
    con = sqlite3.connect(_uri(db, "rw"), uri=True, timeout=60, isolation_level=None)
    try:
        con.execute("PRAGMA synchronous=FULL")
        con.execute("BEGIN IMMEDIATE")
        rows = con.execute(f"SELECT {', '.join(COLUMNS)} FROM sessions").fetchall()
        current = {r[0]: SessionInfo.from_row(r) for r in rows}
        for cid, info in _decide(current, scanned, blobs, report).items():
            if current.get(cid) != info:
                con.execute(INSERT, info.row())
        con.execute("COMMIT")
    except sqlite3.Error as e:
        raise ValueError(index_error(db, db.parent, e)) from e
    finally:
        con.close()


def _write_new(db: Path, rows: dict[str, SessionInfo]) -> None:
    """Write a new index beside ``db`` and rename it into place (readers see none or all of it)."""
    tmp = db.with_name(f"{db.name}.rebuild-{os.getpid()}")
    for suffix in SUFFIXES:
        Path(f"{tmp}{suffix}").unlink(missing_ok=True)
    con = sqlite3.connect(tmp, isolation_level=None)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        con.execute(SCHEMA)
        con.execute(f"PRAGMA user_version={SESSION_FORMAT}")
        con.execute("BEGIN")
        con.executemany(INSERT, [info.row() for _, info in sorted(rows.items())])
        con.execute("COMMIT")
    finally:
        con.close()  # the last connection: the log is checkpointed into the file and removed
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, db)
    _fsync_dir(db.parent)


def _move_aside(db: Path, label: str) -> Path | None:
    """Rename ``db`` and its side files to ``<name>.<label>-<time>``; -> the new name of ``db``
    (None if it did not exist)."""
    stamp, n = time.strftime("%Y%m%d-%H%M%S"), 0
    target = db.with_name(f"{db.name}.{label}-{stamp}")
    while any(Path(f"{target}{s}").exists() for s in SUFFIXES):
        n += 1
        target = db.with_name(f"{db.name}.{label}-{stamp}-{n}")
    existed = db.exists()
    for suffix in SUFFIXES:
        if Path(f"{db}{suffix}").exists():
            os.replace(f"{db}{suffix}", f"{target}{suffix}")
    return target if existed else None


@contextlib.contextmanager
def _locked(root: Path):
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
