"""Attention visibility from absolute positions (never from buffer slots)."""

from __future__ import annotations

import torch


def visible(
    q_pos: torch.Tensor, k_pos: torch.Tensor, kind: str, window: int, num_sink: int
) -> torch.Tensor:
    """Which keys each query may attend to. q_pos [B, Tq], k_pos [B, Tk] -> bool [B, Tq, Tk].

    A key with position < 0 is an empty slot. ``full``: every earlier key; ``window``: keys less
    than ``window`` positions back; ``sink``: the window plus the first ``num_sink`` positions.
    """
    q = q_pos[:, :, None]  # [B, Tq, 1]
    k = k_pos[:, None, :]  # [B, 1, Tk]
    ok = (k >= 0) & (k <= q)
    if kind == "full":
        return ok
    recent = (q - k) < window
    if kind == "window":
        return ok & recent
    if kind == "sink":
        return ok & (recent | (k < num_sink))
    raise ValueError(f"no mask for memory kind {kind!r}")


def segment_positions(
    resets: torch.Tensor | None, B: int, T: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions restarting at 0 after each reset, and segment ids. resets bool [B, T] -> ([B, T],
    [B, T]).

    ``resets[b, t]`` True means memory is reset before token t (a new document starts there).
    """
    t = torch.arange(T, device=device).expand(B, T)
    if resets is None:
        return t, torch.zeros(B, T, dtype=torch.long, device=device)
    starts = torch.where(resets, t, torch.zeros_like(t))
    start = torch.cummax(starts, dim=1).values  # index of the latest reset at or before t
    return t - start, torch.cumsum(resets.long(), dim=1)
