"""Multi-head attention with RoPE at absolute positions and a pluggable streaming memory.

With ``rope_scale`` s > 1 (YaRN, ops/rope.py): RoPE at YaRN's frequencies and every softmax
logit, window and memory alike, multiplied by 1/t = yarn_attention_scale(s)² (the paper's
softmax(qᵀk / (t √Dh))), the same in the parallel and streaming paths.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..config import ModelConfig
from ..ops.masks import visible
from ..ops.window_attention import window_attention
from ..ops.rope import apply_rope, yarn_attention_scale, yarn_frequencies
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
        freqs = yarn_frequencies(cfg.head_dim, cfg.max_period, cfg.rope_scale, cfg.rope_original_context)
        self.register_buffer("freqs", freqs, persistent=False)  # [Dh/2]; plain RoPE when rope_scale = 1
        inv_t = yarn_attention_scale(cfg.rope_scale) ** 2
        self.sdpa_scale = None if inv_t == 1.0 else inv_t / math.sqrt(cfg.head_dim)  # None: 1/√Dh
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
        m = self.cfg.memory
        if seg is None and m.kind == "full":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.sdpa_scale)
        else:  # block-sparse FlexAttention on CUDA, a dense mask elsewhere
            o = window_attention(q, k, v, pos, seg, m.kind, m.window, m.num_sink, self.sdpa_scale)
        return self._out(o)

    def init_state(self, st: ScopedState, B: int, device, dtype) -> None:
        self.memory.init(st, B, self.num_heads, self.head_dim, device, dtype)

    def step(self, x: torch.Tensor, pos: torch.Tensor, st: ScopedState) -> torch.Tensor:
        """Streaming path: x [B, k, D] at positions pos [B, k]; reads then updates the memory."""
        q, k, v, q_raw, k_raw = self._qkv(x, pos)
        if self.cfg.memory.kind in EVICTING:
            return self._out(self.memory.attend_step(q_raw, k_raw, v, q, k, pos, st, self.freqs))
        if x.shape[1] == 1 and self.cfg.memory.kind == "window":  # the token takes a slot no query sees
            self.memory.write(st, k, v, pos)
            k0, v0, p0 = self.memory.context(st)
            o = F.scaled_dot_product_attention(q, k0.to(k.dtype), v0.to(v.dtype), attn_mask=self._mask(pos, p0)[:, None],
                                               scale=self.sdpa_scale)
            return self._out(o)
        k0, v0, p0 = self.memory.context(st)  # [B, H, L, Dh], [B, L]
        keys = torch.cat([k0.to(k.dtype), k], dim=2)
        vals = torch.cat([v0.to(v.dtype), v], dim=2)
        mask = self._mask(pos, torch.cat([p0, pos], dim=1))  # [B, k, L + k]
        o = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask[:, None], scale=self.sdpa_scale)
        self.memory.write(st, k, v, pos)
        return self._out(o)
