"""SiLU-gated MLP with Moshi's parameter names (``linear_in`` / ``linear_out``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class GatedMLP(nn.Module):
    """``O = (silu(H W_gate^T) * (H W_up^T)) W_down^T`` with ``linear_in = [W_gate; W_up]``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.linear_out = nn.Linear(hidden, dim, bias=False)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Z = silu(gate) * up. [B, T, D] -> [B, T, hidden]"""
        B, T, _ = x.shape
        h = self.linear_in(x).view(B, T, 2, -1)  # [B, T, 2, hidden]
        return F.silu(h[:, :, 0]) * h[:, :, 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_out(self.hidden(x))
