"""Memories of a window plus what leaves it: the common part of ``ttt_cache``, ``pooled`` and
``infini``.

The window is the exact ring of the last W tokens (keys after RoPE, keys before RoPE, values,
positions). A token at position p (within its document) is evicted for queries at p + W and
later. A subclass turns evicted tokens into a virtual read for each query:
``virtual_parallel`` (all queries of a training sequence) and ``virtual_step`` (the k queries of
a streaming step, given the step's evicted candidates). A read is either softmax keys (``scores``
[.., Q, M], ``values`` [.., Q, M, Dh]) mixed with the window by ``combine``, or a direct output
(``out`` [.., Q, Dh]) mixed by the learned gate.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.nn import functional as F

from ..config import MemoryConfig
from ..ops import impl
from ..ops.banded import band, chunked, gate_mix, mix
from ..ops.masks import visible
from ..ops.rope import yarn_attention_scale
from ..ops.window_attention import window_attention
from ..state import ScopedState
from . import records
from .memory import Heads, ring_write


def chunked_q(x: torch.Tensor, window: int) -> torch.Tensor:
    """Per-query tensors in query chunks: [B, H, T, ...] -> [B, H, NC, W, ...] (zero padding)."""
    pad = -x.shape[2] % window
    x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
    return x.unflatten(2, (-1, window))


@dataclasses.dataclass
class VirtualRead:
    """What a memory of evicted tokens offers its queries: softmax keys (``scores`` [.., Q, M]
    and ``values`` [.., Q, M, Dh], mixed with the window by ``combine``) or a direct output
    (``out`` [.., Q, Dh], mixed by the learned gate); ``has`` [B, Q] the queries with a read;
    for diagnostics the virtual keys ``keys`` [.., Q, M, Dh] and the compressor's inner
    ``losses`` (before, after) each update."""

    has: torch.Tensor
    scores: torch.Tensor | None = None
    values: torch.Tensor | None = None
    out: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    losses: tuple = (None, None)

    def parts(self) -> dict:
        """The keyword arguments of ``ops.banded.mix`` / ``gate_mix``."""
        if self.out is not None:
            return {"out": self.out}
        return {"scores": self.scores, "values": self.values}

    def chunked(self, window: int) -> dict:
        """``parts`` in query chunks of ``window`` (the banded reference)."""
        return {n: chunked_q(x, window) for n, x in self.parts().items()}


class EvictingMemory(nn.Module):
    def __init__(self, cfg: MemoryConfig, heads: int, head_dim: int, rope_scale: float = 1.0):
        super().__init__()
        self.cfg = cfg
        self.num_heads, self.head_dim = heads, head_dim
        self.name = type(self).__name__  # in error messages (the Moshi adapter: the layer's name)
        # α = σ(gate): weight of the window
        self.gate = nn.Parameter(torch.full((heads,), float(cfg.gate_init)))
        if self.cfg.gate_per_token:  # α_t = σ(gate + w·q_t), per head (starts as the constant gate)
            self.gate_w = nn.Parameter(torch.zeros(heads, head_dim))
        # softmax logits are qᵀk / √Dh times 1/t, YaRN's temperature (1.0 without YaRN): the window
        # here, softmax virtual keys in the subclasses
        self.inv_t = yarn_attention_scale(rope_scale) ** 2

    # ---- subclass hooks -----------------------------------------------------------------
    def virtual_parallel(self, q_raw, k_raw, v, pos, seg, freqs) -> VirtualRead:
        raise NotImplementedError

    def virtual_step(
        self, q_raw, cand_k, cand_v, valid, pos, st: ScopedState, freqs
    ) -> VirtualRead:
        raise NotImplementedError

    def init_memory(self, st: ScopedState, B: int, device) -> None:
        raise NotImplementedError

    def alpha(self, q_raw: torch.Tensor) -> torch.Tensor:
        """The window's weight α per query: q_raw [B, H, Q, Dh] -> [B, H, Q] (fp32):
        σ(gate_h), or σ(gate_h + w_h·q_t) with ``gate_per_token``."""
        B, H, Q, _ = q_raw.shape
        f = torch.promote_types(self.gate.dtype, torch.float32)
        g = self.gate.to(f).view(1, H, 1)
        if self.cfg.gate_per_token:
            g = g + torch.einsum("bhqd,hd->bhq", q_raw.to(f), self.gate_w.to(f))
        return torch.sigmoid(g).expand(B, H, Q)

    # ---- parallel path --------------------------------------------------------------------
    def attend_parallel(self, x: Heads, pos, seg, freqs):
        """All [B, H, T, Dh]; pos/seg [B, T] (seg None: one document per row, pos 0..T-1) -> out [B,
        H, T, Dh]."""
        q_raw, k_raw, v, q, k = x.q_raw, x.k_raw, x.v, x.q, x.k
        B, H, T, Dh = q.shape
        W = self.cfg.window
        read = self.virtual_parallel(q_raw, k_raw, v, pos, seg, freqs)
        # gate-mixed reads: the window by ``window_attention``, or its reference, banded scores
        if (self.cfg.combine == "gate" or read.out is not None) and not impl.reference("window"):
            # "gate" normalises the window on its own: the window memory's attention
            o_r = window_attention(q, k, v, pos, seg, "window", W, 0, self.inv_t / math.sqrt(Dh))
            vmask = read.has[:, None].expand(B, H, T)
            out, mass = gate_mix(o_r, vmask, self.alpha(q_raw), **read.parts())
            self._record(mass, read)
            return out.to(q.dtype)
        # the window: chunks of W queries against the 2W keys around them, masked by positions
        seg = seg if seg is not None else torch.zeros_like(pos)
        pq, pk = chunked(pos, W, -1), band(pos, W, -1)  # [B, NC, W], [B, NC, 2W]
        sq, sk = chunked(seg, W, -2), band(seg, W, -3)
        ok = visible(pq.flatten(0, 1), pk.flatten(0, 1), "window", W, 0).view(
            *pq.shape, pk.shape[-1]
        )
        ok = (ok & (sq[..., None] == sk[..., None, :]))[:, None]  # [B, 1, NC, W, 2W]
        s_r = (
            (chunked(q, W).float() @ band(k, W).float().transpose(-1, -2))
            / math.sqrt(Dh)
            * self.inv_t
        )
        # pad rows finite
        s_r = torch.where(ok.any(-1, keepdim=True), s_r.masked_fill(~ok, float("-inf")), 0.0)
        # [B, H, NC, W]
        vmask = chunked(read.has.float(), W)[:, None].bool().expand(B, H, -1, -1)
        gate = chunked(self.alpha(q_raw)[..., None], W)[..., 0]  # [B, H, NC, W]
        out, mass = mix(
            s_r,
            band(v, W),
            vmask,
            gate,
            self.cfg.combine,
            **read.chunked(W),
        )
        self._record(mass.flatten(2)[..., :T], read)
        return out.flatten(2, 3)[:, :, :T].to(q.dtype)

    # ---- streaming path -------------------------------------------------------------------
    def init(self, st: ScopedState, B: int, device, dtype) -> None:
        W, H, Dh = self.cfg.window, self.num_heads, self.head_dim
        for name in ("k", "v", "kraw"):  # keys after RoPE, values, keys before RoPE
            st.add(name, torch.zeros(B, H, W, Dh, device=device, dtype=dtype), 0.0)
        st.add("kpos", torch.full((B, W), -1, dtype=torch.long, device=device), -1)
        self.init_memory(st, B, device)

    def candidates(self, st: ScopedState, k_raw, v, pos, active=None):
        """Tokens leaving the window in this step: positions P - W + j for j < k, valid when >= 0
        (a suffix) and the row is ``active`` [B] (None: all). Only those ring slots are read.
        -> keys before RoPE, values [B, H, k, Dh], valid [B, k]."""
        cand_k, cand_v, valid = self._leaving(st, k_raw, v, pos)
        return cand_k, cand_v, valid if active is None else valid & active[:, None]

    def _leaving(self, st: ScopedState, k_raw, v, pos):
        B, H, kq, Dh = k_raw.shape
        W = self.cfg.window
        if kq == 1:  # position P - W sits in the slot P takes
            gather = lambda buf: buf.gather(2, (pos % W)[:, None, :, None].expand(-1, H, -1, Dh))
            return gather(st["kraw"]), gather(st["v"]), pos >= W
        P = pos[:, 0]
        n = min(kq, W)
        # ring slots of positions P - W + j
        order = (P[:, None] + torch.arange(n, device=pos.device)) % W
        gather = lambda buf: buf.gather(2, order[:, None, :, None].expand(-1, H, -1, Dh))
        cand_k, cand_v = gather(st["kraw"]), gather(st["v"])
        if kq > W:  # the rest leave within the step
            cand_k = torch.cat([cand_k, k_raw[:, :, : kq - W].to(cand_k.dtype)], 2)
            cand_v = torch.cat([cand_v, v[:, :, : kq - W].to(cand_v.dtype)], 2)
        return cand_k, cand_v, (P[:, None] - W + torch.arange(kq, device=pos.device)) >= 0

    def self_masked(self, kq: int) -> tuple:
        """Names of state tensors that a ``kq``-token ``attend_step`` given ``active`` keeps
        unchanged by itself for inactive rows (one-token steps: the ring)."""
        return ("k", "v", "kraw", "kpos") if kq == 1 else ()

    def attend_step(self, x: Heads, pos, st: ScopedState, freqs, active=None):
        """k new tokens at positions pos [B, k]: evict, read the memory, attend to window + memory,
        then store the tokens in the window. ``active`` [B]: rows that evict nothing when False (the
        caller restores their ring slots). Static shapes only (CUDA-graph safe)."""
        q_raw, k_raw, v, q, k = x.q_raw, x.k_raw, x.v, x.q, x.k
        B, H, kq, Dh = q.shape
        cand_k, cand_v, valid = self.candidates(st, k_raw, v, pos, active)
        read = self.virtual_step(q_raw, cand_k, cand_v, valid, pos, st, freqs)
        # the new token takes the slot of one no query here sees: attend to the ring itself
        if kq == 1:
            self.write_one(st, k_raw, v, k, pos, active, cand_k, cand_v)
            keys, vals, kpos = st["k"], st["v"], st["kpos"]
        else:
            keys, vals = (
                torch.cat([st["k"].to(k.dtype), k], 2),
                torch.cat([st["v"].to(v.dtype), v], 2),
            )
            kpos = torch.cat([st["kpos"], pos], 1)
        # the ring after a one-token write holds only this row's last W positions (or -1: empty)
        ok = (
            (kpos >= 0)[:, None, None, :]
            if kq == 1
            else visible(pos, kpos, "window", self.cfg.window, 0)[:, None]
        )
        # [B, H, k, K]
        s_r = q.float() @ keys.float().transpose(-1, -2) / math.sqrt(Dh) * self.inv_t
        s_r = s_r.masked_fill(~ok, float("-inf"))
        vmask = read.has[:, None].expand(B, H, kq)
        out, mass = mix(
            s_r,
            vals,
            vmask,
            self.alpha(q_raw),
            self.cfg.combine,
            **read.parts(),
        )
        self._record(mass, read)
        if kq > 1:
            ring_write(st["k"], st["v"], st["kpos"], k, v, pos, extra=((st["kraw"], k_raw),))
        return out.to(q.dtype)

    def write_one(self, st: ScopedState, k_raw, v, k, pos, active, cand_k, cand_v) -> None:
        """A one-token step's write into the ring (k_raw, v, k [B, H, 1, Dh] at pos [B, 1]); a row
        with ``active`` [B] False records an empty slot and keeps the token it would evict
        (cand_k, cand_v)."""
        if active is None:
            ring_write(st["k"], st["v"], st["kpos"], k, v, pos, extra=((st["kraw"], k_raw),))
            return
        on = active.view(-1, 1, 1, 1)
        ring_write(
            st["k"],
            st["v"],
            st["kpos"],
            k,
            torch.where(on, v.to(cand_v.dtype), cand_v),
            pos,
            extra=((st["kraw"], torch.where(on, k_raw.to(cand_k.dtype), cand_k)),),
            stored=torch.where(active[:, None], pos, -1),
        )

    # ---- diagnostics ----------------------------------------------------------------------
    def _record(self, mass, read):
        """Inside ``records.recording``: α per head, attention mass on the memory, and what the
        subclass adds, stored under this memory."""
        stats = records.recorder()
        if stats is None:
            return
        with torch.no_grad():
            sel = read.has[:, None].expand_as(mass)
            alpha = torch.sigmoid(self.gate).detach().cpu()
            if self.cfg.gate_per_token:  # the mean α per head over queries with a read
                on = sel.flatten(2).float()
                alpha = (
                    1 - (mass.flatten(2) * on).sum(-1).sum(0) / on.sum(-1).sum(0).clamp_min(1)
                ).cpu()
            stats[self] = {
                "alpha": alpha,
                "virtual_mass": mass[sel].mean().item() if sel.any() else float("nan"),
                "read": {n: x.detach() for n, x in read.parts().items() if n != "scores"},
                **self.extra_stats(read, sel),
            }

    def extra_stats(self, read, sel) -> dict:
        return {}
