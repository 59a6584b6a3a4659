"""Multi-head attention with RoPE at absolute positions and a pluggable streaming memory.

With ``rope_scale`` s > 1 (YaRN, ops/rope.py): RoPE at YaRN's frequencies and every softmax
logit, window and memory alike, multiplied by 1/t = yarn_attention_scale(s)² (the paper's
softmax(qᵀk / (t √Dh))), the same in the parallel and streaming paths.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..ops.rope import apply_rope_qk, yarn_frequencies
from ..state import ScopedState
from .memories import make_memory
from .memory import Heads


class StreamingAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.in_proj = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        freqs = yarn_frequencies(
            cfg.head_dim, cfg.max_period, cfg.rope_scale, cfg.rope_original_context
        )
        # [Dh/2]; plain RoPE when rope_scale = 1
        self.register_buffer("freqs", freqs, persistent=False)
        self.memory = make_memory(cfg.memory, cfg.num_heads, cfg.head_dim, cfg.rope_scale)

    def _qkv(self, x: torch.Tensor, pos: torch.Tensor) -> Heads:
        """x [B, T, D], pos [B, T] -> the ``Heads``: v, q and k with RoPE at pos, and before it,
        [B, H, T, Dh] each."""
        B, T, _ = x.shape
        qkv = self.in_proj(x).view(B, T, 3, self.num_heads, self.head_dim)  # [B, T, 3, H, Dh]
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x [B, H, T, Dh]
        q_rot, k_rot = apply_rope_qk(q, k, pos, self.freqs)
        return Heads(v=v, q=q_rot, k=k_rot, q_raw=q, k_raw=k)

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        B, H, T, Dh = o.shape
        return self.out_proj(o.transpose(1, 2).reshape(B, T, H * Dh))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, seg: torch.Tensor | None) -> torch.Tensor:
        """Parallel path. x [B, T, D]; pos [B, T] positions within each segment; seg [B, T] ids or
        None."""
        return self._out(self.memory.attend_parallel(self._qkv(x, pos), pos, seg, self.freqs))

    def init_state(self, st: ScopedState, B: int, device, dtype) -> None:
        self.memory.init(st, B, device, dtype)

    def step(self, x: torch.Tensor, pos: torch.Tensor, st: ScopedState) -> torch.Tensor:
        """Streaming path: x [B, k, D] at positions pos [B, k]; reads then updates the memory."""
        return self._out(self.memory.attend_step(self._qkv(x, pos), pos, st, self.freqs))
