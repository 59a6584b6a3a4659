"""Multi-head attention with RoPE at absolute positions and a pluggable streaming memory."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..config import ModelConfig
from ..ops.masks import visible
from ..ops.rope import apply_rope, rope_frequencies
from ..state import ScopedState
from .memory import make_memory

EVICTING = ("ttt_cache", "pooled", "infini")  # window + a memory of evicted tokens (layers/evicting.py)


class StreamingAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.in_proj = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.register_buffer("freqs", rope_frequencies(cfg.head_dim, cfg.max_period), persistent=False)
        self.memory = make_memory(cfg)

    def _qkv(self, x: torch.Tensor, pos: torch.Tensor):
        """x [B, T, D], pos [B, T] -> q, k (RoPE at pos), v, and q, k before RoPE: [B, H, T, Dh] each."""
        B, T, _ = x.shape
        qkv = self.in_proj(x).view(B, T, 3, self.num_heads, self.head_dim)  # [B, T, 3, H, Dh]
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x [B, H, T, Dh]
        return apply_rope(q, pos, self.freqs), apply_rope(k, pos, self.freqs), v, q, k

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        B, H, T, Dh = o.shape
        return self.out_proj(o.transpose(1, 2).reshape(B, T, H * Dh))

    def _mask(self, q_pos, k_pos):
        m = self.cfg.memory
        return visible(q_pos, k_pos, m.kind, m.window, m.num_sink)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, seg: torch.Tensor | None) -> torch.Tensor:
        """Parallel path. x [B, T, D]; pos [B, T] positions within each segment; seg [B, T] ids or None."""
        q, k, v, q_raw, k_raw = self._qkv(x, pos)
        if self.cfg.memory.kind in EVICTING:
            return self._out(self.memory.attend_parallel(q_raw, k_raw, v, q, k, pos, seg, self.freqs))
        if seg is None and self.cfg.memory.kind == "full":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            mask = self._mask(pos, pos)  # [B, T, T]
            if seg is not None:
                mask = mask & (seg[:, :, None] == seg[:, None, :])
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        return self._out(o)

    def init_state(self, st: ScopedState, B: int, device, dtype) -> None:
        self.memory.init(st, B, self.num_heads, self.head_dim, device, dtype)

    def step(self, x: torch.Tensor, pos: torch.Tensor, st: ScopedState) -> torch.Tensor:
        """Streaming path: x [B, k, D] at positions pos [B, k]; reads then updates the memory."""
        q, k, v, q_raw, k_raw = self._qkv(x, pos)
        if self.cfg.memory.kind in EVICTING:
            return self._out(self.memory.attend_step(q_raw, k_raw, v, q, k, pos, st, self.freqs))
        k0, v0, p0 = self.memory.context(st)  # [B, H, L, Dh], [B, L]
        keys = torch.cat([k0.to(k.dtype), k], dim=2)
        vals = torch.cat([v0.to(v.dtype), v], dim=2)
        mask = self._mask(pos, torch.cat([p0, pos], dim=1))  # [B, k, L + k]
        o = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask[:, None])
        self.memory.write(st, k, v, pos)
        return self._out(o)
