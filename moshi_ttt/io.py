"""Atomic writes and checked reads of the project's torch files."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def save_atomic(blob: dict, path: str | os.PathLike) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a half-written ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)


def load_checked(path: str | os.PathLike, fmt: str, what: str) -> dict:
    """Load a blob saved with ``{"format": fmt, ...}``; ValueError naming ``what`` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no {what} at {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable {what}: {e}") from e
    if not isinstance(blob, dict) or blob.get("format") != fmt:
        raise ValueError(f"{path} is not a {what} of format {fmt}")
    return blob
