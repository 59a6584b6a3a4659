"""The memory protocol and the exact KV memories: full, window (ring buffer), sink + window.

Every memory of an attention layer (these and the evicting ones, layers/evicting.py) is built
from ``(MemoryConfig, heads, head_dim, rope_scale)`` and implements:
    init(st, B, device, dtype)                 its streaming state, in a ScopedState
    attend_parallel(x, pos, seg, freqs) -> [B, H, T, Dh]              a training sequence
    attend_step(x, pos, st, freqs, active=None) -> [B, H, k, Dh]      k new tokens of a stream
    self_masked(k) -> names of state a k-token step keeps unchanged by itself for inactive rows
x: the layer's ``Heads`` (values, queries and keys after RoPE and before it, built by name); pos
[B, T] positions, seg [B, T] document ids (or None).
The exact memories keep keys (after RoPE), values and their absolute positions (-1 = empty slot):
``context`` gives what was stored before the current step, ``write`` stores the step's tokens.
Masks always come from positions (``ops.masks.visible``), never from slots.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.nn import functional as F

from ..config import MemoryConfig
from ..ops.masks import visible
from ..ops.rope import yarn_attention_scale
from ..ops.window_attention import window_attention
from ..state import ScopedState


class Heads(NamedTuple):
    """A layer's projections of a step's tokens, each [B, H, T, Dh]: values v, queries and keys
    after RoPE at the tokens' positions (q, k) and before it (q_raw, k_raw: what the memories of
    evicted tokens learn and read). Built by name, so the two kinds cannot be swapped."""

    v: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    q_raw: torch.Tensor
    k_raw: torch.Tensor


class ExactMemory:
    """softmax(q kᵀ / (t √Dh)) v over the stored tokens a query may see (``visible``), with 1/t
    YaRN's temperature (1 without YaRN). Subclasses store the tokens (``context``, ``write``)."""

    def __init__(self, cfg: MemoryConfig, heads: int, head_dim: int, rope_scale: float = 1.0):
        self.cfg, self.num_heads, self.head_dim = cfg, heads, head_dim
        inv_t = yarn_attention_scale(rope_scale) ** 2
        self.scale = None if inv_t == 1.0 else inv_t / math.sqrt(head_dim)  # None: SDPA's 1/√Dh

    def self_masked(self, kq: int) -> tuple:
        return ()

    def attend_parallel(self, x: Heads, pos, seg, freqs):
        """All queries of a sequence: causal SDPA for one full-attention document per row, else
        block-sparse FlexAttention on CUDA (a dense mask elsewhere). [B, H, T, Dh] -> same."""
        v, q, k = x.v, x.q, x.k
        m = self.cfg
        if seg is None and m.kind == "full":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return window_attention(q, k, v, pos, seg, m.kind, m.window, m.num_sink, self.scale)

    def attend_step(self, x: Heads, pos, st: ScopedState, freqs, active=None):
        """k new tokens at pos [B, k]: attend to what was stored and to each other, then store them.
        (``active``: the caller restores inactive rows.)"""
        v, q, k = x.v, x.q, x.k
        k0, v0, p0 = self.context(st)  # [B, H, L, Dh], [B, L]
        keys, vals = torch.cat([k0.to(k.dtype), k], 2), torch.cat([v0.to(v.dtype), v], 2)
        mask = visible(
            pos, torch.cat([p0, pos], 1), self.cfg.kind, self.cfg.window, self.cfg.num_sink
        )
        o = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask[:, None], scale=self.scale)
        self.write(st, k, v, pos)
        return o


class FullMemory(ExactMemory):
    """Every past token; grows with the stream.

    Buffers grow by doubling (amortised O(1) appends); ``state.meta["tokens"]`` slots are in use,
    the rest hold position -1.
    """

    def init(self, st: ScopedState, B: int, device, dtype) -> None:
        H, Dh = self.num_heads, self.head_dim
        st.add("k", torch.zeros(B, H, 0, Dh, device=device, dtype=dtype), 0.0)
        st.add("v", torch.zeros(B, H, 0, Dh, device=device, dtype=dtype), 0.0)
        st.add("kpos", torch.zeros(B, 0, dtype=torch.long, device=device), -1)

    def context(self, st: ScopedState):
        n = st.state.meta["tokens"]
        return st["k"][:, :, :n], st["v"][:, :, :n], st["kpos"][:, :n]

    def write(self, st: ScopedState, k, v, pos) -> None:
        n, t = st.state.meta["tokens"], pos.shape[1]
        cap = st["kpos"].shape[1]
        if n + t > cap:
            new_cap = max(n + t, 2 * cap, 64)
            grow = new_cap - cap
            st["k"] = torch.cat(
                [st["k"], st["k"].new_zeros(*st["k"].shape[:2], grow, st["k"].shape[3])], dim=2
            )
            st["v"] = torch.cat(
                [st["v"], st["v"].new_zeros(*st["v"].shape[:2], grow, st["v"].shape[3])], dim=2
            )
            st["kpos"] = torch.cat(
                [st["kpos"], st["kpos"].new_full((st["kpos"].shape[0], grow), -1)], dim=1
            )
        st["k"][:, :, n : n + t] = k
        st["v"][:, :, n : n + t] = v
        st["kpos"][:, n : n + t] = pos


def ring_write(kbuf, vbuf, pbuf, k, v, pos, extra=(), stored=None) -> None:
    """Store the last ``size`` of the step's tokens at slots ``pos % size``, in place.

    kbuf, vbuf [B, H, size, Dh]; pbuf [B, size]; k, v [B, H, T, Dh]; pos [B, T]; ``extra``:
    more (buffer, values) pairs shaped like (kbuf, k); ``stored``: the positions to record (default
    ``pos``; -1 marks a slot empty).
    """
    size = pbuf.shape[1]
    pos = pos[:, -size:]
    slots = pos % size  # [B, t] distinct: positions are consecutive
    idx = slots[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])  # [B, H, t, Dh]
    for buf, x in ((kbuf, k), (vbuf, v), *extra):
        buf.scatter_(2, idx, x[:, :, -size:].to(buf.dtype))
    pbuf.scatter_(1, slots, (stored if stored is not None else pos)[:, -size:])


class WindowMemory(ExactMemory):
    """Ring buffer of the last ``window`` tokens: constant size."""

    def init(self, st: ScopedState, B: int, device, dtype) -> None:
        W, H, Dh = self.cfg.window, self.num_heads, self.head_dim
        st.add("k", torch.zeros(B, H, W, Dh, device=device, dtype=dtype), 0.0)
        st.add("v", torch.zeros(B, H, W, Dh, device=device, dtype=dtype), 0.0)
        st.add("kpos", torch.full((B, W), -1, dtype=torch.long, device=device), -1)

    def context(self, st: ScopedState):
        return st["k"], st["v"], st["kpos"]

    def write(self, st: ScopedState, k, v, pos, stored=None) -> None:
        ring_write(st["k"], st["v"], st["kpos"], k, v, pos, stored=stored)

    def self_masked(self, kq: int) -> tuple:
        """A one-token step of an inactive row writes an empty slot itself (``attend_step``)."""
        return ("k", "v", "kpos") if kq == 1 else ()

    def attend_step(self, x: Heads, pos, st: ScopedState, freqs, active=None):
        """One token takes the slot of one no query sees (W back): write first, then attend to the
        ring, which holds only this row's last W positions (or -1). A row with ``active`` [B] False
        writes an empty slot (position -1), so it continues as if the step never happened."""
        v, q, k = x.v, x.q, x.k
        if k.shape[2] != 1:
            return super().attend_step(x, pos, st, freqs, active)
        stored = pos if active is None else torch.where(active[:, None], pos, -1)
        self.write(st, k, v, pos, stored=stored)
        k0, v0, p0 = self.context(st)
        return F.scaled_dot_product_attention(
            q, k0.to(k.dtype), v0.to(v.dtype), attn_mask=(p0 >= 0)[:, None, None], scale=self.scale
        )


class SinkMemory(WindowMemory):
    """StreamingLLM: the first ``num_sink`` tokens of the stream plus a ring of ``window``.

    The sink buffer has one extra slot that absorbs writes of later tokens and stays empty,
    so writing needs no branch on values (CUDA-graph safe).
    """

    # the sink slots are not a ring a new token overwrites: the general step, nothing self-masked
    attend_step, self_masked = ExactMemory.attend_step, ExactMemory.self_masked

    def init(self, st: ScopedState, B: int, device, dtype) -> None:
        super().init(st, B, device, dtype)
        S, H, Dh = self.cfg.num_sink, self.num_heads, self.head_dim
        st.add("sink_k", torch.zeros(B, H, S + 1, Dh, device=device, dtype=dtype), 0.0)
        st.add("sink_v", torch.zeros(B, H, S + 1, Dh, device=device, dtype=dtype), 0.0)
        st.add("sink_pos", torch.full((B, S + 1), -1, dtype=torch.long, device=device), -1)

    def context(self, st: ScopedState):
        S = self.cfg.num_sink
        # sink positions live in the sink buffer
        ring_pos = st["kpos"].masked_fill(st["kpos"] < S, -1)
        k = torch.cat([st["sink_k"], st["k"]], dim=2)
        v = torch.cat([st["sink_v"], st["v"]], dim=2)
        return k, v, torch.cat([st["sink_pos"], ring_pos], dim=1)

    def write(self, st: ScopedState, k, v, pos) -> None:
        super().write(st, k, v, pos)
        S = self.cfg.num_sink
        # only a step's first S tokens can be sinks
        k, v, pos = k[:, :, :S], v[:, :, :S], pos[:, :S]
        slots = torch.where(pos < S, pos, torch.full_like(pos, S))  # [B, t]; S is the spill slot
        idx = slots[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        st["sink_k"].scatter_(2, idx, k.to(st["sink_k"].dtype))
        st["sink_v"].scatter_(2, idx, v.to(st["sink_v"].dtype))
        st["sink_pos"].scatter_(1, slots, pos)
        st["sink_pos"][:, S].fill_(-1)
