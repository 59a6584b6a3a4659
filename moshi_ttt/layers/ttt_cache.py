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
from ..ops.banded import band, chunked, mix
from ..ops.masks import visible
from ..ops.rope import apply_rope
from ..ops.segments import pack, segment_rows, unpack
from ..ops.ttt_cache import compress_scan, compressor
from ..state import ScopedState
from .memory import ring_write


class TTTCacheMemory(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg, mc = cfg.memory, cfg.memory
        H, Dh, M = cfg.num_heads, cfg.head_dim, mc.num_virtual
        m = mc.compressor_hidden or 2 * Dh
        self.naive, self.record, self.stats, self.name = False, False, {}, "ttt_cache"
        self.w1_init = nn.Parameter(torch.randn(H, Dh, m) / math.sqrt(Dh))
        w2 = torch.randn(H, m, Dh) / math.sqrt(m)
        if mc.cold_start == "zero":  # the state starts with a zero output layer (never both layers)
            self.register_buffer("w2_init", torch.zeros(H, m, Dh))
        else:
            self.w2_init = nn.Parameter(w2)
        self.lr_w = nn.Parameter(torch.zeros(H, Dh))  # η_t = inner_lr σ(k̂_t·lr_w + lr_b) / b
        self.lr_b = nn.Parameter(torch.zeros(H))
        self.probes = nn.Parameter(torch.randn(H, M, Dh))
        self.vkeys = nn.Parameter(torch.randn(H, M, Dh) / math.sqrt(Dh))
        self.vkey_proj = nn.Parameter(torch.zeros(H, Dh, Dh))
        self.gate = nn.Parameter(torch.zeros(H))  # α = σ(gate), combine "gate"
        self.recency = nn.Parameter(torch.full((H,), math.log(math.expm1(0.1))))  # position "decay"
        self.register_buffer("offsets", mc.window * (1.0 + torch.arange(M)), persistent=False)

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

    def _virtual_scores(self, q_raw, kv):
        """q_raw [B, H, ..., Q, Dh], kv [B, H, ..., Q, M, Dh] -> scores [B, H, ..., Q, M]."""
        s = torch.einsum("...qd,...qmd->...qm", q_raw.float(), kv.float()) / math.sqrt(q_raw.shape[-1])
        if self.cfg.virtual_position == "decay":  # token m is weighted by exp(-γ m) (spec option B)
            gamma = F.softplus(self.recency).view(1, -1, *([1] * (s.dim() - 2)))
            s = s - gamma * torch.arange(s.shape[-1], device=s.device, dtype=s.dtype)
        return s

    def _gather_reads(self, reads, rows, H, r, n):
        """reads [rows * H, N + 1, M, Dh] -> per query [B, H, T, M, Dh] at row r, read index n ([B, T])."""
        x = reads.view(rows, H, *reads.shape[1:]).transpose(1, 2)  # [rows, N + 1, H, M, Dh]
        return x[r, n].permute(0, 2, 1, 3, 4)

    # ---- parallel path --------------------------------------------------------------------
    def attend_parallel(self, q_raw, k_raw, v, q, k, pos, seg, freqs):
        """All [B, H, T, Dh]; pos/seg [B, T] (seg None: one document per row) -> out [B, H, T, Dh]."""
        B, H, T, Dh = q.shape
        W, b, m = self.cfg.window, self.cfg.block, self.w1_init.shape[-1]
        seg = seg if seg is not None else torch.zeros_like(pos)
        # compressor: the evicted tokens of each document, in blocks of b from its position 0
        r, rows, L = segment_rows(pos, seg)
        N = max(L - W, 0) // b

        def blocks(x):  # [B, H, T, Dh] -> [rows * H, N, b, Dh]
            xp = pack(x.transpose(1, 2), r, pos, rows, L)[:, :N * b]  # [rows, N b, H, Dh]
            return xp.reshape(rows, N, b, H, Dh).permute(0, 3, 1, 2, 4).reshape(rows * H, N, b, Dh)

        dt = torch.promote_types(q.dtype, torch.float32)
        G = rows * H
        d = (q.new_zeros(G, Dh, m, dtype=dt), q.new_zeros(G, m, Dh, dtype=dt))
        mom = d if self.cfg.momentum else (None, None)
        (kv, vv), _, losses = self._scan(*d, *mom, blocks(k_raw), blocks(v), q.new_ones(G, N, dtype=dt), freqs, rows)
        n_q = (pos - W + 1).clamp_min(0) // b  # [B, T] updates visible to each query
        kv, vv = self._gather_reads(kv, rows, H, r, n_q), self._gather_reads(vv, rows, H, r, n_q)
        has_v = n_q > 0 if self.cfg.cold_start == "wait" else torch.ones_like(n_q, dtype=torch.bool)
        # recent: chunks of W queries against the 2W keys around them, masked by positions
        pq, pk = chunked(pos, W, -1), band(pos, W, -1)  # [B, NC, W], [B, NC, 2W]
        sq, sk = chunked(seg, W, -2), band(seg, W, -3)
        ok = visible(pq.flatten(0, 1), pk.flatten(0, 1), "window", W, 0).view(*pq.shape, pk.shape[-1])
        ok = (ok & (sq[..., None] == sk[..., None, :]))[:, None]  # [B, 1, NC, W, 2W]
        s_r = (chunked(q, W).float() @ band(k, W).float().transpose(-1, -2)) / math.sqrt(Dh)
        s_r = torch.where(ok.any(-1, keepdim=True), s_r.masked_fill(~ok, float("-inf")), 0.0)  # pad rows: finite
        s_v = self._virtual_scores(chunked(q_raw, W), chunked_m(kv, W))
        vmask = chunked(has_v.float(), W)[:, None].bool().expand(B, H, -1, -1)  # [B, H, NC, W]
        gate = torch.sigmoid(self.gate).view(1, H, 1, 1).expand_as(vmask)
        out, mass = mix(s_r, band(v, W), s_v, chunked_m(vv, W), vmask, self.cfg.combine, gate)
        self._record(mass.flatten(2)[..., :T], kv, losses, has_v)
        return out.flatten(2, 3)[:, :, :T].to(q.dtype)

    # ---- streaming path -------------------------------------------------------------------
    def init(self, st: ScopedState, B: int, H: int, Dh: int, device, dtype) -> None:
        W, b, m = self.cfg.window, self.cfg.block, self.w1_init.shape[-1]
        f32 = torch.promote_types(self.w1_init.dtype, torch.float32)
        for name in ("k", "v", "kraw"):  # the window: keys after RoPE, values, keys before RoPE
            st.add(name, torch.zeros(B, H, W, Dh, device=device, dtype=dtype), 0.0)
        st.add("kpos", torch.full((B, W), -1, dtype=torch.long, device=device), -1)
        names = ("d1", "d2", "mom1", "mom2") if self.cfg.momentum else ("d1", "d2")
        for name in names:  # compressor state as offsets from the (trained) initial state
            shape = (B, H, Dh, m) if name.endswith("1") else (B, H, m, Dh)
            st.add(name, torch.zeros(*shape, device=device, dtype=f32), 0.0)
        st.add("ek", torch.zeros(B, H, b, Dh, device=device, dtype=f32), 0.0)  # evicted, open block
        st.add("ev", torch.zeros(B, H, b, Dh, device=device, dtype=f32), 0.0)
        st.add("ecount", torch.zeros(B, dtype=torch.long, device=device), 0)
        st.add("updates", torch.zeros(B, dtype=torch.long, device=device), 0)

    def attend_step(self, q_raw, k_raw, v, q, k, pos, st: ScopedState, freqs):
        """k new tokens at positions pos [B, k]: evict from the window, update the compressor on
        every completed block, attend to window + virtual tokens, then store. Static shapes only."""
        B, H, kq, Dh = q.shape
        W, b = self.cfg.window, self.cfg.block
        ar = torch.arange(kq, device=q.device)
        # tokens leaving the window in this step: positions P - W + j, j < k (valid when >= 0)
        P = pos[:, 0]
        order = (P[:, None] - W + torch.arange(W, device=q.device)) % W  # ring slots by position
        gather = (lambda buf: buf.gather(2, order[:, None, :, None].expand(-1, H, -1, Dh)))
        cand_k = torch.cat([gather(st["kraw"]), k_raw.to(st["kraw"].dtype)], 2)[:, :, :kq]  # [B, H, k, Dh]
        cand_v = torch.cat([gather(st["v"]), v.to(st["v"].dtype)], 2)[:, :, :kq]
        valid = (P[:, None] - W + ar) >= 0  # [B, k]: a suffix of the candidates
        nvalid = valid.sum(1)
        ecount = st["ecount"]
        NB = -(-(b - 1 + kq) // b)  # blocks the open block (< b tokens) and k new ones can fill
        L = NB * b
        # layout from the open block's start: L slots of blocks, b zero slots (the next open block
        # when all complete), then a spill slot for the candidates that are not evicted yet
        slot = torch.where(valid, ecount[:, None] + ar - (kq - nvalid)[:, None], L + b)
        idx = slot[:, None, :, None].expand(-1, H, -1, Dh)
        pad = (lambda buf: torch.cat([buf, buf.new_zeros(B, H, L + 1, Dh)], 2))  # [B, H, L + b + 1, Dh]
        lay_k = pad(st["ek"]).scatter(2, idx, cand_k.to(st["ek"].dtype))
        lay_v = pad(st["ev"]).scatter(2, idx, cand_v.to(st["ev"].dtype))
        total = ecount + nvalid  # evicted tokens in the open blocks after this step
        apply = ((torch.arange(NB, device=q.device) + 1) * b <= total[:, None])  # [B, NB]
        tok_ok = (torch.arange(L, device=q.device) < total[:, None]).view(B, NB, b) & apply[..., None]
        G = B * H
        rows = (lambda x: x[:, :, :L].reshape(G, NB, b, Dh))
        per_g = (lambda x: x[:, None].expand(B, H, *x.shape[1:]).reshape(G, *x.shape[1:]))
        mom = (st["mom1"].flatten(0, 1), st["mom2"].flatten(0, 1)) if self.cfg.momentum else (None, None)
        (kv, vv), (d1, d2, m1, m2), losses = self._scan(
            st["d1"].flatten(0, 1), st["d2"].flatten(0, 1), *mom, rows(lay_k), rows(lay_v),
            per_g(apply.to(lay_k.dtype)), freqs, B, valid=per_g(tok_ok.to(lay_k.dtype)))
        # each query sees the state after the blocks completed up to its own eviction
        n_q = (ecount[:, None] + (ar + 1 - (kq - nvalid)[:, None]).clamp_min(0)) // b  # [B, k]
        sel = (lambda x: x.view(B, H, NB + 1, *x.shape[2:]).gather(
            2, n_q[:, None, :, None, None].expand(-1, H, -1, *x.shape[2:])))  # [B, H, k, M, Dh]
        kvq, vvq = sel(kv), sel(vv)
        has_v = (st["updates"][:, None] + n_q > 0) if self.cfg.cold_start == "wait" else torch.ones_like(valid)
        # recent: the window before this step plus the step's own tokens
        keys = torch.cat([st["k"].to(k.dtype), k], 2)
        vals = torch.cat([st["v"].to(v.dtype), v], 2)
        ok = visible(pos, torch.cat([st["kpos"], pos], 1), "window", W, 0)[:, None]  # [B, 1, k, W + k]
        s_r = (q.float() @ keys.float().transpose(-1, -2) / math.sqrt(Dh)).masked_fill(~ok, float("-inf"))
        s_v = self._virtual_scores(q_raw, kvq)
        vmask = has_v[:, None].expand(B, H, kq)
        gate = torch.sigmoid(self.gate).view(1, H, 1).expand_as(vmask)
        out, mass = mix(s_r, vals, s_v, vvq, vmask, self.cfg.combine, gate)
        self._record(mass, kvq, losses, has_v)
        # store: compressor state, the open block, counters, the window
        st["d1"].copy_(d1.view_as(st["d1"]))
        st["d2"].copy_(d2.view_as(st["d2"]))
        if self.cfg.momentum:
            st["mom1"].copy_(m1.view_as(st["mom1"]))
            st["mom2"].copy_(m2.view_as(st["mom2"]))
        keep = ((total // b) * b)[:, None] + torch.arange(b, device=q.device)  # [B, b]
        kidx = keep[:, None, :, None].expand(-1, H, -1, Dh)
        st["ek"].copy_(lay_k.gather(2, kidx))
        st["ev"].copy_(lay_v.gather(2, kidx))
        st["updates"].add_(total // b)
        ecount.copy_(total % b)
        ring_write(st["k"], st["v"], st["kpos"], k, v, pos, extra=((st["kraw"], k_raw),))
        return out.to(q.dtype)

    def _record(self, mass, kv, losses, vmask):
        if not self.record:
            return
        with torch.no_grad():
            kn = F.normalize(kv.float(), dim=-1)  # [B, H, T, M, Dh]
            cos = kn @ kn.transpose(-1, -2)
            M = cos.shape[-1]
            off = (cos.sum((-1, -2)) - cos.diagonal(dim1=-2, dim2=-1).sum(-1)) / max(M * (M - 1), 1)
            sel = vmask[:, None].expand_as(mass)
            self.stats = {"alpha": torch.sigmoid(self.gate).detach().cpu(),
                          "virtual_mass": mass[sel].mean().item() if sel.any() else float("nan"),
                          "virtual_key_cos": off[sel].mean().item() if sel.any() else float("nan"),
                          "inner_loss_before": losses[0].detach().cpu() if losses[0] is not None else None,
                          "inner_loss_after": losses[1].detach().cpu() if losses[1] is not None else None}


def chunked_m(x: torch.Tensor, window: int) -> torch.Tensor:
    """[B, H, T, M, D] -> [B, H, NC, W, M, D] (zero padding)."""
    pad = -x.shape[2] % window
    return F.pad(x, (0, 0, 0, 0, 0, pad)).unflatten(2, (-1, window))
