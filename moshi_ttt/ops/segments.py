"""Pack a batch with document resets into one row per segment, each starting at its position 0."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def segment_rows(pos: torch.Tensor, seg: torch.Tensor | None, multiple: int = 1):
    """Row of every token once segments are packed. pos, seg [B, T] -> (r [B, T], rows, length),
    ``length`` the longest segment rounded up to ``multiple``. ``seg`` None: each row is one
    document
    with pos = 0..T-1, already packed: r is None (no host sync, no copy)."""
    B, T = pos.shape
    if seg is None:
        return None, B, -(-T // multiple) * multiple
    ids = seg + torch.arange(B, device=pos.device)[:, None] * (T + 1)
    _, r = torch.unique(ids, return_inverse=True)  # [B, T]
    length = -(-(int(pos.max()) + 1) // multiple) * multiple
    return r, int(r.max()) + 1, length


def pack(
    x: torch.Tensor, r: torch.Tensor, pos: torch.Tensor, rows: int, length: int
) -> torch.Tensor:
    """x [B, T, ...] -> [rows, length, ...], zero where a segment is shorter than ``length``."""
    if r is None:
        return (
            x
            if length == x.shape[1]
            else F.pad(x, (0, 0) * (x.dim() - 2) + (0, length - x.shape[1]))
        )
    out = x.new_zeros(rows, length, *x.shape[2:])
    return out.index_put_((r, pos), x)


def unpack(x: torch.Tensor, r: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """[rows, length, ...] -> [B, T, ...]"""
    return x[:, : pos.shape[1]] if r is None else x[r, pos]


def row_of(r: torch.Tensor | None, pos: torch.Tensor) -> torch.Tensor:
    """The packed row of every token [B, T] (``r`` of ``segment_rows``, None when unpacked)."""
    return (
        r
        if r is not None
        else torch.arange(pos.shape[0], device=pos.device)[:, None].expand_as(pos)
    )
