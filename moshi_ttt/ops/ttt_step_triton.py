"""The TTT cache's one-token streaming step as Triton kernels: ``evict_step`` (two launches) and
``attend_one`` (one, a program per row and head).

``evict_step`` (``ops.ttt_cache_step.evict_one``): normalise the evicted key, take its step size
η = inner_lr σ(k̂·w + c) / b, append the token to the open block (a light program per row and
head; the last program of a row moves the row's counters and lists the row when its block
completes), then, for the listed rows only, update the compressor and write its read
(V_m = f_θ(p̂_m), K_m = key_m + V_m A, RoPE at the relative offsets) into the cached virtual
tokens. Per-head compressors of depth 2 only (``evict_supports``).
``attend_one`` (``EvictingMemory.attend_step``'s scores and ``mix``): the query against the ring
and the virtual tokens, combined by ``combine`` "gate" or "concat" (``attend_supports``).

The functions take tensors (``StepState``, ``StepWeights``) and scalars, never a layer;
``evict_supports`` / ``attend_supports`` say where the kernels run (``ops.impl``: Triton kernels
on CUDA tensors unless the "step" part runs its reference). Tests compare both paths, on CPU under
Triton's interpreter and on the GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from . import impl
from . import ttt_cache_triton as tct

triton, tl = tct.triton, (tct.tl if tct.triton is not None else None)
_counters: dict = {}  # (device, stream, rows) -> the step's counters (``_buffers``)
# the completion kernel: columns of the virtual keys it forms at a time, its programs per
# streaming multiprocessor and its warps (None: 4, or 8 above 4096 compressor weights per matrix);
# attend_one: the window slots a program holds at a time, and its warps
# (docs/results/kernel-compile-sm90, bench/step_kernels.py)
VKEY_CHUNK = 32
COMPLETE_PER_SM, COMPLETE_WARPS = 8, None
ATTEND_CHUNK, ATTEND_WARPS = 16, 2


@dataclasses.dataclass(frozen=True)
class StepState:
    """A TTT-cache layer's streaming tensors a one-token step reads and writes in place: the open
    block ek, ev [B, H, b, Dh], eeta [B, H, b] and its count ecount [B], the update count updates
    [B], the compressor's offsets ds (d1 [B, hc, Dh, m], ..., dL) and momenta moms (the same, or
    None without momentum), the read of the current state vk, vv [B, H, M, Dh]."""

    ek: torch.Tensor
    ev: torch.Tensor
    eeta: torch.Tensor
    ecount: torch.Tensor
    updates: torch.Tensor
    ds: tuple
    moms: tuple | None
    vk: torch.Tensor
    vv: torch.Tensor


@dataclasses.dataclass(frozen=True)
class StepWeights:
    """A TTT-cache layer's parameters a step reads: the compressor's initial state inits (W1
    [hc, Dh, m], ..., WL [hc, m, Dh]); probes [H, M, Dh] (not normalised); the step-size gate lr_w
    [H, Dh], lr_b [H]; the virtual keys vkeys [H, M, Dh] and their projection vkey_proj
    [H, Dh, Dh]; the learned forgetting forget_w [hc, Dh], forget_b [hc] (None: a constant)."""

    inits: tuple
    probes: torch.Tensor
    lr_w: torch.Tensor
    lr_b: torch.Tensor
    vkeys: torch.Tensor
    vkey_proj: torch.Tensor
    forget_w: torch.Tensor | None = None
    forget_b: torch.Tensor | None = None


def evict_supports(state: StepState, weights: StepWeights) -> bool:
    """Where ``evict_step`` runs: no gradients, a per-head depth-2 compressor with a constant
    decay, fp32 state, powers of two >= 16 for the head and hidden widths and the block, <= 16
    virtual tokens, weights of at most ``ttt_cache_triton.MAX_WEIGHTS`` entries, tensors a kernel
    may take (``impl.kernel_runs``)."""
    if torch.is_grad_enabled() or impl.reference("step") or not impl.kernel_runs(state.ek):
        return False
    if len(state.ds) != 2 or weights.forget_w is not None:
        return False
    (_, hc, Dh, m), (H, block) = state.ds[0].shape, state.ek.shape[1:3]
    return (
        hc == H
        and state.ek.dtype == torch.float32
        and state.vk.shape[2] <= 16
        and Dh * m <= tct.MAX_WEIGHTS
        and impl.powers_of_two(Dh, m, block)
    )


if triton is not None:

    @triton.jit
    def _append_kernel(
        kraw,
        cv,
        valid,
        ek,
        ev,
        eeta,
        ecount,
        updates,
        arrive,
        lr_w,
        lr_b,
        rows,
        nrows,
        eta_scale,
        H: tl.constexpr,
        BLK: tl.constexpr,
        DH: tl.constexpr,
    ):
        """Program (row, head): the evicted key normalised, its step size, both written to the
        open block's first free slot; the row's last program moves its counters and, when the
        block completes, appends the row to ``rows`` (``nrows`` of them)."""
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
        tl.debug_barrier()  # every thread's reads of ecount and valid come before the release below
        if tl.atomic_add(arrive + bi, 1) == H - 1:  # the row's last program (all have read ecount)
            tl.store(arrive + bi, 0)
            tl.store(ecount + bi, tl.where(ok, (e + 1) % BLK, e))
            tl.store(updates + bi, tl.load(updates + bi) + done.to(tl.int64))
            if done:
                tl.store(rows + tl.atomic_add(nrows, 1), bi)

    @triton.jit
    def _complete_rows_kernel(
        rows,
        nrows,
        finished,
        ek,
        ev,
        eeta,
        d1,
        d2,
        m1,
        m2,
        w1i,
        w2i,
        probes,
        vkeys,
        vproj,
        cos,
        sin,
        vk,
        vv,
        decay,
        momentum,
        max_norm,
        P,
        H: tl.constexpr,
        BLK: tl.constexpr,
        CH: tl.constexpr,
        KC: tl.constexpr,
        DH: tl.constexpr,
        MH: tl.constexpr,
        M: tl.constexpr,
        MP: tl.constexpr,
        HAS_MOM: tl.constexpr,
        HAS_DECAY: tl.constexpr,
        ROTATE: tl.constexpr,
    ):
        """Program (p, head) for p < P (a runtime value: one compilation for every batch): for
        the rows p, p + P, ... of the ``nrows`` listed in ``rows`` (those whose block completed),
        one compressor step on the block and its read cached as virtual tokens (V_m = f_θ(p̂_m),
        K_m = key_m + V_m A, RoPE at the relative offsets). The last program to finish empties
        the list."""
        p, h = tl.program_id(0), tl.program_id(1)
        rd, rp = tl.arange(0, DH), tl.arange(0, MP)
        sel = rp[:, None] < M
        n = tl.load(nrows)
        for i in tl.range(p, n, P, num_stages=1):  # not pipelined: one row at a time
            g = tl.load(rows + i) * H + h
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
            # K = key + V A, RoPE at the relative offsets, in column chunks of KC so that only a
            # [DH, KC] slice of A is held at a time; interleaved pairs stay inside a chunk:
            # out[2i] = x[2i] c_i - x[2i+1] s_i, out[2i+1] = x[2i] s_i + x[2i+1] c_i. A loop, not
            # unrolled: unrolled, ptxas gave the kernel 32 registers and a 7 KB stack
            for c0 in tl.range(0, DH, KC, num_stages=1):
                rc = c0 + tl.arange(0, KC)
                k = tl.load(
                    vkeys + h * M * DH + rp[:, None] * DH + rc[None, :], mask=sel, other=0.0
                ).to(tl.float32)
                k += tl.dot(
                    v,
                    tl.load(vproj + h * DH * DH + rd[:, None] * DH + rc[None, :]).to(tl.float32),
                    input_precision="ieee",
                )  # [MP, KC]
                if ROTATE:
                    ke, ko = tl.split(tl.reshape(k, (MP, KC // 2, 2)))  # even, odd columns
                    ci = rp[:, None] * (DH // 2) + (c0 // 2 + tl.arange(0, KC // 2))[None, :]
                    c = tl.load(cos + ci, mask=sel, other=1.0).to(tl.float32)
                    s = tl.load(sin + ci, mask=sel, other=0.0).to(tl.float32)
                    k = tl.reshape(tl.join(ke * c - ko * s, ke * s + ko * c), (MP, KC))
                tl.store(vk + g * M * DH + rp[:, None] * DH + rc[None, :], k, mask=sel)
            tl.store(vv + g * M * DH + rp[:, None] * DH + rd[None, :], v, mask=sel)
        tl.debug_barrier()  # every thread has read nrows before the release below
        if tl.atomic_add(finished, 1) == P * H - 1:  # the last program: every other one is done
            tl.store(nrows, 0)
            tl.store(finished, 0)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def complete_programs(device: torch.device, heads: int, rows: int) -> int:
    """Programs per head of the block-completion kernel: about ``COMPLETE_PER_SM`` per streaming
    multiprocessor over all heads (the interpreter: 2), never more than the rows."""
    if device.type != "cuda":
        return max(1, min(rows, 2))
    return max(1, min(rows, -(-COMPLETE_PER_SM * _multiprocessors(device) // heads)))


def vkey_chunk(head_dim: int) -> int:
    """Columns of the virtual keys the completion kernel forms at a time: ``VKEY_CHUNK``, at most
    the head width."""
    return min(head_dim, VKEY_CHUNK)


def _buffers(dev: torch.device, B: int) -> tuple:
    """The step's counters for B rows on this device and stream (zero between launches, so
    launches in stream order share them): per-row arrivals, the list of rows whose block completed
    and its length, and the completion kernel's finished programs."""
    key = (dev, torch.cuda.current_stream(dev).cuda_stream if dev.type == "cuda" else 0, B)
    if key not in _counters:
        z = lambda n: torch.zeros(n, dtype=torch.int32, device=dev)
        _counters[key] = (z(B), z(B), z(1), z(1))
    return _counters[key]


def evict_step(
    cand_k: torch.Tensor,
    cand_v: torch.Tensor,
    valid: torch.Tensor,
    state: StepState,
    weights: StepWeights,
    rot,
    *,
    eta_scale: float,
    decay: float,
    momentum: float,
    max_norm: float,
) -> None:
    """One evicted token per row into the open block, in place on ``state``: cand_k (before RoPE),
    cand_v [B, H, 1, Dh], valid [B]; rot the (cos, sin) [M, Dh/2] of the virtual keys' offsets
    (None: no rotation); η_t = eta_scale σ(k̂·lr_w + lr_b). ``evict_supports`` must hold.

    Two launches: ``_append_kernel``, a light program per (row, head) every step, lists the rows
    whose block completes; ``_complete_rows_kernel``, a fixed grid (``complete_programs``), updates
    the listed rows' compressors. The heavy update's registers and shared memory then bound the
    occupancy of that kernel only, and its work follows the rows that complete, not the batch."""
    B, H, _, Dh = cand_k.shape
    block, M, m = state.ek.shape[2], state.vk.shape[2], state.ds[0].shape[-1]
    dev = cand_k.device
    arrive, rows, nrows, finished = _buffers(dev, B)
    flat = lambda t: t.flatten(0, 1)
    moms = state.moms if momentum else state.ds
    cos, sin = rot if rot is not None else (state.ek, state.ek)  # unread without rotation
    c = lambda t: t if t.is_contiguous() else t.contiguous()
    w = weights
    _append_kernel[(B, H)](
        c(cand_k),
        c(cand_v),
        c(valid),
        state.ek,
        state.ev,
        state.eeta,
        state.ecount,
        state.updates,
        arrive,
        w.lr_w,
        w.lr_b,
        rows,
        nrows,
        eta_scale,
        H=H,
        BLK=block,
        DH=Dh,
        num_warps=1 if Dh <= 128 else 2,
    )
    P = complete_programs(dev, H, B)
    _complete_rows_kernel[(P, H)](
        rows,
        nrows,
        finished,
        state.ek,
        state.ev,
        state.eeta,
        flat(state.ds[0]),
        flat(state.ds[1]),
        flat(moms[0]),
        flat(moms[1]),
        w.inits[0],
        w.inits[1],
        w.probes,
        w.vkeys,
        w.vkey_proj,
        cos,
        sin,
        state.vk,
        state.vv,
        float(decay),
        float(momentum),
        float(max_norm),
        P,
        H=H,
        BLK=block,
        CH=min(block, 32),
        KC=vkey_chunk(Dh),
        DH=Dh,
        MH=m,
        M=M,
        MP=max(16, 1 << math.ceil(math.log2(M))),
        HAS_MOM=bool(momentum),
        HAS_DECAY=bool(decay),
        ROTATE=rot is not None,
        num_warps=COMPLETE_WARPS or (4 if Dh * m <= 4096 else 8),
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
        WC: tl.constexpr,
        DH: tl.constexpr,
        M: tl.constexpr,
        MP: tl.constexpr,
        GATE: tl.constexpr,
        DECAY: tl.constexpr,
    ):
        """Program (row, head). The window in chunks of WC slots with a running softmax (max m,
        sum l, output acc rescaled by e^(m_old - m_new)), so a program holds one chunk of keys
        and values at a time; then the virtual tokens, and the two mixed."""
        bi, h = tl.program_id(0), tl.program_id(1)
        g = bi * H + h
        rd, rc, rm = tl.arange(0, DH), tl.arange(0, WC), tl.arange(0, MP)
        qv = tl.load(q + g * DH + rd).to(tl.float32)
        m_r = tl.max(tl.full((WC,), float("-inf"), tl.float32), 0)
        l_r = tl.sum(tl.zeros((WC,), tl.float32), 0)
        acc = tl.zeros((DH,), tl.float32)
        for c in tl.range(0, W, WC, num_stages=1):
            rw = c + rc
            inw = rw < W
            k = tl.load(rk + (g * W + rw[:, None]) * DH + rd[None, :], mask=inw[:, None], other=0.0)
            s = tl.sum(k.to(tl.float32) * qv[None, :], 1) * scale  # [WC]
            # the ring after this step's write: empty slots (position -1) masked
            s = tl.where(
                inw & (tl.load(kpos + bi * W + rw, mask=inw, other=-1) >= 0), s, -float("inf")
            )
            m_new = tl.maximum(m_r, tl.max(s, 0))
            base = tl.where(m_new == -float("inf"), 0.0, m_new)  # a chunk of empty slots only
            p = tl.exp(s - base)
            r = tl.exp(m_r - base)
            v = tl.load(rv + (g * W + rw[:, None]) * DH + rd[None, :], mask=inw[:, None], other=0.0)
            acc = acc * r + tl.sum(p[:, None] * v.to(tl.float32), 0)
            l_r = l_r * r + tl.sum(p, 0)
            m_r = m_new
        # the virtual tokens, scored by the query before RoPE
        inm = rm < M
        kv = tl.load(
            vk + (g * M + rm[:, None]) * DH + rd[None, :], mask=inm[:, None], other=0.0
        ).to(tl.float32)
        sv = tl.sum(kv * tl.load(qr + g * DH + rd).to(tl.float32)[None, :], 1) * scale  # [MP]
        if DECAY:  # token m weighted by exp(-γ m), γ = softplus(recency)
            rec = tl.load(recency + h).to(tl.float32)
            gamma = tl.maximum(rec, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(rec)))
            sv -= gamma * rm.to(tl.float32)
        sv = tl.where(inm, sv, float("-inf"))
        vv_ = tl.load(
            vv + (g * M + rm[:, None]) * DH + rd[None, :], mask=inm[:, None], other=0.0
        ).to(tl.float32)
        on = tl.load(has + bi) != 0
        if GATE:  # "gate": α softmax(window) + (1 - α) softmax(virtual); α = 1 without a read
            ev = tl.exp(sv - tl.max(sv, 0))
            o_v = tl.sum(ev[:, None] * vv_, 0) / tl.sum(ev, 0)
            a = 1.0 / (1.0 + tl.exp(-tl.load(gate + h).to(tl.float32)))
            a = tl.where(on, a, 1.0)
            o = a * (acc / l_r) + (1.0 - a) * o_v
        else:  # "concat": one softmax over window and virtual keys
            sv = tl.where(on, sv, float("-inf"))
            mx = tl.maximum(m_r, tl.max(sv, 0))
            ev = tl.exp(sv - mx)
            r = tl.exp(m_r - mx)
            o = (acc * r + tl.sum(ev[:, None] * vv_, 0)) / (l_r * r + tl.sum(ev, 0))
        tl.store(out + g * DH + rd, o)


def attend_supports(ring_k: torch.Tensor, num_virtual: int) -> bool:
    """Where ``attend_one`` runs: no gradients, tensors a kernel may take, a power-of-two head
    width of at most 256 and at most 16 virtual tokens (a program holds [16, head width] tiles;
    the ring, of any length, passes through in chunks). (A constant gate per head and no query
    read: the caller's.)"""
    if torch.is_grad_enabled() or impl.reference("step") or not impl.kernel_runs(ring_k):
        return False
    Dh = ring_k.shape[-1]
    return num_virtual <= 16 and impl.powers_of_two(Dh) and Dh <= 256


def attend_one(
    q: torch.Tensor,
    q_raw: torch.Tensor,
    ring_k: torch.Tensor,
    ring_v: torch.Tensor,
    kpos: torch.Tensor,
    vk: torch.Tensor,
    vv: torch.Tensor,
    has: torch.Tensor,
    gate: torch.Tensor,
    recency: torch.Tensor,
    *,
    scale: float,
    gated: bool,
    recency_bias: bool,
) -> torch.Tensor:
    """A one-token step's attention output [B, H, 1, Dh] (fp32): q (after RoPE), q_raw [B, H, 1,
    Dh] against the ring ring_k, ring_v [B, H, W, Dh] at kpos [B, W] (-1: empty) and the virtual
    tokens vk, vv [B, H, M, Dh] of the rows with has [B]; logits times ``scale``. ``gated``:
    α softmax(window) + (1 - α) softmax(virtual), α = σ(gate) [H]; else one softmax over both.
    ``recency_bias``: virtual token m's logit minus softplus(recency) m. ``attend_supports`` must
    hold."""
    B, H, _, Dh = q.shape
    W, M = ring_k.shape[2], vk.shape[2]
    out = torch.empty(B, H, 1, Dh, device=q.device, dtype=torch.float32)
    c = lambda t: t if t.is_contiguous() else t.contiguous()
    _attend_kernel[(B, H)](
        c(q),
        c(q_raw),
        ring_k,
        ring_v,
        kpos,
        c(vk),
        c(vv),
        c(has),
        gate,
        recency,
        out,
        scale,
        H=H,
        W=W,
        WC=ATTEND_CHUNK,
        DH=Dh,
        M=M,
        MP=max(16, 1 << math.ceil(math.log2(M))),
        GATE=gated,
        DECAY=recency_bias,
        num_warps=ATTEND_WARPS,
    )
    return out
