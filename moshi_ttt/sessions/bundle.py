"""One self-contained file per exported session: a zip of session.json (the row) and the blob."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

from .format import SESSION_FORMAT, SessionInfo, check_blob

BUNDLE_TAG = f"moshi_ttt.session-export/{SESSION_FORMAT}"


def write_bundle(path: str | os.PathLike, info: SessionInfo, data: bytes) -> Path:
    """Write atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        head = {"format": BUNDLE_TAG, "session": info.to_dict()}
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
            z.writestr("session.json", json.dumps(head, indent=1, sort_keys=True))
            z.writestr("state.safetensors", data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"cannot write the exported session to {path}: {e}") from e
    return path


def read_bundle(path: str | os.PathLike) -> tuple[SessionInfo, bytes]:
    """(row, blob bytes) of an exported session; ValueError if it is not one, of another format,
    or its blob does not match the hash recorded in it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no exported session at {path}")
    try:
        with zipfile.ZipFile(path) as z:
            head, data = json.loads(z.read("session.json")), z.read("state.safetensors")
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as e:
        raise ValueError(f"{path} is not an exported session: {e}") from e
    fmt = head.get("format") if isinstance(head, dict) else None
    if fmt != BUNDLE_TAG:
        raise ValueError(
            f"{path} is an exported session of format {fmt!r}; this moshi_ttt reads {BUNDLE_TAG!r}"
        )
    info = SessionInfo.checked(head.get("session"), f"exported session {path}")
    check_blob(data, info.blob_sha256, f"exported session {path}")
    return info, data
