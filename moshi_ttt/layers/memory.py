"""Exact KV memories for streaming attention: full, window (ring buffer), sink + window.

Each memory keeps keys (after RoPE), values and their absolute positions (-1 = empty slot).
``context`` gives what was stored before the current step; ``write`` stores the step's tokens.
Masks always come from positions (``ops.masks.visible``), never from slots.
"""

from __future__ import annotations

import torch

from ..config import MemoryConfig, ModelConfig
from ..state import ScopedState


class FullMemory:
    """Every past token; grows with the stream.

    Buffers grow by doubling (amortised O(1) appends); ``state.meta["tokens"]`` slots are in use,
    the rest hold position -1.
    """

    def __init__(self, cfg: MemoryConfig):
        self.cfg = cfg

    def init(self, st: ScopedState, B: int, H: int, Dh: int, device, dtype) -> None:
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
            st["k"] = torch.cat([st["k"], st["k"].new_zeros(*st["k"].shape[:2], grow, st["k"].shape[3])], dim=2)
            st["v"] = torch.cat([st["v"], st["v"].new_zeros(*st["v"].shape[:2], grow, st["v"].shape[3])], dim=2)
            st["kpos"] = torch.cat([st["kpos"], st["kpos"].new_full((st["kpos"].shape[0], grow), -1)], dim=1)
        st["k"][:, :, n:n + t] = k
        st["v"][:, :, n:n + t] = v
        st["kpos"][:, n:n + t] = pos


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


class WindowMemory:
    """Ring buffer of the last ``window`` tokens: constant size."""

    def __init__(self, cfg: MemoryConfig):
        self.cfg = cfg

    def init(self, st: ScopedState, B: int, H: int, Dh: int, device, dtype) -> None:
        W = self.cfg.window
        st.add("k", torch.zeros(B, H, W, Dh, device=device, dtype=dtype), 0.0)
        st.add("v", torch.zeros(B, H, W, Dh, device=device, dtype=dtype), 0.0)
        st.add("kpos", torch.full((B, W), -1, dtype=torch.long, device=device), -1)

    def context(self, st: ScopedState):
        return st["k"], st["v"], st["kpos"]

    def write(self, st: ScopedState, k, v, pos, stored=None) -> None:
        ring_write(st["k"], st["v"], st["kpos"], k, v, pos, stored=stored)


class SinkMemory(WindowMemory):
    """StreamingLLM: the first ``num_sink`` tokens of the stream plus a ring of ``window``.

    The sink buffer has one extra slot that absorbs writes of later tokens and stays empty,
    so writing needs no branch on values (CUDA-graph safe).
    """

    def init(self, st: ScopedState, B: int, H: int, Dh: int, device, dtype) -> None:
        super().init(st, B, H, Dh, device, dtype)
        S = self.cfg.num_sink
        st.add("sink_k", torch.zeros(B, H, S + 1, Dh, device=device, dtype=dtype), 0.0)
        st.add("sink_v", torch.zeros(B, H, S + 1, Dh, device=device, dtype=dtype), 0.0)
        st.add("sink_pos", torch.full((B, S + 1), -1, dtype=torch.long, device=device), -1)

    def context(self, st: ScopedState):
        S = self.cfg.num_sink
        ring_pos = st["kpos"].masked_fill(st["kpos"] < S, -1)  # sink positions live in the sink buffer
        k = torch.cat([st["sink_k"], st["k"]], dim=2)
        v = torch.cat([st["sink_v"], st["v"]], dim=2)
        return k, v, torch.cat([st["sink_pos"], ring_pos], dim=1)

    def write(self, st: ScopedState, k, v, pos) -> None:
        super().write(st, k, v, pos)
        S = self.cfg.num_sink
        k, v, pos = k[:, :, :S], v[:, :, :S], pos[:, :S]  # only a step's first S tokens can be sinks
        slots = torch.where(pos < S, pos, torch.full_like(pos, S))  # [B, t]; S is the spill slot
        idx = slots[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        st["sink_k"].scatter_(2, idx, k.to(st["sink_k"].dtype))
        st["sink_v"].scatter_(2, idx, v.to(st["sink_v"].dtype))
        st["sink_pos"].scatter_(1, slots, pos)
        st["sink_pos"][:, S].fill_(-1)


def make_memory(cfg: ModelConfig):
    kinds = {"full": FullMemory, "window": WindowMemory, "sink": SinkMemory}
    if cfg.memory.kind in ("ttt_cache", "pooled", "infini"):
        from .infini import InfiniMemory
        from .pooled import PooledMemory
        from .ttt_cache import TTTCacheMemory

        return {"ttt_cache": TTTCacheMemory, "pooled": PooledMemory, "infini": InfiniMemory}[cfg.memory.kind](cfg)
    if cfg.memory.kind not in kinds:
        raise ValueError(f"memory kind {cfg.memory.kind!r} has no implementation")
    return kinds[cfg.memory.kind](cfg.memory)
