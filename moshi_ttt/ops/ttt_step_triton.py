"""The TTT cache's one-token streaming step as two Triton kernels, a program per (row, head) each.

``evict_step`` (``TTTCacheMemory._append_one``): normalise the evicted key, take its step size
η = inner_lr σ(k̂·w + c) / b, append the token to the open block and, when the row's block
completes, update the compressor and write its read (V_m = f_θ(p̂_m), K_m = key_m + V_m A, RoPE at
the relative offsets) into the cached virtual tokens; the last program of a row moves the row's
counters. Per-head compressors of depth 2 only (``supports``).
``attend_one`` (``EvictingMemory.attend_step``'s scores and ``mix``): the query against the ring
and the virtual tokens, combined by ``combine`` "gate" or "concat" (``attend_supports``).

``ON_CUDA`` (on) sends CUDA tensors here; off, they take the reference step
(``bench/moshi_bench.py``'s
``+unfused`` variants time that). Tests compare both paths, on CPU under Triton's interpreter and on
the GPU.
"""

from __future__ import annotations

import math
import os

import torch

from . import ttt_cache_triton as tct

triton, tl = tct.triton, (tct.tl if tct.triton is not None else None)
ON_CUDA = True  # CUDA tensors take these kernels (else the reference step)


def supports(mem, st) -> bool:
    """A per-head depth-2 compressor, fp32 state, no gradients, no per-update finiteness check, a
    constant decay;
    powers of two >= 16 for the head and hidden widths and the block, <= 16 virtual tokens, weights
    of at most ``ttt_cache_triton.MAX_WEIGHTS`` entries; CUDA
    with ``ON_CUDA`` (CPU under Triton's interpreter with ``ttt_cache_triton.CPU_INTERPRET``)."""
    mc = mem.cfg
    if (
        triton is None
        or torch.is_grad_enabled()
        or mc.compressor_depth != 2
        or mem.hc != mem.num_heads
    ):
        return False
    if mc.check_finite or mc.forget_gate or mc.num_virtual > 16 or st["ek"].dtype != torch.float32:
        return False
    if not (
        (st["ek"].is_cuda and ON_CUDA)
        or (tct.CPU_INTERPRET and os.environ.get("TRITON_INTERPRET") == "1")
    ):
        return False
    Dh, m = st["d1"].shape[-2:]
    return Dh * m <= tct.MAX_WEIGHTS and all(
        n >= 16 and n & (n - 1) == 0 for n in (Dh, m, mc.block)
    )


if triton is not None:

    @triton.jit
    def _evict_kernel(
        kraw,
        cv,
        valid,
        ek,
        ev,
        eeta,
        ecount,
        updates,
        arrive,
        d1,
        d2,
        m1,
        m2,
        w1i,
        w2i,
        probes,
        lr_w,
        lr_b,
        vkeys,
        vproj,
        cos,
        sin,
        vk,
        vv,
        eta_scale,
        decay,
        momentum,
        max_norm,
        H: tl.constexpr,
        BLK: tl.constexpr,
        CH: tl.constexpr,
        DH: tl.constexpr,
        MH: tl.constexpr,
        M: tl.constexpr,
        MP: tl.constexpr,
        HAS_MOM: tl.constexpr,
        HAS_DECAY: tl.constexpr,
        ROTATE: tl.constexpr,
    ):
        bi, h = tl.program_id(0), tl.program_id(1)
        g = bi * H + h
        rd = tl.arange(0, DH)
        kr = tl.load(kraw + g * DH + rd).to(tl.float32)
        kn = kr / tl.maximum(tl.sqrt(tl.sum(kr * kr, 0)), 1e-12)  # F.normalize
        logit = tl.sum(kn * tl.load(lr_w + h * DH + rd).to(tl.float32), 0) + tl.load(lr_b + h).to(
            tl.float32
        )
        e = tl.load(ecount + bi)
        ok = tl.load(valid + bi) != 0
        # the first free slot: written whether or not a token was evicted (a free slot is never
        # read)
        tl.store(ek + (g * BLK + e) * DH + rd, kn)
        tl.store(ev + (g * BLK + e) * DH + rd, tl.load(cv + g * DH + rd).to(tl.float32))
        tl.store(eeta + g * BLK + e, eta_scale / (1.0 + tl.exp(-logit)))
        done = ok & (e + 1 >= BLK)
        if done:
            tl.debug_barrier()  # the block (this program's own stores included) is read back below
            v = tct._update_read(
                d1,
                d2,
                m1,
                m2,
                w1i,
                w2i,
                ek,
                ev,
                eeta,
                probes,
                g,
                h,
                decay,
                momentum,
                max_norm,
                BLK,
                CH,
                DH,
                MH,
                M,
                MP,
                HAS_MOM,
                HAS_DECAY,
                True,
            )  # [MP, DH]
            rp = tl.arange(0, MP)
            rows = rp[:, None] < M
            k = tl.load(
                vkeys + h * M * DH + rp[:, None] * DH + rd[None, :], mask=rows, other=0.0
            ).to(tl.float32)
            k += tl.dot(
                v,
                tl.load(vproj + h * DH * DH + rd[:, None] * DH + rd[None, :]).to(tl.float32),
                input_precision="ieee",
            )  # K = key + V A: [MP, DH]
            # interleaved pairs: out[2i] = x[2i] c_i - x[2i+1] s_i, out[2i+1] = x[2i] s_i + x[2i+1]
            # c_i
            if ROTATE:
                sw = rd ^ 1  # each column's pair partner
                kp = tl.load(
                    vkeys + h * M * DH + rp[:, None] * DH + sw[None, :], mask=rows, other=0.0
                ).to(tl.float32)
                kp += tl.dot(
                    v,
                    tl.load(vproj + h * DH * DH + rd[:, None] * DH + sw[None, :]).to(tl.float32),
                    input_precision="ieee",
                )  # K[:, d ^ 1]
                ci = rp[:, None] * (DH // 2) + (rd // 2)[None, :]
                c = tl.load(cos + ci, mask=rows, other=1.0).to(tl.float32)
                s = tl.load(sin + ci, mask=rows, other=0.0).to(tl.float32)
                k = k * c + kp * s * tl.where(rd % 2 == 0, -1.0, 1.0)[None, :]
            out = g * M * DH + rp[:, None] * DH + rd[None, :]
            tl.store(vk + out, k, mask=rows)
            tl.store(vv + out, v, mask=rows)
        tl.debug_barrier()  # every thread's reads of ecount and valid come before the release below
        if tl.atomic_add(arrive + bi, 1) == H - 1:  # the row's last program (all have read ecount)
            tl.store(arrive + bi, 0)
            tl.store(ecount + bi, tl.where(ok, (e + 1) % BLK, e))
            tl.store(updates + bi, tl.load(updates + bi) + done.to(tl.int64))


def evict_step(mem, st, cand_k, cand_v, valid, rot) -> None:
    """In place on ``st``: cand_k (before RoPE), cand_v [B, H, 1, Dh] the evicted tokens, valid [B];
    rot the (cos, sin) [M, Dh/2] of the virtual keys' offsets (None: no rotation)."""
    mc = mem.cfg
    B, H, _, Dh = cand_k.shape
    M, m = mc.num_virtual, st["d1"].shape[-1]
    # per layer, device and rows: the kernel's arrival
    arrive = mem.__dict__.setdefault("_arrive", {})
    key = (cand_k.device, B)  # counters (zero between steps)
    if key not in arrive:
        arrive[key] = torch.zeros(B, dtype=torch.int32, device=cand_k.device)
    flat = lambda t: t.flatten(0, 1)
    moms = (flat(st["mom1"]), flat(st["mom2"])) if mc.momentum else (flat(st["d1"]), flat(st["d2"]))
    cos, sin = rot if rot is not None else (st["ek"], st["ek"])  # unread without rotation
    c = lambda t: t if t.is_contiguous() else t.contiguous()
    _evict_kernel[(B, H)](
        c(cand_k),
        c(cand_v),
        c(valid),
        st["ek"],
        st["ev"],
        st["eeta"],
        st["ecount"],
        st["updates"],
        arrive[key],
        flat(st["d1"]),
        flat(st["d2"]),
        *moms,
        mem.w1_init,
        mem.w2_init,
        mem.probes,
        mem.lr_w,
        mem.lr_b,
        mem.vkeys,
        mem.vkey_proj,
        cos,
        sin,
        st["vk"],
        st["vv"],
        mc.inner_lr / mc.block,
        float(mc.decay),
        float(mc.momentum),
        float(mc.max_state_norm),
        H=H,
        BLK=mc.block,
        CH=min(mc.block, 32),
        DH=Dh,
        MH=m,
        M=M,
        MP=max(16, 1 << math.ceil(math.log2(M))),
        HAS_MOM=bool(mc.momentum),
        HAS_DECAY=bool(mc.decay),
        ROTATE=rot is not None,
        num_warps=4 if Dh * m <= 4096 else 8,
    )


if triton is not None:

    @triton.jit
    def _attend_kernel(
        q,
        qr,
        rk,
        rv,
        kpos,
        vk,
        vv,
        has,
        gate,
        recency,
        out,
        scale,
        H: tl.constexpr,
        W: tl.constexpr,
        WP: tl.constexpr,
        DH: tl.constexpr,
        M: tl.constexpr,
        MP: tl.constexpr,
        GATE: tl.constexpr,
        DECAY: tl.constexpr,
    ):
        bi, h = tl.program_id(0), tl.program_id(1)
        g = bi * H + h
        rd, rw, rm = tl.arange(0, DH), tl.arange(0, WP), tl.arange(0, MP)
        inw, inm = rw < W, rm < M
        # the window: the ring after this step's write, its empty slots (position -1) masked
        k = tl.load(rk + (g * W + rw[:, None]) * DH + rd[None, :], mask=inw[:, None], other=0.0).to(
            tl.float32
        )
        s = tl.sum(k * tl.load(q + g * DH + rd).to(tl.float32)[None, :], 1) * scale  # [WP]
        s = tl.where(inw & (tl.load(kpos + bi * W + rw, mask=inw, other=-1) >= 0), s, float("-inf"))
        v = tl.load(rv + (g * W + rw[:, None]) * DH + rd[None, :], mask=inw[:, None], other=0.0).to(
            tl.float32
        )
        # the virtual tokens, scored by the query before RoPE
        kv = tl.load(
            vk + (g * M + rm[:, None]) * DH + rd[None, :], mask=inm[:, None], other=0.0
        ).to(tl.float32)
        sv = tl.sum(kv * tl.load(qr + g * DH + rd).to(tl.float32)[None, :], 1) * scale  # [MP]
        if DECAY:  # token m weighted by exp(-γ m), γ = softplus(recency)
            r = tl.load(recency + h).to(tl.float32)
            gamma = tl.maximum(r, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(r)))
            sv -= gamma * rm.to(tl.float32)
        sv = tl.where(inm, sv, float("-inf"))
        vv_ = tl.load(
            vv + (g * M + rm[:, None]) * DH + rd[None, :], mask=inm[:, None], other=0.0
        ).to(tl.float32)
        on = tl.load(has + bi) != 0
        if GATE:  # "gate": α softmax(window) + (1 - α) softmax(virtual); α = 1 without a read
            er = tl.exp(s - tl.max(s, 0))
            ev = tl.exp(sv - tl.max(sv, 0))
            o_r = tl.sum(er[:, None] * v, 0) / tl.sum(er, 0)
            o_v = tl.sum(ev[:, None] * vv_, 0) / tl.sum(ev, 0)
            a = 1.0 / (1.0 + tl.exp(-tl.load(gate + h).to(tl.float32)))
            a = tl.where(on, a, 1.0)
            o = a * o_r + (1.0 - a) * o_v
        else:  # "concat": one softmax over window and virtual keys
            sv = tl.where(on, sv, float("-inf"))
            mx = tl.maximum(tl.max(s, 0), tl.max(sv, 0))
            er = tl.exp(s - mx)
            ev = tl.exp(sv - mx)
            o = (tl.sum(er[:, None] * v, 0) + tl.sum(ev[:, None] * vv_, 0)) / (
                tl.sum(er, 0) + tl.sum(ev, 0)
            )
        tl.store(out + g * DH + rd, o)


def attend_supports(mem, st) -> bool:
    """The fused attention of a one-token step: the conditions of ``supports``' device, a
    power-of-two
    head width, at most 16 virtual tokens, and a ring of at most 32768 entries (window x head width)
    that a program holds in registers; a constant gate per head and no query read."""
    if triton is None or torch.is_grad_enabled() or mem.record or mem.cfg.num_virtual > 16:
        return False
    if mem.cfg.gate_per_token or mem.cfg.read_query:
        return False
    if not (
        (st["k"].is_cuda and ON_CUDA)
        or (tct.CPU_INTERPRET and os.environ.get("TRITON_INTERPRET") == "1")
    ):
        return False
    Dh = st["k"].shape[-1]
    return Dh >= 16 and Dh & (Dh - 1) == 0 and mem.cfg.window * Dh <= 32768


def attend_one(mem, st, q, q_raw, vk, vv, has) -> torch.Tensor:
    """A one-token step's attention output [B, H, 1, Dh] (fp32) from the ring (after the write),
    the virtual tokens vk, vv [B, H, M, Dh] and has [B]: ``EvictingMemory.attend_step``'s
    ``mix``."""
    B, H, _, Dh = q.shape
    W, M = mem.cfg.window, vk.shape[2]
    out = torch.empty(B, H, 1, Dh, device=q.device, dtype=torch.float32)
    c = lambda t: t if t.is_contiguous() else t.contiguous()
    _attend_kernel[(B, H)](
        c(q),
        c(q_raw),
        st["k"],
        st["v"],
        st["kpos"],
        c(vk),
        c(vv),
        c(has),
        mem.gate,
        mem.recency,
        out,
        mem.inv_t / math.sqrt(Dh),
        H=H,
        W=W,
        WP=max(16, 1 << math.ceil(math.log2(W))),
        DH=Dh,
        M=M,
        MP=max(16, 1 << math.ceil(math.log2(M))),
        GATE=mem.cfg.combine == "gate",
        DECAY=mem.cfg.virtual_position == "decay",
        num_warps=4 if W * Dh < 8192 else 8,
    )
    return out
