"""Debian packages as offline data, and the file formats inside the ones the corpus uses.

``apt-get download`` fills a cache; a ``.deb`` (an ``ar`` archive of ``control.tar.*`` and
``data.tar.*``) is read in memory with pure Python (no ``dpkg-deb``, same result anywhere).
``read_lazyload`` reads an R lazy-load database, ``read_ztext`` a SWORD zText Bible module.
"""

from __future__ import annotations

import bz2
import hashlib
import io
import lzma
import shutil
import subprocess
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np


class SourceError(RuntimeError):
    """A corpus source could not be fetched or parsed."""


@dataclass(frozen=True)
class DebPackage:
    """A downloaded ``.deb``: name, version (from its control file), sha256 and path."""

    name: str
    version: str
    sha256: str
    path: Path


def _fail(source: str, package: str, what: str) -> SourceError:
    return SourceError(f"source {source!r}: cannot fetch Debian package {package!r}: {what}")


def _stderr_lines(stderr: str) -> str:
    """apt-get's stderr without its harmless 'unsandboxed' warning."""
    keep = [ln for ln in stderr.splitlines() if ln.strip() and "unsandboxed" not in ln]
    return "\n".join(keep) or "(no stderr)"


def download_deb(package: str, cache_dir: str | Path, source: str) -> Path:
    """Path of ``package``'s ``.deb`` in ``cache_dir``, running ``apt-get download`` if absent.

    A cached ``.deb`` is reused (the newest by modification time if there are several), so a
    corpus can be rebuilt offline. Raises ``SourceError`` naming source, package and stderr.
    """
    cache_dir = Path(cache_dir)
    cached = sorted(cache_dir.glob(f"{package}_*.deb"), key=lambda p: (p.stat().st_mtime, p.name))
    if cached:
        return cached[-1]
    apt = shutil.which("apt-get")
    if apt is None:
        raise _fail(
            source,
            package,
            "apt-get not found on PATH (a Debian-based system is needed, "
            f"or put the .deb into {cache_dir} by hand)",
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(
            [apt, "download", package], cwd=cache_dir, capture_output=True, text=True, timeout=600
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise _fail(source, package, f"`apt-get download {package}` failed: {e}") from None
    if proc.returncode != 0:
        raise _fail(
            source,
            package,
            f"`apt-get download {package}` exited with {proc.returncode}:"
            f"\n{_stderr_lines(proc.stderr)}",
        )
    cached = sorted(cache_dir.glob(f"{package}_*.deb"))
    if not cached:
        raise _fail(
            source,
            package,
            f"`apt-get download {package}` wrote no .deb into {cache_dir}"
            f"\n{_stderr_lines(proc.stderr)}",
        )
    return cached[-1]


def _ar_members(data: bytes) -> dict[str, bytes]:
    """Members of an ``ar`` archive (the container format of a ``.deb``)."""
    if not data.startswith(b"!<arch>\n"):
        raise ValueError("not an ar archive")
    out, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        out[name] = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)  # members are 2-byte aligned
    return out


def _tar(members: dict[str, bytes], stem: str) -> tarfile.TarFile:
    """Open ``<stem>.tar[.xz|.gz|.bz2]`` from the ar members."""
    for name, blob in members.items():
        if name == stem + ".tar" or name.startswith(stem + ".tar."):
            if name.endswith(".zst"):
                raise ValueError(f"{name}: zstd-compressed debs are not supported")
            return tarfile.open(fileobj=io.BytesIO(blob), mode="r:*")
    raise ValueError(f"no {stem}.tar.* member")


def read_deb(path: str | Path, want: Callable[[str], bool]) -> dict[str, bytes]:
    """Regular files of the ``.deb``'s data tree whose path (e.g. ``usr/share/...``) passes
    ``want``."""
    with _tar(_ar_members(Path(path).read_bytes()), "data") as tar:
        out = {}
        for info in tar:
            name = info.name.removeprefix("./")
            if info.isfile() and want(name):
                out[name] = tar.extractfile(info).read()
        return out


def deb_control(path: str | Path) -> dict[str, str]:
    """Fields of the ``.deb``'s control file (``Package``, ``Version``, ...)."""
    with _tar(_ar_members(Path(path).read_bytes()), "control") as tar:
        for info in tar:
            if info.name.removeprefix("./") == "control":
                text = tar.extractfile(info).read().decode()
                break
        else:
            raise ValueError("no control file")
    fields = {}
    for line in text.splitlines():
        if line and not line[0].isspace() and ":" in line:
            key, value = line.split(":", 1)
            fields[key] = value.strip()
    return fields


def fetch_deb(package: str, cache_dir: str | Path, source: str) -> DebPackage:
    """Download (or reuse) ``package`` and describe it; ``SourceError`` if that fails."""
    path = download_deb(package, cache_dir, source)
    try:
        version = deb_control(path)["Version"]
    except (ValueError, KeyError, tarfile.TarError) as e:
        raise SourceError(f"source {source!r}: {path} is not a readable .deb: {e}") from None
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return DebPackage(name=package, version=version, sha256=sha, path=path)


def _rds(data: bytes):
    import rdata  # only the Austen source needs it

    return rdata.conversion.convert(rdata.parser.parse_data(data, extension=".rds"))


def read_lazyload(rdx: bytes, rdb: bytes) -> dict[str, object]:
    """Objects of an R lazy-load database (``Rdata.rdx`` index + ``Rdata.rdb`` blobs).

    The index is an RDS list ``variables: name -> (offset, length)`` into the ``.rdb``; each blob
    is a 4-byte big-endian length and a zlib stream (``compressed`` TRUE), or for compression
    2/3 a type byte first ('Z' xz, '2' bzip2, '0' none), holding one serialized R object.
    """
    index = _rds(rdx)
    kind = int(np.asarray(index["compressed"]).ravel()[0])
    out = {}
    for name, (offset, length) in index["variables"].items():
        blob = rdb[int(offset) : int(offset) + int(length)]
        body = blob[4:] if kind else blob  # compressed blobs start with the raw length
        if kind >= 2:
            codec = {b"Z": lzma.decompress, b"2": bz2.decompress, b"0": bytes}[body[:1]]
            body = codec(body[1:])
        elif kind == 1:
            body = zlib.decompress(body)
        out[str(name)] = _rds(body)
    return out


_BZV = np.dtype([("block", "<u4"), ("offset", "<u4"), ("size", "<u2")])


def read_ztext(files: Mapping[str, bytes]) -> list[str]:
    """All entries of a SWORD zText module in index order (``ot`` then ``nt``).

    ``<t>.bzs``: one (offset, compressed size, size) uint32-LE triple per zlib block in
    ``<t>.bzz``; ``<t>.bzv``: one (block uint32, offset uint32, size uint16) per index entry
    (module/testament/book/chapter headings and verses, in versification order).
    """
    entries = []
    for t in ("ot", "nt"):
        bzs = np.frombuffer(files[f"{t}.bzs"], dtype="<u4").reshape(-1, 3)
        bzv = np.frombuffer(files[f"{t}.bzv"], dtype=_BZV)
        bzz, blocks = files[f"{t}.bzz"], {}
        for block, offset, size in bzv.tolist():
            if size == 0:
                entries.append("")
                continue
            if block not in blocks:
                start, csize, usize = bzs[block].tolist()
                blocks[block] = zlib.decompress(bzz[start : start + csize])
                if len(blocks[block]) != usize:
                    raise ValueError(
                        f"zText {t} block {block}: {len(blocks[block])} bytes, "
                        f"its index says {usize}"
                    )
            entries.append(blocks[block][offset : offset + size].decode("utf-8"))
    return entries
