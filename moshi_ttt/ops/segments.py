"""Pack a batch with document resets into one row per segment, each starting at its position 0."""

from __future__ import annotations

import torch


def segment_rows(pos: torch.Tensor, seg: torch.Tensor, multiple: int = 1):
    """Row of every token once segments are packed. pos, seg [B, T] -> (r [B, T], rows, length),
    ``length`` the longest segment rounded up to ``multiple``."""
    B, T = pos.shape
    ids = seg + torch.arange(B, device=pos.device)[:, None] * (T + 1)
    _, r = torch.unique(ids, return_inverse=True)  # [B, T]
    length = -(-(int(pos.max()) + 1) // multiple) * multiple
    return r, int(r.max()) + 1, length


def pack(x: torch.Tensor, r: torch.Tensor, pos: torch.Tensor, rows: int, length: int) -> torch.Tensor:
    """x [B, T, ...] -> [rows, length, ...], zero where a segment is shorter than ``length``."""
    out = x.new_zeros(rows, length, *x.shape[2:])
    return out.index_put_((r, pos), x)


def unpack(x: torch.Tensor, r: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """[rows, length, ...] -> [B, T, ...]"""
    return x[r, pos]
