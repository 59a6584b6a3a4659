"""The TTT cache (spec 003, DESIGN section 4): an exact window plus a compressor of evicted tokens.

Per attention layer and head: a ring of the last W tokens (keys after RoPE, raw keys, values),
and a compressor f_θ (ops/ttt_cache.py) that learns every evicted (key, value) pair in
mini-batches of b tokens. M virtual tokens are read from its state with learned probes p_m:
    V_m = f_θ(p̂_m),  K_m = key_m + V_m A   (A starts at zero)
A query at position t (within its document) sees the state after floor(max(t - W + 1, 0) / b)
updates: the parallel path computes exactly that, and streaming reaches it by updating whenever
a block of evicted tokens completes.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..config import ModelConfig
from ..ops.rope import apply_rope
from ..ops.segments import pack, segment_rows
from ..ops.ttt_cache import compress_scan, compressor
from ..state import ScopedState
from .evicting import EvictingMemory


class TTTCacheMemory(EvictingMemory):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        mc = self.cfg
        H, Dh, M = cfg.num_heads, cfg.head_dim, mc.num_virtual
        m = mc.compressor_hidden or 2 * Dh
        self.w1_init = nn.Parameter(torch.randn(H, Dh, m) / math.sqrt(Dh))
        if mc.cold_start == "zero":  # the state starts with a zero output layer (never both layers)
            self.register_buffer("w2_init", torch.zeros(H, m, Dh))
        else:
            self.w2_init = nn.Parameter(torch.randn(H, m, Dh) / math.sqrt(m))
        self.lr_w = nn.Parameter(torch.zeros(H, Dh))  # η_t = inner_lr σ(k̂_t·lr_w + lr_b) / b
        self.lr_b = nn.Parameter(torch.zeros(H))
        self.probes = nn.Parameter(torch.randn(H, M, Dh))
        self.vkeys = nn.Parameter(torch.randn(H, M, Dh) / math.sqrt(Dh))
        self.vkey_proj = nn.Parameter(torch.zeros(H, Dh, Dh))
        self.recency = nn.Parameter(torch.full((H,), math.log(math.expm1(0.1))))  # position "decay"
        self.register_buffer("offsets", mc.window * (1.0 + torch.arange(M)), persistent=False)
        self.want_aux, self.aux = False, None  # the reconstruction loss of training stage 1

    # ---- compressor ---------------------------------------------------------------------
    def _read(self, freqs, rows: int):
        """read(w1 [G, S, Dh, m], w2 [G, S, m, Dh]) -> (K, V) [G, S, M, Dh] for G = rows * H groups."""
        probes = F.normalize(self.probes, dim=-1).repeat(rows, 1, 1)[:, None]  # [G, 1, M, Dh]
        vkeys, proj = self.vkeys.repeat(rows, 1, 1)[:, None], self.vkey_proj.repeat(rows, 1, 1)[:, None]

        def read(w1, w2):
            v = compressor(w1, w2, probes.to(w1.dtype))  # [G, S, M, Dh]
            k = vkeys.to(v.dtype) + v @ proj.to(v.dtype)
            if self.cfg.virtual_position == "relative":  # as if key m sat offsets[m] tokens back
                G, S, M, Dh = k.shape
                off = -self.offsets.to(k.device).expand(G * S, M)
                k = apply_rope(k.reshape(G * S, 1, M, Dh), off, freqs).view(G, S, M, Dh)
            return k, v
        return read

    def _eta(self, keys: torch.Tensor, rows: int) -> torch.Tensor:
        """Per-token step size, bounded by inner_lr / b. keys [G, N, b, Dh] normalised -> [G, N, b]."""
        w, b = self.lr_w.repeat(rows, 1).to(keys.dtype), self.lr_b.repeat(rows).to(keys.dtype)
        logits = torch.einsum("gnbd,gd->gnb", keys, w) + b[:, None, None]
        return self.cfg.inner_lr * torch.sigmoid(logits) / self.cfg.block

    def _scan(self, d1, d2, mom1, mom2, keys, vals, apply, freqs, rows, valid=None):
        """keys raw [G, N, b, Dh] -> compress_scan outputs (fp32 or float64)."""
        dt = torch.promote_types(keys.dtype, torch.float32)
        keys, vals = F.normalize(keys.to(dt), dim=-1), vals.to(dt)
        eta = self._eta(keys, rows) * (apply[..., None] if valid is None else valid)
        init1 = self.w1_init.to(dt).repeat(rows, 1, 1)
        init2 = self.w2_init.to(dt).repeat(rows, 1, 1)
        mc = self.cfg
        with torch.autocast(keys.device.type, enabled=False):
            return compress_scan(d1, d2, mom1, mom2, init1, init2, keys, vals, eta, apply, self._read(freqs, rows),
                                 decay=mc.decay, momentum=mc.momentum, max_norm=mc.max_state_norm, bptt=mc.bptt,
                                 naive=self.naive, record=self.record, check=self.name if mc.check_finite else None,
                                 compiled=mc.compile_scan)

    def _scores(self, q_raw, kv):
        """q_raw [B, H, ..., Q, Dh], kv [B, H, ..., Q, M, Dh] -> scores [B, H, ..., Q, M]."""
        s = torch.einsum("...qd,...qmd->...qm", q_raw.float(), kv.float()) / math.sqrt(q_raw.shape[-1])
        s = s * self.inv_t  # YaRN temperature, as on the window logits
        if self.cfg.virtual_position == "decay":  # token m is weighted by exp(-γ m) (spec option B)
            gamma = F.softplus(self.recency).view(1, -1, *([1] * (s.dim() - 2)))
            s = s - gamma * torch.arange(s.shape[-1], device=s.device, dtype=s.dtype)
        return s

    def _read_dict(self, q_raw, kv, vv, has, losses):
        return {"scores": self._scores(q_raw, kv), "values": vv, "has": has, "keys": kv, "losses": losses}

    # ---- parallel ---------------------------------------------------------------------------
    def virtual_parallel(self, q_raw, k_raw, v, pos, seg, freqs) -> dict:
        """The evicted tokens of each document, in blocks of b from its position 0; a query at
        position t reads the state after floor(max(t - W + 1, 0) / b) updates."""
        B, H, T, Dh = q_raw.shape
        W, b, m = self.cfg.window, self.cfg.block, self.w1_init.shape[-1]
        r, rows, L = segment_rows(pos, seg)
        N = max(L - W, 0) // b

        def blocks(x):  # [B, H, T, Dh] -> [rows * H, N, b, Dh]
            xp = pack(x.transpose(1, 2), r, pos, rows, L)[:, :N * b]  # [rows, N b, H, Dh]
            return xp.reshape(rows, N, b, H, Dh).permute(0, 3, 1, 2, 4).reshape(rows * H, N, b, Dh)

        dt = torch.promote_types(q_raw.dtype, torch.float32)
        G = rows * H
        d = (q_raw.new_zeros(G, Dh, m, dtype=dt), q_raw.new_zeros(G, m, Dh, dtype=dt))
        mom = d if self.cfg.momentum else (None, None)
        (kv, vv), _, losses = self._scan(*d, *mom, blocks(k_raw), blocks(v), q_raw.new_ones(G, N, dtype=dt),
                                         freqs, rows)
        if self.want_aux:
            self.aux = self._reconstruction(blocks(k_raw), blocks(v), kv, vv)
        n_q = (pos - W + 1).clamp_min(0) // b  # [B, T]

        def per_query(x):  # [rows * H, N + 1, M, Dh] -> [B, H, T, M, Dh]
            return x.view(rows, H, *x.shape[1:]).transpose(1, 2)[r, n_q].permute(0, 2, 1, 3, 4)

        has = n_q > 0 if self.cfg.cold_start == "wait" else torch.ones_like(n_q, dtype=torch.bool)
        return self._read_dict(q_raw, per_query(kv), per_query(vv), has, losses)

    def _reconstruction(self, keys, vals, kv, vv):
        """Spec stage 1: after absorbing block n, its keys (as queries into the virtual tokens)
        should recover its values. keys/vals [G, N, b, Dh]; reads [G, N + 1, M, Dh] -> mean ‖v̂ - v‖²."""
        if keys.shape[1] == 0:
            raise ValueError("the reconstruction loss needs sequences longer than window + block")
        q = F.normalize(keys.float(), dim=-1)
        att = torch.softmax(q @ kv[:, 1:].float().transpose(-1, -2) * math.sqrt(q.shape[-1]), -1)  # [G, N, b, M]
        return (att @ vv[:, 1:].float() - vals.float()).pow(2).sum(-1).mean()

    # ---- streaming ----------------------------------------------------------------------------
    def init_memory(self, st: ScopedState, B: int, device) -> None:
        H, Dh, b, m = self.num_heads, self.head_dim, self.cfg.block, self.w1_init.shape[-1]
        f32 = torch.promote_types(self.w1_init.dtype, torch.float32)
        names = ("d1", "d2", "mom1", "mom2") if self.cfg.momentum else ("d1", "d2")
        for name in names:  # compressor state as offsets from the (trained) initial state
            shape = (B, H, Dh, m) if name.endswith("1") else (B, H, m, Dh)
            st.add(name, torch.zeros(*shape, device=device, dtype=f32), 0.0)
        st.add("ek", torch.zeros(B, H, b, Dh, device=device, dtype=f32), 0.0)  # evicted, open block
        st.add("ev", torch.zeros(B, H, b, Dh, device=device, dtype=f32), 0.0)
        st.add("ecount", torch.zeros(B, dtype=torch.long, device=device), 0)
        st.add("updates", torch.zeros(B, dtype=torch.long, device=device), 0)

    def virtual_step(self, q_raw, cand_k, cand_v, valid, pos, st: ScopedState, freqs) -> dict:
        """Lay the open block and the step's evicted tokens out from the block start, scan the
        blocks that complete (the others are masked), and give each query the state after the
        blocks completed by its own eviction."""
        B, H, kq, Dh = q_raw.shape
        b = self.cfg.block
        ar = torch.arange(kq, device=q_raw.device)
        nvalid = valid.sum(1)
        ecount = st["ecount"]
        NB = -(-(b - 1 + kq) // b)  # blocks the open block (< b tokens) and k new ones can fill
        L = NB * b
        # L slots of blocks, b zero slots (the next open block when all complete), one spill slot
        slot = torch.where(valid, ecount[:, None] + ar - (kq - nvalid)[:, None], L + b)
        idx = slot[:, None, :, None].expand(-1, H, -1, Dh)
        pad = (lambda buf: torch.cat([buf, buf.new_zeros(B, H, L + 1, Dh)], 2))  # [B, H, L + b + 1, Dh]
        lay_k = pad(st["ek"]).scatter(2, idx, cand_k.to(st["ek"].dtype))
        lay_v = pad(st["ev"]).scatter(2, idx, cand_v.to(st["ev"].dtype))
        total = ecount + nvalid  # evicted tokens in the open blocks after this step
        apply = (torch.arange(NB, device=q_raw.device) + 1) * b <= total[:, None]  # [B, NB]
        tok_ok = (torch.arange(L, device=q_raw.device) < total[:, None]).view(B, NB, b) & apply[..., None]
        G = B * H
        rows = (lambda x: x[:, :, :L].reshape(G, NB, b, Dh))
        per_g = (lambda x: x[:, None].expand(B, H, *x.shape[1:]).reshape(G, *x.shape[1:]))
        mom = (st["mom1"].flatten(0, 1), st["mom2"].flatten(0, 1)) if self.cfg.momentum else (None, None)
        (kv, vv), (d1, d2, m1, m2), losses = self._scan(
            st["d1"].flatten(0, 1), st["d2"].flatten(0, 1), *mom, rows(lay_k), rows(lay_v),
            per_g(apply.to(lay_k.dtype)), freqs, B, valid=per_g(tok_ok.to(lay_k.dtype)))
        n_q = (ecount[:, None] + (ar + 1 - (kq - nvalid)[:, None]).clamp_min(0)) // b  # [B, k]
        sel = (lambda x: x.view(B, H, NB + 1, *x.shape[2:]).gather(
            2, n_q[:, None, :, None, None].expand(-1, H, -1, *x.shape[2:])))  # [B, H, k, M, Dh]
        has = (st["updates"][:, None] + n_q > 0) if self.cfg.cold_start == "wait" else torch.ones_like(valid)
        read = self._read_dict(q_raw, sel(kv), sel(vv), has, losses)
        # store the compressor state, the open block and the counters
        st["d1"].copy_(d1.view_as(st["d1"]))
        st["d2"].copy_(d2.view_as(st["d2"]))
        if self.cfg.momentum:
            st["mom1"].copy_(m1.view_as(st["mom1"]))
            st["mom2"].copy_(m2.view_as(st["mom2"]))
        keep = ((total // b) * b)[:, None] + torch.arange(b, device=q_raw.device)  # [B, b]
        kidx = keep[:, None, :, None].expand(-1, H, -1, Dh)
        st["ek"].copy_(lay_k.gather(2, kidx))
        st["ev"].copy_(lay_v.gather(2, kidx))
        st["updates"].add_(total // b)
        ecount.copy_(total % b)
        return read

    def extra_stats(self, read, sel) -> dict:
        """Virtual-key cosine similarity (pairwise, mean) and the inner losses before/after updates."""
        kn = F.normalize(read["keys"].float(), dim=-1)  # [B, H, ..., M, Dh]
        cos = kn @ kn.transpose(-1, -2)
        M = cos.shape[-1]
        off = (cos.sum((-1, -2)) - cos.diagonal(dim1=-2, dim2=-1).sum(-1)) / max(M * (M - 1), 1)
        before, after = read["losses"]
        return {"virtual_key_cos": off[sel].mean().item() if sel.any() else float("nan"),
                "inner_loss_before": before.detach().cpu() if before is not None else None,
                "inner_loss_after": after.detach().cpu() if after is not None else None}
