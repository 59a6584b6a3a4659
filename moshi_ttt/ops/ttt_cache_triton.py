"""``ops.ttt_cache.complete_block`` as one Triton kernel: a program per compressor, and a program
whose row completes no block returns at once (a streaming step pays for the rows that update).

The math is ``complete_block``'s (its reference, same signature): the block's gradient step at
the block-start state with NLMS step sizes, momentum, forgetting, the norm cap, and the read
f_θ(p̂_m) of the new state; fp32 throughout (products in IEEE fp32). Depth 2 only; ``supports``
says which shapes run here.
"""

from __future__ import annotations

import math

import torch

from . import impl

triton, tl = impl.triton, impl.tl
# Dh x hidden: IEEE products stage their operands in shared memory (~8 Dh m bytes)
MAX_WEIGHTS = 16384


def available() -> bool:
    return triton is not None


def supports(ds, x, probes) -> bool:
    """Depth 2, fp32, powers of two >= 16 for the head and hidden widths and the block, <= 16
    probes, at most ``MAX_WEIGHTS`` entries per weight (the per-block shared memory of an H100);
    tensors a kernel may take (``impl.kernel_runs``)."""
    if triton is None or len(ds) != 2 or x.dtype != torch.float32 or probes.shape[1] > 16:
        return False
    if not impl.kernel_runs(x):
        return False
    Dh, m, b = ds[0].shape[1], ds[0].shape[2], x.shape[1]
    return Dh * m <= MAX_WEIGHTS and impl.powers_of_two(Dh, m, b)


if triton is not None:

    @triton.jit
    def _gelu(h):
        return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))

    @triton.jit
    def _gelu_grad(h):
        return (
            0.5 * (1.0 + tl.erf(h * 0.7071067811865476))
            + h * tl.exp(-0.5 * h * h) * 0.3989422804014327
        )

    @triton.jit
    def _update_read(
        d1,
        d2,
        m1,
        m2,
        w1i,
        w2i,
        x,
        y,
        eta,
        probes,
        g,
        h,
        decay,
        momentum,
        max_norm,
        BLK: tl.constexpr,
        CH: tl.constexpr,
        DH: tl.constexpr,
        MH: tl.constexpr,
        M: tl.constexpr,
        MP: tl.constexpr,
        HAS_MOM: tl.constexpr,
        HAS_DECAY: tl.constexpr,
        NORM_P: tl.constexpr,
    ):
        """Compressor g (initial state h): one step on its block x, y [BLK, DH], eta [BLK] (state
        and momenta updated in place), then the read f_θ(p̂_m) of the new state: [MP, DH] (rows
        >= M zero probes). ``NORM_P``: normalise the probes here."""
        rd, rm = tl.arange(0, DH), tl.arange(0, MH)
        i1 = rd[:, None] * MH + rm[None, :]  # [DH, MH]
        i2 = rm[:, None] * DH + rd[None, :]  # [MH, DH]
        w10 = tl.load(w1i + h * DH * MH + i1).to(tl.float32)
        w20 = tl.load(w2i + h * MH * DH + i2).to(tl.float32)
        w1 = w10 + tl.load(d1 + g * DH * MH + i1)
        w2 = w20 + tl.load(d2 + g * MH * DH + i2)
        g1 = tl.zeros((DH, MH), dtype=tl.float32)  # -Σ η_t ∂ℓ_t/∂W1
        g2 = tl.zeros((MH, DH), dtype=tl.float32)
        for c in range(0, BLK, CH):
            rt = c + tl.arange(0, CH)
            xc = tl.load(x + g * BLK * DH + rt[:, None] * DH + rd[None, :])  # [CH, DH]
            yc = tl.load(y + g * BLK * DH + rt[:, None] * DH + rd[None, :])
            ec = tl.load(eta + g * BLK + rt)  # [CH]
            hh = tl.dot(xc, w1, input_precision="ieee")  # [CH, MH]
            a = _gelu(hh)
            err = tl.dot(a, w2, input_precision="ieee") - yc  # [CH, DH]
            gg = err * (ec / (1.0 + tl.sum(a * a, 1)))[:, None]  # NLMS step sizes
            g2 -= tl.dot(tl.trans(a), gg, input_precision="ieee")
            gh = tl.dot(gg, tl.trans(w2), input_precision="ieee") * _gelu_grad(hh)
            g1 -= tl.dot(tl.trans(xc), gh, input_precision="ieee")
        if HAS_MOM:
            g1 = momentum * tl.load(m1 + g * DH * MH + i1) + g1
            g2 = momentum * tl.load(m2 + g * MH * DH + i2) + g2
            tl.store(m1 + g * DH * MH + i1, g1)
            tl.store(m2 + g * MH * DH + i2, g2)
        w1 = w1 + g1
        w2 = w2 + g2
        if HAS_DECAY:
            w1 = w10 + (1.0 - decay) * (w1 - w10)
            w2 = w20 + (1.0 - decay) * (w2 - w20)
        n1 = tl.sqrt(tl.sum(tl.sum(w1 * w1, 1), 0))
        n2 = tl.sqrt(tl.sum(tl.sum(w2 * w2, 1), 0))
        w1 = w1 * tl.minimum(max_norm / tl.maximum(n1, 1e-12), 1.0)
        w2 = w2 * tl.minimum(max_norm / tl.maximum(n2, 1e-12), 1.0)
        tl.store(d1 + g * DH * MH + i1, w1 - w10)
        tl.store(d2 + g * MH * DH + i2, w2 - w20)
        rp = tl.arange(0, MP)
        p = tl.load(
            probes + h * M * DH + rp[:, None] * DH + rd[None, :], mask=rp[:, None] < M, other=0.0
        )
        p = p.to(tl.float32)
        if NORM_P:  # F.normalize: p / max(‖p‖, 1e-12)
            p = p / tl.maximum(tl.sqrt(tl.sum(p * p, 1)), 1e-12)[:, None]
        # [MP, DH]
        return tl.dot(_gelu(tl.dot(p, w1, input_precision="ieee")), w2, input_precision="ieee")

    @triton.jit
    def _complete_kernel(
        d1,
        d2,
        m1,
        m2,
        w1i,
        w2i,
        x,
        y,
        eta,
        done,
        probes,
        vout,
        decay,
        momentum,
        max_norm,
        HC: tl.constexpr,
        BLK: tl.constexpr,
        CH: tl.constexpr,
        DH: tl.constexpr,
        MH: tl.constexpr,
        M: tl.constexpr,
        MP: tl.constexpr,
        HAS_MOM: tl.constexpr,
        HAS_DECAY: tl.constexpr,
    ):
        g = tl.program_id(0)
        if tl.load(done + g) == 0:
            return
        v = _update_read(
            d1,
            d2,
            m1,
            m2,
            w1i,
            w2i,
            x,
            y,
            eta,
            probes,
            g,
            g % HC,
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
            False,
        )
        rd, rp = tl.arange(0, DH), tl.arange(0, MP)
        tl.store(vout + g * M * DH + rp[:, None] * DH + rd[None, :], v, mask=rp[:, None] < M)


def complete_block(
    ds,
    moms,
    inits,
    x,
    y,
    eta,
    done,
    probes,
    *,
    decay: float = 0.0,
    momentum: float = 0.0,
    max_norm: float = 100.0,
) -> torch.Tensor:
    """Triton form of ``ops.ttt_cache.complete_block`` (same arguments; ``supports`` must hold).
    Rows without ``done`` keep their state and get an unspecified read (select it away)."""
    G, b, Dh = x.shape
    HC, M, m = inits[0].shape[0], probes.shape[1], ds[0].shape[2]
    d1, d2 = ds
    for t in (d1, d2, x, y, eta, *(moms or ())):
        if not t.is_contiguous():
            raise ValueError(
                "complete_block (Triton) updates its state in place: pass contiguous tensors"
            )
    m1, m2 = moms if moms is not None else (d1, d2)  # unread without momentum
    vout = torch.empty(G, M, Dh, device=x.device, dtype=torch.float32)
    ch = min(b, 32)
    _complete_kernel[(G,)](
        d1,
        d2,
        m1,
        m2,
        inits[0].float().contiguous(),
        inits[1].float().contiguous(),
        x,
        y,
        eta.contiguous(),
        done.to(torch.int32).contiguous(),
        probes.float().contiguous(),
        vout,
        float(decay),
        float(momentum),
        float(max_norm),
        HC=HC,
        BLK=b,
        CH=ch,
        DH=Dh,
        MH=m,
        M=M,
        MP=max(16, 1 << math.ceil(math.log2(M))),
        HAS_MOM=moms is not None and bool(momentum),
        HAS_DECAY=bool(decay),
        num_warps=4 if Dh * m <= 4096 else 8,
    )
    return vout
