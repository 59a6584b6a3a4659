"""``infini``: Infini-attention's compressive memory (Munkhdalai et al. 2024), fed by evicted
tokens.

Per head, with σ = ELU + 1 and keys/queries before RoPE:
    S = Σ_p σ(k_p)ᵀ v_p,  z = Σ_p σ(k_p)          over evicted tokens p <= t - W
    A_mem(q_t) = σ(q_t) S / (σ(q_t) · z)          (the paper's linear retrieval, eq. 3)
    out = α · A_window + (1 - α) · A_mem,  α = σ(β) per head   (eq. 6; ``combine`` is not used)
The parallel path computes the sums by chunks of W tokens (prefix states plus a masked product
with the previous chunk); streaming adds the step's evicted tokens to S and z. The memory read
has no softmax logits, so YaRN's temperature (rope_scale) reaches only the window's logits.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..ops.banded import band
from ..ops.segments import pack, segment_rows, unpack
from ..state import ScopedState
from .evicting import EvictingMemory, VirtualRead


def sigma(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


class InfiniMemory(EvictingMemory):
    def _read(self, num, den, has):
        return VirtualRead(has=has, out=num / den.clamp_min(1e-6)[..., None])

    def virtual_parallel(self, q_raw, k_raw, v, pos, seg, freqs) -> VirtualRead:
        B, H, T, Dh = q_raw.shape
        W = self.cfg.window
        r, rows, L = segment_rows(pos, seg, W)
        f = torch.promote_types(q_raw.dtype, torch.float32)
        # per document rows: [rows, H, L, Dh]
        packed = lambda x: pack(x.transpose(1, 2).to(f), r, pos, rows, L).transpose(1, 2)
        sq, sk, vv = sigma(packed(q_raw)), sigma(packed(k_raw)), packed(v)
        # [rows, 1, L, 1]
        real = pack(torch.ones_like(pos, dtype=f), r, pos, rows, L)[:, None, :, None]
        sk = sk * real  # padding contributes nothing
        NC = L // W
        kc, vc = sk.view(rows, H, NC, W, Dh), vv.view(rows, H, NC, W, Dh)
        chunk_s = kc.transpose(-1, -2) @ vc  # [rows, H, NC, Dh, Dh]
        chunk_z = kc.sum(-2)  # [rows, H, NC, Dh]
        # state before chunk c - 1: all chunks <= c - 2
        pre_s = F.pad(torch.cumsum(chunk_s, 2), (0, 0, 0, 0, 2, 0))[:, :, :NC]
        pre_z = F.pad(torch.cumsum(chunk_z, 2), (0, 0, 2, 0))[:, :, :NC]
        qc = sq.view(rows, H, NC, W, Dh)
        num = qc @ pre_s  # [rows, H, NC, W, Dh]
        den = (qc * pre_z[..., None, :]).sum(-1)
        # the previous chunk, up to t - W: key index j of chunk c - 1 visible to query i iff j <= i
        kb, vb = band(sk, W)[..., :W, :], band(vv, W)[..., :W, :]  # [rows, H, NC, W, Dh]
        a = (qc @ kb.transpose(-1, -2)).tril()  # [rows, H, NC, W(q), W(k)]
        num, den = num + a @ vb, den + a.sum(-1)
        num = unpack(num.flatten(2, 3).transpose(1, 2), r, pos).transpose(1, 2)  # [B, H, T, Dh]
        den = unpack(den.flatten(2, 3).transpose(1, 2), r, pos).transpose(1, 2)  # [B, H, T]
        return self._read(num, den, pos >= W)

    def init_memory(self, st: ScopedState, B: int, device) -> None:
        H, Dh = self.num_heads, self.head_dim
        f = torch.promote_types(self.gate.dtype, torch.float32)
        st.add("mem_s", torch.zeros(B, H, Dh, Dh, device=device, dtype=f), 0.0)
        st.add("mem_z", torch.zeros(B, H, Dh, device=device, dtype=f), 0.0)

    def virtual_step(
        self, q_raw, cand_k, cand_v, valid, pos, st: ScopedState, freqs
    ) -> VirtualRead:
        f = st["mem_s"].dtype
        sq = sigma(q_raw.to(f))
        sk = sigma(cand_k.to(f)) * valid[:, None, :, None]  # [B, H, k, Dh]
        cv = cand_v.to(f)
        a = (sq @ sk.transpose(-1, -2)).tril()  # query j sees candidates i <= j
        num = sq @ st["mem_s"] + a @ cv
        den = (sq * st["mem_z"][:, :, None]).sum(-1) + a.sum(-1)
        read = self._read(num, den, pos >= self.cfg.window)
        st["mem_s"].add_(sk.transpose(-1, -2) @ cv)
        st["mem_z"].add_(sk.sum(2))
        return read
