"""Rotary position embedding at absolute positions (Moshi's interleaved-pair layout)."""

from __future__ import annotations

import math

import torch


def rope_frequencies(head_dim: int, max_period: float, device=None) -> torch.Tensor:
    """Angular frequency of each pair: ``max_period ** (-2 d / head_dim)``. [head_dim // 2] fp32."""
    d = torch.arange(head_dim // 2, device=device, dtype=torch.float32)
    return torch.exp(d * (-math.log(max_period) * 2.0 / head_dim))


def apply_rope(x: torch.Tensor, pos: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x[2d], x[2d+1])`` of ``x`` [B, H, T, D] by ``pos * freqs[d]``.

    ``pos`` [B, T] holds absolute positions (any integers); computed in fp32, returned in x's dtype.
    """
    B, H, T, D = x.shape
    angle = pos.to(torch.float32)[:, None, :, None] * freqs  # [B, 1, T, D/2]
    cos, sin = torch.cos(angle), torch.sin(angle)
    xp = x.float().view(B, H, T, D // 2, 2)
    xr, xi = xp[..., 0], xp[..., 1]  # [B, H, T, D/2] each
    out = torch.stack((xr * cos - xi * sin, xr * sin + xi * cos), dim=-1)  # [B, H, T, D/2, 2]
    return out.view(B, H, T, D).to(x.dtype)
