"""Windowed attention as explicit scores (so virtual tokens can join its softmax), and the mixing
of recent and virtual attention (DESIGN section 4, combine options A and B)."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def band(x: torch.Tensor, window: int, fill: float = 0.0) -> torch.Tensor:
    """Keys of each query chunk: chunk c of ``window`` queries sees indices [(c-1) W, (c+1) W).
    x [B, H, T, D] -> [B, H, NC, 2W, D] (also [B, T] -> [B, NC, 2W]); T padded to NC * W."""
    T = x.shape[2] if x.dim() == 4 else x.shape[1]
    pad = -T % window
    if x.dim() == 4:
        xp = F.pad(x, (0, 0, window, pad), value=fill)
        return xp.unfold(2, 2 * window, window).transpose(-1, -2)
    return F.pad(x, (window, pad), value=fill).unfold(1, 2 * window, window)


def chunked(x: torch.Tensor, window: int, fill: float = 0.0) -> torch.Tensor:
    """Queries in chunks: [B, H, T, D] -> [B, H, NC, W, D]; [B, T] -> [B, NC, W]."""
    T = x.shape[2] if x.dim() == 4 else x.shape[1]
    pad = -T % window
    if x.dim() == 4:
        return F.pad(x, (0, 0, 0, pad), value=fill).unflatten(2, (-1, window))
    return F.pad(x, (0, pad), value=fill).unflatten(1, (-1, window))


def mix(s_r, v_r, s_v, v_v, vmask, combine: str, gate: torch.Tensor):
    """Attention output from recent scores and virtual scores.

    s_r [..., Q, K] (masked entries -inf; every query sees at least itself), v_r [..., K, D];
    s_v [..., Q, M], v_v [..., Q, M, D]; vmask [..., Q] whether the query has virtual tokens;
    gate: α per head, broadcast to [..., Q]. ``gate``: α·attn_recent + (1-α)·attn_virtual
    (separate softmaxes); ``concat``: one softmax over both. Returns (out [..., Q, D], mass of
    attention on virtual tokens [..., Q]). Computed in fp32.
    """
    s_r, v_r, s_v, v_v = s_r.float(), v_r.float(), s_v.float(), v_v.float()
    if combine == "gate":
        o_r = torch.softmax(s_r, -1) @ v_r
        p_v = torch.softmax(s_v, -1) * vmask[..., None]
        o_v = torch.einsum("...qm,...qmd->...qd", p_v, v_v)
        alpha = torch.where(vmask, gate, torch.ones_like(gate))
        return alpha[..., None] * o_r + (1 - alpha[..., None]) * o_v, 1 - alpha
    s_v = s_v.masked_fill(~vmask[..., None], float("-inf"))
    m = torch.maximum(s_r.amax(-1), s_v.amax(-1))[..., None]
    e_r, e_v = torch.exp(s_r - m), torch.exp(s_v - m)
    z = e_r.sum(-1) + e_v.sum(-1)
    out = (e_r @ v_r + torch.einsum("...qm,...qmd->...qd", e_v, v_v)) / z[..., None]
    return out, e_v.sum(-1) / z
