"""Windowed attention as explicit scores (so virtual tokens can join its softmax), and the mixing
of recent and virtual attention (``combine`` "gate" and "concat")."""

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


def gate_mix(o_r, vmask, gate, scores=None, values=None, out=None):
    """Option A: α·o_r + (1-α)·read, the read normalised on its own. o_r [..., Q, D] the window's
    attention output; the rest as in ``mix``. Returns (out [..., Q, D], mass on the memory [...,
    Q])."""
    if out is None:  # rows without a read get harmless finite scores, then weight 0
        p_v = (
            torch.softmax(torch.where(vmask[..., None], scores.float(), 0.0), -1) * vmask[..., None]
        )
        out = torch.einsum("...qm,...qmd->...qd", p_v, values.float())
    alpha = torch.where(vmask, gate, torch.ones_like(gate))  # (lerp at weight 1 gives o_r exactly)
    dt = torch.promote_types(torch.promote_types(o_r.dtype, alpha.dtype), torch.float32)
    return torch.lerp(out.to(dt), o_r.to(dt), alpha[..., None].to(dt)), 1 - alpha


def mix(s_r, v_r, vmask, gate, combine: str, scores=None, values=None, out=None):
    """Attention output from the window and a memory read.

    s_r [..., Q, K] window scores (masked entries -inf; every query sees at least itself), v_r
    [..., K, D]; vmask [..., Q] whether the query has a memory read; gate α per head broadcast to
    [..., Q]. The read is either softmax keys (``scores`` [..., Q, M], ``values`` [..., Q, M, D])
    or a direct output ``out`` [..., Q, D]. ``gate``: α·attn_window + (1-α)·read (separate
    normalisations); ``concat``: one softmax over window and virtual keys (softmax reads only).
    Returns (out [..., Q, D], mass of attention on the memory [..., Q]), in fp32.
    """
    s_r, v_r = s_r.float(), v_r.float()
    if combine == "gate" or out is not None:
        return gate_mix(torch.softmax(s_r, -1) @ v_r, vmask, gate, scores, values, out)
    s_v = scores.float().masked_fill(~vmask[..., None], float("-inf"))
    m = torch.maximum(s_r.amax(-1), s_v.amax(-1))[..., None]
    e_r, e_v = torch.exp(s_r - m), torch.exp(s_v - m)
    z = e_r.sum(-1) + e_v.sum(-1)
    res = (e_r @ v_r + torch.einsum("...qm,...qmd->...qd", e_v, values.float())) / z[..., None]
    return res, e_v.sum(-1) / z
