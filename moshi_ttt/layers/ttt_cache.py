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
        self.hc = 1 if mc.compressor_shared else H  # compressors per layer (shared: one for all heads)
        dims = [Dh] + [m] * (mc.compressor_depth - 1) + [Dh]
        for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:]), 1):
            init = torch.randn(self.hc, din, dout) / math.sqrt(din)
            if i == mc.compressor_depth and mc.cold_start == "zero":  # the state starts with a zero
                self.register_buffer(f"w{i}_init", torch.zeros_like(init))  # output layer (never all)
            else:
                setattr(self, f"w{i}_init", nn.Parameter(init))
        self.lr_w = nn.Parameter(torch.zeros(H, Dh))  # η_t = inner_lr σ(k̂_t·lr_w + lr_b) / b
        self.lr_b = nn.Parameter(torch.zeros(H))
        self.probes = nn.Parameter(torch.randn(H, M, Dh))
        self.vkeys = nn.Parameter(torch.randn(H, M, Dh) / math.sqrt(Dh))
        self.vkey_proj = nn.Parameter(torch.zeros(H, Dh, Dh))
        self.recency = nn.Parameter(torch.full((H,), math.log(math.expm1(0.1))))  # position "decay"
        self.register_buffer("offsets", mc.window * (1.0 + torch.arange(M)), persistent=False)
        self.want_aux, self.aux = False, None  # the reconstruction loss of training stage 1

    # ---- compressor ---------------------------------------------------------------------
    def inits(self) -> tuple:
        """The compressor's initial state (W1, ..., W_L), each [hc, d_in, d_out]."""
        return tuple(getattr(self, f"w{i}_init") for i in range(1, self.cfg.compressor_depth + 1))

    def _per_head(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """Shared compressor: [rows, S, H * M, Dh] -> [rows * H, S, M, Dh] (per head: unchanged)."""
        if self.hc == self.num_heads:
            return x
        S, Dh = x.shape[1], x.shape[-1]
        return x.view(rows, S, self.num_heads, -1, Dh).transpose(1, 2).reshape(rows * self.num_heads, S, -1, Dh)

    def _read(self, freqs, rows: int):
        """read(states (W1, ..., W_L), each [rows * hc, S, d_in, d_out]) -> (K, V) [rows * H, S, M, Dh]."""
        Dh = self.probes.shape[-1]
        probes = F.normalize(self.probes, dim=-1).reshape(self.hc, -1, Dh).repeat(rows, 1, 1)[:, None]  # [G, 1, M', Dh]
        vkeys, proj = self.vkeys.repeat(rows, 1, 1)[:, None], self.vkey_proj.repeat(rows, 1, 1)[:, None]

        def read(states):
            v = self._per_head(compressor(states, probes.to(states[0].dtype)), rows)  # [rows * H, S, M, Dh]
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

    def _scan(self, ds, moms, keys, vals, apply, freqs, rows, valid=None):
        """Per head: keys raw, vals [rows * H, N, b, Dh], apply [rows * H, N], valid [rows * H, N, b];
        ds/moms per compressor [rows * hc, ...] -> compress_scan outputs (fp32 or float64). A shared
        compressor learns the block's tokens of all heads in one step (b H tokens, η / H each)."""
        dt = torch.promote_types(keys.dtype, torch.float32)
        keys, vals = F.normalize(keys.to(dt), dim=-1), vals.to(dt)
        eta = self._eta(keys, rows) * (apply[..., None] if valid is None else valid)
        if self.hc != self.num_heads:
            H = self.num_heads
            merge = (lambda x: x.view(rows, H, *x.shape[1:]).transpose(1, 2).reshape(rows, x.shape[1], -1, *x.shape[3:]))
            keys, vals, eta = merge(keys), merge(vals), merge(eta[..., None])[..., 0] / H  # [rows, N, H b, ...]
            apply = apply.view(rows, H, -1)[:, 0]
        inits = tuple(w.to(dt).repeat(rows, 1, 1) for w in self.inits())
        mc = self.cfg
        with torch.autocast(keys.device.type, enabled=False):
            return compress_scan(ds, moms, inits, keys, vals, eta, apply, self._read(freqs, rows),
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
        W, b = self.cfg.window, self.cfg.block
        r, rows, L = segment_rows(pos, seg)
        N = max(L - W, 0) // b

        def blocks(x):  # [B, H, T, Dh] -> [rows * H, N, b, Dh]
            xp = pack(x.transpose(1, 2), r, pos, rows, L)[:, :N * b]  # [rows, N b, H, Dh]
            return xp.reshape(rows, N, b, H, Dh).permute(0, 3, 1, 2, 4).reshape(rows * H, N, b, Dh)

        dt = torch.promote_types(q_raw.dtype, torch.float32)
        d = tuple(q_raw.new_zeros(rows * self.hc, *w.shape[1:], dtype=dt) for w in self.inits())
        (kv, vv), _, losses = self._scan(d, d if self.cfg.momentum else None, blocks(k_raw), blocks(v),
                                         q_raw.new_ones(rows * H, N, dtype=dt), freqs, rows)
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
    def state_names(self) -> tuple:
        """Compressor state offsets d1..dL (and momenta mom1..momL): [B, hc, d_in, d_out] each."""
        L = self.cfg.compressor_depth
        return tuple(f"{p}{i}" for p in (("d", "mom") if self.cfg.momentum else ("d",)) for i in range(1, L + 1))

    def init_memory(self, st: ScopedState, B: int, device) -> None:
        H, Dh, b = self.num_heads, self.head_dim, self.cfg.block
        inits = self.inits()
        f32 = torch.promote_types(inits[0].dtype, torch.float32)
        for name in self.state_names():  # compressor state as offsets from the (trained) initial state
            st.add(name, torch.zeros(B, *inits[int(name[-1]) - 1].shape, device=device, dtype=f32), 0.0)
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
        depth = self.cfg.compressor_depth
        flat = (lambda p: tuple(st[f"{p}{i}"].flatten(0, 1) for i in range(1, depth + 1)))
        (kv, vv), (ds, moms), losses = self._scan(
            flat("d"), flat("mom") if self.cfg.momentum else None, rows(lay_k), rows(lay_v),
            per_g(apply.to(lay_k.dtype)), freqs, B, valid=per_g(tok_ok.to(lay_k.dtype)))
        n_q = (ecount[:, None] + (ar + 1 - (kq - nvalid)[:, None]).clamp_min(0)) // b  # [B, k]
        sel = (lambda x: x.view(B, H, NB + 1, *x.shape[2:]).gather(
            2, n_q[:, None, :, None, None].expand(-1, H, -1, *x.shape[2:])))  # [B, H, k, M, Dh]
        has = (st["updates"][:, None] + n_q > 0) if self.cfg.cold_start == "wait" else torch.ones_like(valid)
        read = self._read_dict(q_raw, sel(kv), sel(vv), has, losses)
        # store the compressor state, the open block and the counters
        for i in range(depth):
            st[f"d{i + 1}"].copy_(ds[i].view_as(st[f"d{i + 1}"]))
            if self.cfg.momentum:
                st[f"mom{i + 1}"].copy_(moms[i].view_as(st[f"mom{i + 1}"]))
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
