"""``pooled``: evicted tokens averaged into M slots (the fixed-compression baseline).

Evicted token p (position within its document) joins slot p mod M; slot m offers one virtual
key/value, the mean of its keys (before RoPE) and values. Its score is ⟨q, k̄_m⟩/(t√Dh) + log n_m
(1/t: YaRN's temperature, 1 without), as if the slot's n_m tokens all had the mean key, so a
softmax over window and slots stays calibrated. Empty slots are masked.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from ..ops.segments import pack, row_of, segment_rows
from ..state import ScopedState
from .evicting import EvictingMemory, VirtualRead


class PooledMemory(EvictingMemory):
    def _read(self, q_raw, sum_k, sum_v, count):
        """q_raw [B, H, Q, Dh]; sums [B, H, Q, M, Dh]; count [B, Q, M] -> the read."""
        n = count[:, None, ..., None].to(sum_k.dtype)  # [B, 1, Q, M, 1]
        mean_k, mean_v = sum_k / n.clamp_min(1), sum_v / n.clamp_min(1)
        s = torch.einsum("bhqd,bhqmd->bhqm", q_raw.float(), mean_k.float())  # [B, H, Q, M]
        s = s / math.sqrt(q_raw.shape[-1]) * self.inv_t
        s = s + torch.log(n[..., 0].float().clamp_min(1)).expand_as(s)
        empty = (count == 0)[:, None].expand_as(s)
        return VirtualRead(
            has=(count > 0).any(-1), scores=s.masked_fill(empty, float("-inf")), values=mean_v
        )

    def _slots(self, pos, M):
        return F.one_hot(pos % M, M)  # [.., T, M]

    def virtual_parallel(self, q_raw, k_raw, v, pos, seg, freqs) -> VirtualRead:
        """Prefix sums per document and slot; query t reads the prefix up to t - W."""
        B, H, T, Dh = q_raw.shape
        W, M = self.cfg.window, self.cfg.num_virtual
        r, rows, L = segment_rows(pos, seg)
        local = torch.arange(L, device=pos.device)
        onehot = self._slots(local, M).to(torch.promote_types(k_raw.dtype, torch.float32))  # [L, M]

        def prefix(x):  # [B, H, T, Dh] -> [rows, L, H, M, Dh]: sums over p <= index, by slot
            xp = pack(x.transpose(1, 2).to(onehot.dtype), r, pos, rows, L)  # [rows, L, H, Dh]
            return torch.cumsum(xp[:, :, :, None] * onehot[None, :, None, :, None], dim=1)

        sk, sv = prefix(k_raw), prefix(v)
        real = pack(torch.ones_like(pos, dtype=onehot.dtype), r, pos, rows, L)  # [rows, L]
        cnt = torch.cumsum(real[..., None] * onehot, dim=1)  # [rows, L, M]
        idx = pos - W  # the last evicted position for each query
        ok = idx >= 0
        j, r = idx.clamp_min(0), row_of(r, pos)
        gather = lambda x: torch.where(ok[..., None, None, None], x[r, j], 0.0).permute(
            0, 2, 1, 3, 4
        )
        count = torch.where(ok[..., None], cnt[r, j], 0.0)  # [B, T, M]
        return self._read(q_raw, gather(sk), gather(sv), count)

    def init_memory(self, st: ScopedState, B: int, device) -> None:
        H, Dh, M = self.num_heads, self.head_dim, self.cfg.num_virtual
        f = torch.promote_types(self.gate.dtype, torch.float32)
        st.add("sum_k", torch.zeros(B, H, M, Dh, device=device, dtype=f), 0.0)
        st.add("sum_v", torch.zeros(B, H, M, Dh, device=device, dtype=f), 0.0)
        st.add("count", torch.zeros(B, M, device=device, dtype=f), 0.0)

    def virtual_step(
        self, q_raw, cand_k, cand_v, valid, pos, st: ScopedState, freqs
    ) -> VirtualRead:
        M = self.cfg.num_virtual
        W = self.cfg.window
        # [B, k, M]
        slot = self._slots((pos - W).clamp_min(0), M).to(st["sum_k"].dtype) * valid[..., None]
        # [B, H, k, M, Dh]
        ck = torch.cumsum(cand_k.to(slot.dtype)[:, :, :, None] * slot[:, None, :, :, None], 2)
        cv = torch.cumsum(cand_v.to(slot.dtype)[:, :, :, None] * slot[:, None, :, :, None], 2)
        cc = torch.cumsum(slot, 1)  # [B, k, M]
        read = self._read(
            q_raw,
            st["sum_k"][:, :, None] + ck,
            st["sum_v"][:, :, None] + cv,
            st["count"][:, None] + cc,
        )
        st["sum_k"].add_(ck[:, :, -1])
        st["sum_v"].add_(cv[:, :, -1])
        st["count"].add_(cc[:, -1])
        return read
