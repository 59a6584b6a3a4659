"""The TTT cache: an exact window plus a compressor of evicted tokens.

Per attention layer and head: a ring of the last W tokens (keys after RoPE, raw keys, values),
and a compressor f_θ (ops/ttt_cache.py) that learns every evicted (key, value) pair in
mini-batches of b tokens. M virtual tokens are read from its state with learned probes p_m:
    V_m = f_θ(p̂_m),  K_m = key_m + V_m A   (A starts at zero)
A query at position t (within its document) sees the state after floor(max(t - W + 1, 0) / b)
updates: the parallel path computes exactly that, and streaming reaches it by updating whenever
a block of evicted tokens completes. Readers (``MemoryConfig``): ``read_query`` adds a virtual
token read at the query itself, V_q = f_θ(q̂_t), K_q = key_q + V_q A (no position offset);
``compressor_proj`` feeds the compressor c = [k; v] P (all heads) instead of (k, v) and reads it
with q P_q (P, P_q start as identities).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..config import MemoryConfig
from ..ops import impl
from ..ops import l2norm_triton as l2norm
from ..ops import ttt_cache_step as step_ops
from ..ops.segments import pack, row_of, segment_rows, unpack
from ..ops.ttt_cache import compress_scan, compressor, reconstruction_terms
from ..state import ScopedState
from . import records
from .evicting import EvictingMemory, VirtualRead
from .memory import Heads


class TTTCacheMemory(EvictingMemory):
    def __init__(self, cfg: MemoryConfig, heads: int, head_dim: int, rope_scale: float = 1.0):
        super().__init__(cfg, heads, head_dim, rope_scale)
        mc = self.cfg
        H, Dh, M = heads, head_dim, mc.num_virtual
        m = mc.compressor_hidden or 2 * Dh
        # compressors per layer (shared: one for all heads)
        self.hc = 1 if mc.compressor_shared else H
        dims = [Dh] + [m] * (mc.compressor_depth - 1) + [Dh]
        for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:]), 1):
            init = torch.randn(self.hc, din, dout) / math.sqrt(din)
            if i == mc.compressor_depth and mc.cold_start == "zero":  # the state starts with a zero
                # output layer (never all)
                self.register_buffer(f"w{i}_init", torch.zeros_like(init))
            else:
                setattr(self, f"w{i}_init", nn.Parameter(init))
        self.lr_w = nn.Parameter(torch.zeros(H, Dh))  # η_t = inner_lr σ(k̂_t·lr_w + lr_b) / b
        self.lr_b = nn.Parameter(torch.zeros(H))
        if mc.forget_gate:  # λ_n = σ(k̄_n·forget_w + forget_b), starting at the configured decay
            self.forget_w = nn.Parameter(torch.zeros(self.hc, Dh))
            logit = math.log(mc.decay / (1 - mc.decay))
            self.forget_b = nn.Parameter(torch.full((self.hc,), logit))
        self.probes = nn.Parameter(torch.randn(H, M, Dh))
        self.vkeys = nn.Parameter(torch.randn(H, M, Dh) / math.sqrt(Dh))
        self.vkey_proj = nn.Parameter(torch.zeros(H, Dh, Dh))
        self.recency = nn.Parameter(torch.full((H,), math.log(math.expm1(0.1))))  # position "decay"
        self.register_buffer("offsets", mc.window * (1.0 + torch.arange(M)), persistent=False)
        if mc.read_query:
            self.qkey = nn.Parameter(torch.randn(H, Dh) / math.sqrt(Dh))  # key_q
        if mc.compressor_proj:  # [k; v] of all heads -> the compressor's keys and values (identity)
            self.kv_proj = nn.Parameter(torch.eye(2 * H * Dh))
            self.q_proj = nn.Parameter(torch.eye(H * Dh))

    # ---- compressor ---------------------------------------------------------------------
    def inits(self) -> tuple:
        """The compressor's initial state (W1, ..., W_L), each [hc, d_in, d_out]."""
        return tuple(getattr(self, f"w{i}_init") for i in range(1, self.cfg.compressor_depth + 1))

    def _per_head(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """Shared compressor: [rows, S, H * M, Dh] -> [rows * H, S, M, Dh] (``per_head``)."""
        return step_ops.per_head(x, rows, self.num_heads)

    def _keys(self, v: torch.Tensor, freqs) -> torch.Tensor:
        """Virtual keys K_m = key_m + V_m A (``virtual_keys``). v [rows * H, S, M, Dh]."""
        rot = self._rotation(freqs) if self.cfg.virtual_position == "relative" else None
        return step_ops.virtual_keys(v, self.vkeys, self.vkey_proj, rot)

    def _rotation(self, freqs):
        """(cos, sin) [M, Dh/2] of the relative RoPE offsets: virtual key m sits offsets[m] tokens
        back
        (buffers only: cached)."""
        key = (freqs.device, freqs.dtype, freqs.data_ptr(), freqs._version)
        if getattr(self, "_rot_key", None) != key:
            angle = -self.offsets.to(freqs.device)[:, None] * freqs
            self._rot, self._rot_key = (torch.cos(angle), torch.sin(angle)), key
        return self._rot

    def _probes(self) -> torch.Tensor:
        """Normalised probes per compressor: [hc, M * H / hc, Dh]."""
        return F.normalize(self.probes, dim=-1).reshape(self.hc, -1, self.probes.shape[-1])

    def _kv(self, k_raw: torch.Tensor, v: torch.Tensor):
        """The compressor's keys and values of tokens [B, H, n, Dh]: (k, v), or with
        ``compressor_proj`` [k; v] P over all heads, split back into keys and values."""
        if not self.cfg.compressor_proj:
            return k_raw, v
        B, H, n, Dh = k_raw.shape
        x = torch.cat([k_raw, v.to(k_raw.dtype)], 1).permute(0, 2, 1, 3).reshape(B, n, 2 * H * Dh)
        # 2 x [B, H, n, Dh]
        c = (x @ self.kv_proj.to(x.dtype)).view(B, n, 2, H, Dh).permute(2, 0, 3, 1, 4)
        return c[0], c[1]

    def _query(self, q_raw: torch.Tensor) -> torch.Tensor:
        """Normalised queries of the query read: q̂ (or q P_q, normalised). [B, H, n, Dh] ->
        fp32."""
        q = q_raw
        if self.cfg.compressor_proj:
            B, H, n, Dh = q.shape
            q = q.transpose(1, 2).reshape(B, n, H * Dh) @ self.q_proj.to(q.dtype)
            q = q.view(B, n, H, Dh).transpose(1, 2)
        with torch.autocast(q.device.type, enabled=False):
            return F.normalize(q.to(torch.promote_types(q.dtype, torch.float32)), dim=-1)

    def _apply_heads(self, ws, x: torch.Tensor, rows: int) -> torch.Tensor:
        """f_θ per head: ws [rows * hc, ..., d_in, d_out], x [rows * H, ..., n, Dh] -> [rows * H,
        ..., n, Dh]
        (a shared compressor reads the queries of all its heads)."""
        if self.hc == self.num_heads:
            return compressor(ws, x.to(ws[0].dtype))
        H = self.num_heads
        xs = x.view(rows, H, *x.shape[1:]).movedim(1, -3)  # [rows, ..., H, n, Dh]
        out = compressor(ws, xs.flatten(-3, -2).to(ws[0].dtype)).view_as(xs)
        return out.movedim(-3, 1).reshape_as(x)

    def _query_keys(self, vq: torch.Tensor) -> torch.Tensor:
        """K_q = key_q + V_q A: vq [B, H, Q, Dh] -> [B, H, Q, Dh]."""
        A = self.vkey_proj.to(vq.dtype)
        return self.qkey.to(vq.dtype)[None, :, None] + torch.einsum("bhqd,hde->bhqe", vq, A)

    def _runs(self, x: torch.Tensor, S: int):
        """Queries at document positions 0..L-1 grouped by the state they read,
        n(p) = max(p - W + 1, 0) // b: x [..., L, D] -> (head [..., n0, D], the n0 = min(W - 1, L)
        positions that read state 0; body [..., S, b, D], run n reading state n, zero padded)."""
        W, b = self.cfg.window, self.cfg.block
        n0 = min(W - 1, x.shape[-2])
        rest = x[..., n0:, :]
        body = F.pad(rest, (0, 0, 0, S * b - rest.shape[-2])).unflatten(-2, (S, b))
        return x[..., :n0, :], body

    @staticmethod
    def _unruns(head: torch.Tensor, body: torch.Tensor, L: int) -> torch.Tensor:
        """The inverse of ``_runs``: head [..., n0, D], body [..., S, b, D] -> [..., L, D]."""
        return torch.cat([head, body.flatten(-3, -2)[..., : L - head.shape[-2], :]], -2)

    def _query_read_blocks(self, states, qn, rows: int) -> torch.Tensor:
        """The query read of a training sequence: qn [rows * H, L, Dh] at document positions
        0..L-1, states [rows * hc, N + 1, d_in, d_out] -> f_{θ_n(p)}(q̂_p) [rows * H, L, Dh] with
        n(p) = max(p - W + 1, 0) // b (``_runs``)."""
        head, grid = self._runs(qn, states[0].shape[1])
        head = self._apply_heads(tuple(w[:, 0] for w in states), head, rows)  # [G, n0, Dh]
        return self._unruns(head, self._apply_heads(states, grid, rows), qn.shape[1])

    def _read(self, freqs, rows: int, first: int = 0, query=None):
        """read(states (W1, ..., W_L), each [rows * hc, S, d_in, d_out]) -> (K, V) [rows * H, S -
        first, M, Dh]
        of the states from index ``first``, and ``query(states)`` (the query read; None without)."""
        probes = self._probes().repeat(rows, 1, 1)[:, None]  # [G, 1, M', Dh]

        def read(states):
            vq = query(states) if query is not None else None
            states = tuple(w[:, first:] for w in states)
            # [rows * H, S, M, Dh]
            v = self._per_head(compressor(states, probes.to(states[0].dtype)), rows)
            return self._keys(v, freqs), v, vq

        return read

    def _prep(self, keys: torch.Tensor, rows: int, fused: bool = False):
        """Raw keys [rows * H, ..., Dh] (or [rows, H, ..., Dh]) -> normalised keys (fp32 or
        float64) and their step sizes η_t [..] (``fused``: the normalisation as a Triton kernel
        where it runs, ``l2norm.normalize``)."""
        with torch.autocast(keys.device.type, enabled=False):
            kn = (l2norm.normalize if fused else l2norm.reference)(keys)
            shape = kn.shape
            return kn, self._eta(kn.reshape(rows * self.num_heads, -1, 1, shape[-1]), rows).view(
                shape[:-1]
            )

    def _eta(self, keys: torch.Tensor, rows: int) -> torch.Tensor:
        """Per-token step sizes (``step_sizes``): keys [G, N, b, Dh] normalised -> [G, N, b]."""
        return step_ops.step_sizes(keys, self.lr_w, self.lr_b, self.cfg.inner_lr, self.cfg.block)

    def _decay(self, keys: torch.Tensor, eta: torch.Tensor, rows: int):
        """λ per block and compressor (``forget_decay``): keys [rows * hc, ..., b, Dh], eta
        [rows * hc, ..., b] -> a float or [rows * hc, ...]."""
        fw, fb = (self.forget_w, self.forget_b) if self.cfg.forget_gate else (None, None)
        return step_ops.forget_decay(keys, eta, fw, fb, self.cfg.decay)

    def _scan(self, ds, moms, keys, vals, eta, apply, freqs, rows, first: int = 0, query=None):
        """Per head: normalised keys, vals [rows * H, N, b, Dh], eta [rows * H, N, b] (0: no token),
        apply [rows * H, N]; ds/moms per compressor [rows * hc, ...] -> compress_scan outputs (reads
        of the states from index ``first``). A shared compressor learns the block's tokens of all
        heads in one step (b H tokens, η / H each)."""
        vals = vals.to(keys.dtype)
        if self.hc != self.num_heads:
            H = self.num_heads
            merge = lambda x: (
                x.view(rows, H, *x.shape[1:])
                .transpose(1, 2)
                .reshape(rows, x.shape[1], -1, *x.shape[3:])
            )
            # [rows, N, H b, ...]
            keys, vals, eta = merge(keys), merge(vals), merge(eta[..., None])[..., 0] / H
            apply = apply.view(rows, H, -1)[:, 0]
        inits = tuple(w.to(keys.dtype).repeat(rows, 1, 1) for w in self.inits())
        mc = self.cfg
        with torch.autocast(keys.device.type, enabled=False):
            return compress_scan(
                ds,
                moms,
                inits,
                keys,
                vals,
                eta,
                apply,
                self._read(freqs, rows, first, query),
                decay=self._decay(keys, eta, rows),
                momentum=mc.momentum,
                max_norm=mc.max_state_norm,
                bptt=mc.bptt,
                record=records.recorder() is not None,
                check=self.name if mc.check_finite else None,
                compiled=mc.compile_scan,
                grad_precision=mc.grad_precision,
            )

    def _scores(self, q_raw, kv):
        """q_raw [B, H, ..., Q, Dh], kv [B, H, ..., Q, M, Dh] -> scores [B, H, ..., Q, M]."""
        s = torch.einsum("...qd,...qmd->...qm", q_raw.float(), kv.float()) / math.sqrt(
            q_raw.shape[-1]
        )
        s = s * self.inv_t  # YaRN temperature, as on the window logits
        if self.cfg.virtual_position == "decay":  # token m is weighted by exp(-γ m)
            s = step_ops.with_recency(s, self.recency)
        return s

    def _read_dict(self, q_raw, kv, vv, has, losses, vq=None):
        """Softmax read of the virtual tokens kv, vv [B, H, ..., Q, M, Dh]; with the query read vq
        [B, H, Q, Dh], one more token per query (K_q = key_q + V_q A, no position offset)."""
        scores = self._scores(q_raw, kv)
        if vq is not None:
            kq = self._query_keys(vq)
            s_q = (q_raw.float() * kq.float()).sum(-1, keepdim=True) * (
                self.inv_t / math.sqrt(q_raw.shape[-1])
            )
            scores, vv = (
                torch.cat([scores, s_q], -1),
                torch.cat([vv, vq[..., None, :].to(vv.dtype)], -2),
            )
        return VirtualRead(has=has, scores=scores, values=vv, keys=kv, losses=losses)

    # ---- parallel ---------------------------------------------------------------------------
    def virtual_parallel(self, q_raw, k_raw, v, pos, seg, freqs) -> VirtualRead:
        """The evicted tokens of each document, in blocks of b from its position 0; a query at
        position t reads the state after floor(max(t - W + 1, 0) / b) updates."""
        B, H, T, Dh = q_raw.shape
        W, b = self.cfg.window, self.cfg.block
        r, rows, L = segment_rows(pos, seg)
        N = max(L - W, 0) // b

        def blocks(x):  # [B, H, T, Dh] -> [rows * H, N, b, Dh]
            xp = pack(x.transpose(1, 2), r, pos, rows, L)[:, : N * b]  # [rows, N b, H, Dh]
            return xp.reshape(rows, N, b, H, Dh).permute(0, 3, 1, 2, 4).reshape(rows * H, N, b, Dh)

        dt = torch.promote_types(q_raw.dtype, torch.float32)
        d = tuple(q_raw.new_zeros(rows * self.hc, *w.shape[1:], dtype=dt) for w in self.inits())
        kc, vc = self._kv(k_raw, v)
        keys, eta = self._prep(blocks(kc), rows, fused=True)
        query = None
        if self.cfg.read_query:  # queries at their document positions: [rows * H, L, Dh]
            qp = pack(self._query(q_raw).transpose(1, 2), r, pos, rows, L)
            qp = qp.permute(0, 2, 1, 3).reshape(rows * H, L, Dh)
            query = lambda states: self._query_read_blocks(states, qp, rows)
        (kv, vv, vq), _, losses = self._scan(
            d,
            d if self.cfg.momentum else None,
            keys,
            blocks(vc),
            eta,
            q_raw.new_ones(rows * H, N, dtype=dt),
            freqs,
            rows,
            query=query,
        )
        vqd = vq.view(rows, H, L, Dh) if vq is not None else None  # at document positions
        sink = records.reconstruction_sink()
        if sink is not None:
            if N == 0:
                raise ValueError(
                    "the reconstruction loss needs sequences longer than window + block"
                )
            terms = reconstruction_terms(keys, blocks(vc), kv[:, 1:], vv[:, 1:])
            sink.setdefault(self, []).append(terms)
        n_q = (pos - W + 1).clamp_min(0) // b  # [B, T]
        has = n_q > 0 if self.cfg.cold_start == "wait" else torch.ones_like(n_q, dtype=torch.bool)
        fast = not (impl.reference("read") or records.recorder() is not None)
        if fast and self.cfg.combine == "gate":
            qd = pack(q_raw.transpose(1, 2), r, pos, rows, L).transpose(1, 2)  # [rows, H, L, Dh]
            out = self._read_runs(qd, kv, vv, vqd)
            out = unpack(out.transpose(1, 2), r, pos).transpose(1, 2)
            return VirtualRead(has=has, out=out, losses=losses)

        def per_query(x):  # [rows * H, N + 1, M, Dh] -> [B, H, T, M, Dh]
            return (
                x.view(rows, H, *x.shape[1:])
                .transpose(1, 2)[row_of(r, pos), n_q]
                .permute(0, 2, 1, 3, 4)
            )

        vq = unpack(vqd.transpose(1, 2), r, pos).transpose(1, 2) if vqd is not None else None
        return self._read_dict(q_raw, per_query(kv), per_query(vv), has, losses, vq)

    def _read_runs(self, qd, kv, vv, vqd=None):
        """The softmax read of the virtual tokens ("gate" normalises it on its own) with the
        queries of each document grouped by the state they read (``_runs``), so each query meets
        only its own state's M tokens and no per-query copy is made. qd [rows, H, L, Dh] at
        document positions 0..L-1; kv, vv [rows * H, S, M, Dh]; vqd the query read [rows, H, L,
        Dh] (or None) -> [rows, H, L, Dh] (fp32); equals the softmax of ``_read_dict``'s scores
        against ``per_query``."""
        R, H, L, Dh = qd.shape
        S, M = kv.shape[1:3]
        c = self.inv_t / math.sqrt(Dh)
        with torch.autocast(qd.device.type, enabled=False):
            q = qd.float()
            k, v = kv.view(R, H, S, M, Dh).float(), vv.view(R, H, S, M, Dh).float()
            sq = None
            if vqd is not None:  # K_q = key_q + V_q A, one more token per query
                vqd = vqd.float()
                sq = (q * self._query_keys(vqd).float()).sum(-1, keepdim=True) * c  # [R, H, L, 1]
            decay = self.cfg.virtual_position == "decay"

            def read(q, k, v, sq, vq):  # q [..., n, Dh], k, v [..., M, Dh] -> [..., n, Dh]
                s = q @ k.transpose(-1, -2) * c  # [..., n, M]
                if decay:  # token m weighted by exp(-γ m)
                    s = step_ops.with_recency(s, self.recency)
                if sq is None:
                    return torch.softmax(s, -1) @ v
                p = torch.softmax(torch.cat([s, sq], -1), -1)
                return p[..., :-1] @ v + p[..., -1:] * vq

            parts = [self._runs(x, S) if x is not None else (None, None) for x in (q, sq, vqd)]
            head = read(parts[0][0], k[:, :, 0], v[:, :, 0], parts[1][0], parts[2][0])
            body = read(parts[0][1], k, v, parts[1][1], parts[2][1])
            return self._unruns(head, body, L)

    # ---- streaming ----------------------------------------------------------------------------
    def state_names(self) -> tuple:
        """Compressor state offsets d1..dL (and momenta mom1..momL): [B, hc, d_in, d_out] each."""
        L = self.cfg.compressor_depth
        return tuple(
            f"{p}{i}"
            for p in (("d", "mom") if self.cfg.momentum else ("d",))
            for i in range(1, L + 1)
        )

    def init_memory(self, st: ScopedState, B: int, device) -> None:
        H, Dh, b, M = self.num_heads, self.head_dim, self.cfg.block, self.cfg.num_virtual
        inits = self.inits()
        f32 = torch.promote_types(inits[0].dtype, torch.float32)
        # compressor state as offsets from the (trained) initial state
        for name in self.state_names():
            st.add(
                name, torch.zeros(B, *inits[int(name[-1]) - 1].shape, device=device, dtype=f32), 0.0
            )
        # the open block: normalised keys,
        st.add("ek", torch.zeros(B, H, b, Dh, device=device, dtype=f32), 0.0)
        st.add("ev", torch.zeros(B, H, b, Dh, device=device, dtype=f32), 0.0)  # values
        st.add("eeta", torch.zeros(B, H, b, device=device, dtype=f32), 0.0)  # and step sizes
        st.add("ecount", torch.zeros(B, dtype=torch.long, device=device), 0)
        st.add("updates", torch.zeros(B, dtype=torch.long, device=device), 0)
        # the read of the current state
        st.add("vk", torch.zeros(B, H, M, Dh, device=device, dtype=f32), 0.0)
        # (valid once updates > 0)
        st.add("vv", torch.zeros(B, H, M, Dh, device=device, dtype=f32), 0.0)

    def self_masked(self, kq: int) -> tuple:
        """State a step leaves unchanged by itself for rows that evict nothing (the ring: one-token
        steps)."""
        return (
            super().self_masked(kq)
            + self.state_names()
            + ("ek", "ev", "eeta", "ecount", "updates", "vk", "vv")
        )

    def _current(self, st: ScopedState, freqs):
        """The virtual tokens of the state now: (K, V) [B, H, M, Dh] (the initial state's before any
        update)."""
        # no virtual tokens before the first update: nothing to read
        if self.cfg.cold_start == "wait":
            return st["vk"], st["vv"]
        dt = st["vk"].dtype
        with torch.autocast(st["vk"].device.type, enabled=False):
            # [H, 1, M, Dh]
            k0, v0, _ = self._read(freqs, 1)(tuple(w.to(dt)[:, None] for w in self.inits()))
        has = (st["updates"] > 0)[:, None, None, None]
        return torch.where(has, st["vk"], k0[:, 0]), torch.where(has, st["vv"], v0[:, 0])

    def virtual_step(
        self, q_raw, cand_k, cand_v, valid, pos, st: ScopedState, freqs
    ) -> VirtualRead:
        """Lay the open block and the step's evicted tokens out from the block start, scan the
        blocks that complete (the others are masked), and give each query the state after the
        blocks completed by its own eviction. One-token steps take ``_step_one``."""
        B, H, kq, Dh = q_raw.shape
        b = self.cfg.block
        cand_k, cand_v = self._kv(cand_k, cand_v)
        if kq == 1 and self._one_token_steps():
            return self._step_one(q_raw, cand_k, cand_v, valid[:, 0], st, freqs)
        kn, eta_t = self._prep(cand_k, B)  # [B, H, k, Dh], [B, H, k]
        cv = cand_v.to(kn.dtype)
        ar = torch.arange(kq, device=q_raw.device)
        nvalid = valid.sum(1)
        ecount = st["ecount"]
        NB = -(-(b - 1 + kq) // b)  # blocks the open block (< b tokens) and k new ones can fill
        L = NB * b
        # L slots of blocks, b zero slots (the next open block when all complete), one spill slot
        slot = torch.where(valid, ecount[:, None] + ar - (kq - nvalid)[:, None], L + b)
        pad = lambda buf: torch.cat([buf, buf.new_zeros(*buf.shape[:2], L + 1, *buf.shape[3:])], 2)
        # [B, H, L + b + 1, Dh]
        lay_k = pad(st["ek"]).scatter(2, slot[:, None, :, None].expand(-1, H, -1, Dh), kn)
        lay_v = pad(st["ev"]).scatter(2, slot[:, None, :, None].expand(-1, H, -1, Dh), cv)
        # [B, H, L + b + 1]
        lay_e = pad(st["eeta"]).scatter(2, slot[:, None, :].expand(-1, H, -1), eta_t)
        total = ecount + nvalid  # evicted tokens in the open blocks after this step
        apply = (torch.arange(NB, device=q_raw.device) + 1) * b <= total[:, None]  # [B, NB]
        tok_ok = (torch.arange(L, device=q_raw.device) < total[:, None]).view(B, NB, b) & apply[
            ..., None
        ]
        G = B * H
        rows = lambda x: x[:, :, :L].reshape(G, NB, b, *x.shape[3:])
        per_g = lambda x: x[:, None].expand(B, H, *x.shape[1:]).reshape(G, *x.shape[1:])
        depth = self.cfg.compressor_depth
        flat = lambda p: tuple(st[f"{p}{i}"].flatten(0, 1) for i in range(1, depth + 1))
        n_q = (ecount[:, None] + (ar + 1 - (kq - nvalid)[:, None]).clamp_min(0)) // b  # [B, k]
        query = None
        if self.cfg.read_query:  # every query against the states 0..NB, then its own: [G, k, Dh]
            qn = self._query(q_raw).reshape(G, 1, kq, Dh)
            nq = per_g(n_q)[:, None, :, None].expand(G, 1, kq, Dh)
            query = lambda states: self._apply_heads(
                states, qn.expand(G, NB + 1, kq, Dh), B
            ).gather(1, nq)[:, 0]
        (kv, vv, vq), (ds, moms), losses = self._scan(
            flat("d"),
            flat("mom") if self.cfg.momentum else None,
            rows(lay_k),
            rows(lay_v),
            rows(lay_e) * per_g(tok_ok.to(lay_e.dtype)),
            per_g(apply.to(lay_k.dtype)),
            freqs,
            B,
            first=1,
            query=query,
        )
        sink = records.reconstruction_sink()
        if sink is not None:  # the blocks completed in this step, each read by the state after it
            terms = reconstruction_terms(rows(lay_k), rows(lay_v), kv, vv, per_g(tok_ok))
            sink.setdefault(self, []).append(terms)
        k0, v0 = self._current(st, freqs)
        kv = torch.cat([k0.reshape(G, 1, *kv.shape[2:]).to(kv.dtype), kv], 1)  # [G, NB + 1, M, Dh]
        vv = torch.cat([v0.reshape(G, 1, *vv.shape[2:]).to(vv.dtype), vv], 1)
        sel = lambda x, n: x.view(B, H, NB + 1, *x.shape[2:]).gather(
            2, n[:, None, :, None, None].expand(-1, H, -1, *x.shape[2:])
        )  # [B, H, n, M, Dh]
        has = (
            (st["updates"][:, None] + n_q > 0)
            if self.cfg.cold_start == "wait"
            else torch.ones_like(valid)
        )
        vq = vq.view(B, H, kq, Dh) if vq is not None else None
        read = self._read_dict(q_raw, sel(kv, n_q), sel(vv, n_q), has, losses, vq)
        # store the compressor state and its read, the open block and the counters
        for i in range(depth):
            st[f"d{i + 1}"].copy_(ds[i].view_as(st[f"d{i + 1}"]))
            if self.cfg.momentum:
                st[f"mom{i + 1}"].copy_(moms[i].view_as(st[f"mom{i + 1}"]))
        n_last = (total // b)[:, None]  # [B, 1]
        done = (n_last > 0)[:, :, None, None]  # [B, 1, 1, 1]
        st["vk"].copy_(torch.where(done, sel(kv, n_last)[:, :, 0].to(st["vk"].dtype), st["vk"]))
        st["vv"].copy_(torch.where(done, sel(vv, n_last)[:, :, 0].to(st["vv"].dtype), st["vv"]))
        keep = ((total // b) * b)[:, None] + torch.arange(b, device=q_raw.device)  # [B, b]
        kidx = keep[:, None, :, None].expand(-1, H, -1, Dh)
        st["ek"].copy_(lay_k.gather(2, kidx))
        st["ev"].copy_(lay_v.gather(2, kidx))
        st["eeta"].copy_(lay_e.gather(2, keep[:, None, :].expand(-1, H, -1)))
        st["updates"].add_(total // b)
        ecount.copy_(total % b)
        return read

    def _step_view(self, st: ScopedState) -> step_ops.StepState:
        depth, mom = self.cfg.compressor_depth, self.cfg.momentum
        return step_ops.StepState(
            *(st[n] for n in ("ek", "ev", "eeta", "ecount", "updates")),
            tuple(st[f"d{i}"] for i in range(1, depth + 1)),
            tuple(st[f"mom{i}"] for i in range(1, depth + 1)) if mom else None,
            st["vk"],
            st["vv"],
        )

    def _step_weights(self) -> step_ops.StepWeights:
        forget = (self.forget_w, self.forget_b) if self.cfg.forget_gate else (None, None)
        return step_ops.StepWeights(
            self.inits(), self.probes, self.lr_w, self.lr_b, self.vkeys, self.vkey_proj, *forget
        )

    def _evict_one(self, cand_k, cand_v, valid, st: ScopedState, freqs):
        """``ops.ttt_cache_step.evict_one`` on this layer's state and weights (the evicted token,
        if any, ``valid`` [B], joins the open block; completed blocks update the compressor).
        Returns the virtual tokens now (K, V) [B, H, M, Dh] and the rows that have them, has
        [B]."""
        mc = self.cfg
        rot = self._rotation(freqs) if mc.virtual_position == "relative" else None
        step_ops.evict_one(
            cand_k,
            cand_v,
            valid,
            self._step_view(st),
            self._step_weights(),
            rot,
            inner_lr=mc.inner_lr,
            decay=mc.decay,
            momentum=mc.momentum,
            max_norm=mc.max_state_norm,
            check=self.name if mc.check_finite else None,
        )
        k, v = self._current(st, freqs)
        has = st["updates"] > 0 if mc.cold_start == "wait" else torch.ones_like(valid)
        return k, v, has

    def _one_token_steps(self) -> bool:
        """One-token steps take ``_step_one`` (not the general block layout of ``virtual_step``)."""
        recording = records.recorder() is not None or records.reconstruction_sink() is not None
        return not (recording or impl.reference("update"))

    def attend_step(self, x: Heads, pos, st: ScopedState, freqs, active=None):
        """``EvictingMemory.attend_step``; a one-token step with a constant gate and no query read
        goes top-down through two ops, ``ops.ttt_cache_step.evict_one`` and ``attend_one`` (each
        a Triton kernel where it applies, else its PyTorch reference), and the ring write."""
        q_raw, k_raw, v, q, k = x.q_raw, x.k_raw, x.v, x.q, x.k
        mc = self.cfg
        one = q.shape[2] == 1 and self._one_token_steps()
        if not one or mc.gate_per_token or mc.read_query:
            return super().attend_step(x, pos, st, freqs, active)
        cand_k, cand_v, valid = self.candidates(st, k_raw, v, pos, active)
        vk, vv, has = self._evict_one(*self._kv(cand_k, cand_v), valid[:, 0], st, freqs)
        self.write_one(st, k_raw, v, k, pos, active, cand_k, cand_v)
        return self._attend_one(q, q_raw, st, vk, vv, has).to(q.dtype)

    def _attend_one(self, q, q_raw, st: ScopedState, vk, vv, has) -> torch.Tensor:
        """``ops.ttt_cache_step.attend_one`` of this layer: q, q_raw [B, H, 1, Dh] against its
        ring and the virtual tokens vk, vv [B, H, M, Dh] of the rows with has [B] -> fp32."""
        mc = self.cfg
        return step_ops.attend_one(
            q,
            q_raw,
            st["k"],
            st["v"],
            st["kpos"],
            vk,
            vv,
            has,
            self.gate,
            self.recency,
            inv_t=self.inv_t,
            gated=mc.combine == "gate",
            recency_bias=mc.virtual_position == "decay",
        )

    def _step_one(self, q_raw, cand_k, cand_v, valid, st: ScopedState, freqs) -> VirtualRead:
        """A one-token step's read (``_evict_one``, then the softmax keys of the virtual tokens)."""
        B, H, _, Dh = q_raw.shape
        k, v, has = self._evict_one(cand_k, cand_v, valid, st, freqs)
        vq = None
        if self.cfg.read_query:  # the state now, read at the query: [B, H, 1, Dh]
            f32 = st["d1"].dtype
            ws = tuple(
                w.to(f32).repeat(B, 1, 1) + st[f"d{i}"].flatten(0, 1)
                for i, w in enumerate(self.inits(), 1)
            )
            vq = self._apply_heads(ws, self._query(q_raw).reshape(B * H, 1, Dh), B).view(
                B, H, 1, Dh
            )
        return self._read_dict(q_raw, k[:, :, None], v[:, :, None], has[:, None], (None, None), vq)

    def extra_stats(self, read, sel) -> dict:
        """Virtual-key cosine similarity (pairwise, mean) and the inner losses before/after
        updates."""
        kn = F.normalize(read.keys.float(), dim=-1)  # [B, H, ..., M, Dh]
        cos = kn @ kn.transpose(-1, -2)
        M = cos.shape[-1]
        off = (cos.sum((-1, -2)) - cos.diagonal(dim1=-2, dim2=-1).sum(-1)) / max(M * (M - 1), 1)
        before, after = read.losses
        return {
            "virtual_key_cos": off[sel].mean().item() if sel.any() else float("nan"),
            "inner_loss_before": before.detach().cpu() if before is not None else None,
            "inner_loss_after": after.detach().cpu() if after is not None else None,
        }
