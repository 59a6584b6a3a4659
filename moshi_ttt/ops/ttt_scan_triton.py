"""``ops.ttt_cache.scan_states`` (the training path's compressor scan) as Triton kernels with a
hand-written backward: a launch per block, of a program per (compressor, token chunk).

Forward, per block n (``scan_step``), one launch (``_fwd_block``): each chunk's share of the NLMS
gradient step Δ_n at θ_n; the compressor's last chunk program to arrive (an atomic counter) then
adds the shares up: momentum S_{n+1} = β S_n + Δ_n, U_n = θ_n + S_{n+1} (or + Δ_n), forgetting
U ← A + (1 − λ)(U − A) and the cap θ_{n+1} = c_n U_n, c_n = min(1, R / ‖U_n‖). Every θ_n and c_n is
kept for the backward, which walks the blocks in reverse with dθ, the gradient of θ_{n+1}
(``_states``: for k = N in a launch of its own, for k = n in the last chunk program of block n's):
    dU = c (dθ − θ' (θ'·dθ) / ‖θ'‖²) if c < 1 else dθ   (θ' = θ_{n+1} = c U)
    dA += λ dU,  dV = (1 − λ) dU,  dΔ = dV (+ dS with momentum; dS ← β (dS + dV))
and the vector-Jacobian product of the block step Δ(θ, X, Y, η) chunk by chunk (``_bwd_block``:
second order through gelu and the NLMS normaliser, recomputing the activations): N + 1 launches.
Depth 2, fp32 state; the forward's products as three TF32 products (fp32 accuracy), the backward's
likewise or in TF32 (``grad_precision``); ``supports`` says which shapes run here.
"""

from __future__ import annotations

import torch

from . import impl
from . import ttt_cache_triton as tct

NUM_WARPS, CHUNK = 8, 32  # the forward's (compressor, chunk) programs: warps, tokens
GRAD_WARPS, GRAD_CHUNK = 8, 16  # the backward's (as fast as measured on an H100: docs/results/)
STATE_WARPS = 8  # the backward's first launch, a program per compressor
# Dh x hidden, as large as measured on an H100 (its operands sit in shared memory)
MAX_WEIGHTS = 8192
PRECISION = "tf32x3"  # tl.dot's input precision in the forward: three TF32 products, fp32 accuracy
# the backward's, by ``MemoryConfig.grad_precision``
GRAD_PRECISION = {"fp32": "tf32x3", "tf32": "tf32"}
GRAPH_MIN_BLOCKS = 8  # launch loops of at least this many blocks replay as a captured CUDA graph
GRAPH_CACHE = 8  # captured launch loops kept (forward and backward of the most recent shapes)
triton, tl = tct.triton, (tct.tl if tct.triton is not None else None)
_graphs: dict = {}


def launched(key, args: tuple, loop, replay: bool, mutated: tuple = ()):
    """``loop(*args)`` -> outputs, a loop of kernel launches whose host time would exceed its GPU
    time, replayed (``replay``) as one CUDA graph: captured once per ``key`` (with the args'
    shapes: whatever else the loop depends on, its scalar arguments and launch settings) on
    copies of ``args``, then each call copies ``args`` in and clones the outputs out. Runs the loop
    directly without ``replay``, on CPU tensors and inside another capture; there it hands the
    loop copies of the args at the positions ``mutated`` (those it writes in place), so the
    caller's tensors are never written either way."""
    if not (replay and args[0].is_cuda) or torch.cuda.is_current_stream_capturing():
        return loop(*(a.clone() if i in mutated else a for i, a in enumerate(args)))
    key = (args[0].device, *key, *((tuple(a.shape), a.dtype) for a in args))
    entry = _graphs.pop(key, None)
    if entry is None:
        static = tuple(a.clone() for a in args)
        side = torch.cuda.Stream(args[0].device)
        side.wait_stream(torch.cuda.current_stream(args[0].device))
        with torch.cuda.stream(side):  # compile and warm up outside the capture
            loop(*static)
        torch.cuda.current_stream(args[0].device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = loop(*static)
        entry = (graph, static, out)
        while len(_graphs) >= GRAPH_CACHE:
            _graphs.pop(next(iter(_graphs)))
    _graphs[key] = entry  # most recent last
    graph, static, out = entry
    for s, a in zip(static, args):
        s.copy_(a)
    graph.replay()
    return tuple(o.clone() for o in out)


def supports(ds, keys) -> bool:
    """Depth 2, fp32, powers of two >= 16 for the head and hidden widths and the block, weights of
    at most ``MAX_WEIGHTS`` entries, tensors a kernel may take (``impl.kernel_runs``)."""
    if triton is None or len(ds) != 2 or keys.dtype != torch.float32 or keys.dim() != 4:
        return False
    if not impl.kernel_runs(keys):
        return False
    Dh, m, b = ds[0].shape[-2], ds[0].shape[-1], keys.shape[2]
    return Dh * m <= MAX_WEIGHTS and impl.powers_of_two(Dh, m, b)


if triton is not None:
    _gelu, _gelu_grad = tct._gelu, tct._gelu_grad

    @triton.jit
    def _gelu_grad2(h):
        """d² gelu / dh² = φ(h) (2 − h²)."""
        return tl.exp(-0.5 * h * h) * 0.3989422804014327 * (2.0 - h * h)

    @triton.jit
    def _idx(DH: tl.constexpr, MH: tl.constexpr):
        rd, rm = tl.arange(0, DH), tl.arange(0, MH)
        # W1 [DH, MH], W2 [MH, DH]
        return rd, rd[:, None] * MH + rm[None, :], rm[:, None] * DH + rd[None, :]

    @triton.jit
    def _chunk(
        st1,
        st2,
        x,
        y,
        eta,
        g,
        n,
        N,
        c,
        BLK: tl.constexpr,
        CH: tl.constexpr,
        DH: tl.constexpr,
        MH: tl.constexpr,
        PREC: tl.constexpr,
    ):
        """A chunk's tokens and the forward of the block step at θ_n on them."""
        rd, i1, i2 = _idx(DH, MH)
        SZ = DH * MH
        w1 = tl.load(st1 + (g * (N + 1) + n) * SZ + i1)
        w2 = tl.load(st2 + (g * (N + 1) + n) * SZ + i2)
        rt = (g * N + n) * BLK + c * CH + tl.arange(0, CH)
        xc = tl.load(x + rt[:, None] * DH + rd[None, :])  # [CH, DH]
        yc = tl.load(y + rt[:, None] * DH + rd[None, :])
        ec = tl.load(eta + rt)  # [CH]
        hh = tl.dot(xc, w1, input_precision=PREC)  # [CH, MH]
        a = _gelu(hh)
        err = tl.dot(a, w2, input_precision=PREC) - yc  # [CH, DH]
        rr = 1.0 / (1.0 + tl.sum(a * a, 1))  # NLMS: η_t / (1 + ‖a_t‖²)
        return w1, w2, rt, xc, ec, hh, a, err, rr

    @triton.jit
    def _last_of(count, g, NC: tl.constexpr):
        """After this program's stores: whether it is the last of compressor g's NC chunk programs
        to
        arrive (that one resets the counter and reads the others' parts)."""
        tl.debug_barrier()  # every thread's stores come before the release below
        last = tl.atomic_add(count + g, 1) == NC - 1
        if last:
            tl.store(count + g, 0)
        return last

    @triton.jit
    def _update(
        st,
        s,
        a0,
        part,
        cap,
        g,
        n,
        N,
        on,
        decay,
        momentum,
        max_norm,
        idx,
        NC: tl.constexpr,
        R: tl.constexpr,
        C: tl.constexpr,
        HAS_MOM: tl.constexpr,
        HAS_DECAY: tl.constexpr,
        WHICH: tl.constexpr,
    ):
        """One weight matrix [R, C] of compressor g: θ_{n+1} from θ_n and the chunks' parts of Δ_n
        (momentum, forgetting, the cap); stores θ_{n+1} and c_n."""
        SZ = R * C
        w = tl.load(st + (g * (N + 1) + n) * SZ + idx)
        cf = max_norm * 0.0 + 1.0  # an fp32 scalar: 1 without an update or under the cap
        if on:
            d = tl.zeros((R, C), dtype=tl.float32)
            for c in range(NC):
                d += tl.load(part + (g * NC + c) * SZ + idx, cache_modifier=".cg")
            if HAS_MOM:
                d = momentum * tl.load(s + g * SZ + idx) + d
                tl.store(s + g * SZ + idx, d)
            w = w + d
            if HAS_DECAY:
                w0 = tl.load(a0 + g * SZ + idx)
                w = w0 + (1.0 - decay) * (w - w0)
            cf = tl.minimum(max_norm / tl.maximum(tl.sqrt(tl.sum(tl.sum(w * w, 1), 0)), 1e-12), 1.0)
            w = w * cf
        tl.store(cap + (g * N + n) * 2 + WHICH, cf)
        tl.store(st + (g * (N + 1) + n + 1) * SZ + idx, w)

    @triton.jit(do_not_specialize=["n", "N"])
    def _fwd_block(
        st1,
        st2,
        x,
        y,
        eta,
        part1,
        part2,
        loss,
        s1,
        s2,
        a1,
        a2,
        apply,
        cap,
        count,
        n,
        N,
        decay,
        momentum,
        max_norm,
        BLK: tl.constexpr,
        CH: tl.constexpr,
        NC: tl.constexpr,
        DH: tl.constexpr,
        MH: tl.constexpr,
        PREC: tl.constexpr,
        HAS_MOM: tl.constexpr,
        HAS_DECAY: tl.constexpr,
    ):
        """Block n: each chunk's part of Δ_n at θ_n, then (the compressor's last chunk program)
        θ_{n+1}."""
        g, c = tl.program_id(0).to(tl.int64), tl.program_id(1)
        w1, w2, rt, xc, ec, hh, a, err, rr = _chunk(
            st1, st2, x, y, eta, g, n, N, c, BLK, CH, DH, MH, PREC
        )
        _, i1, i2 = _idx(DH, MH)
        tl.store(loss + rt, 0.5 * tl.sum(err * err, 1))
        gg = err * (ec * rr)[:, None]
        gh = tl.dot(gg, tl.trans(w2), input_precision=PREC) * _gelu_grad(hh)
        p = (g * NC + c) * DH * MH
        # this chunk's Δ1, Δ2
        tl.store(part1 + p + i1, -tl.dot(tl.trans(xc), gh, input_precision=PREC))
        tl.store(part2 + p + i2, -tl.dot(tl.trans(a), gg, input_precision=PREC))
        if _last_of(count, g, NC):
            on = tl.load(apply + g * N + n) != 0
            _update(
                st1,
                s1,
                a1,
                part1,
                cap,
                g,
                n,
                N,
                on,
                decay,
                momentum,
                max_norm,
                i1,
                NC,
                DH,
                MH,
                HAS_MOM,
                HAS_DECAY,
                0,
            )
            _update(
                st2,
                s2,
                a2,
                part2,
                cap,
                g,
                n,
                N,
                on,
                decay,
                momentum,
                max_norm,
                i2,
                NC,
                MH,
                DH,
                HAS_MOM,
                HAS_DECAY,
                1,
            )

    @triton.jit
    def _state(
        st,
        cap,
        apply,
        dst,
        accp,
        ddp,
        ds,
        da,
        part,
        g,
        k,
        N,
        bptt,
        decay,
        momentum,
        idx,
        NC: tl.constexpr,
        R: tl.constexpr,
        C: tl.constexpr,
        HAS_MOM: tl.constexpr,
        HAS_DECAY: tl.constexpr,
        WHICH: tl.constexpr,
    ):
        """One weight matrix [R, C] of compressor g. dθ_k = (block k's direct part and its chunks'
        parts) cut by truncated BPTT, plus the read's gradient dst[k] (written back there); then,
        for k > 0, block k - 1's cap, forgetting and momentum backward: dΔ into dd, the direct part
        into acc."""
        SZ = R * C
        acc = tl.zeros((R, C), dtype=tl.float32)
        if k < N:
            acc = tl.load(accp + g * SZ + idx)
            if tl.load(apply + g * N + k) != 0:
                for c in range(NC):
                    acc += tl.load(part + (g * NC + c) * SZ + idx, cache_modifier=".cg")
        # θ_k, S_k enter block k detached
        if (bptt > 0) & (k > 0) & (k < N) & (k % tl.maximum(bptt, 1) == 0):
            acc = tl.zeros((R, C), dtype=tl.float32)
            if HAS_MOM:
                tl.store(ds + g * SZ + idx, tl.zeros((R, C), dtype=tl.float32))
        acc += tl.load(dst + (g * (N + 1) + k) * SZ + idx)
        tl.store(dst + (g * (N + 1) + k) * SZ + idx, acc)  # the final dθ_k
        if k > 0:
            j = k - 1
            if tl.load(apply + g * N + j) != 0:
                cf = tl.load(cap + (g * N + j) * 2 + WHICH)
                if cf < 1.0:
                    wn = tl.load(st + (g * (N + 1) + k) * SZ + idx)
                    proj = tl.sum(tl.sum(wn * acc, 1), 0) / tl.sum(tl.sum(wn * wn, 1), 0)
                    acc = cf * (acc - wn * proj)
                if HAS_DECAY:  # U = A + (1 - λ)(V - A)
                    tl.store(da + g * SZ + idx, tl.load(da + g * SZ + idx) + decay * acc)
                    acc = (1.0 - decay) * acc
                if HAS_MOM:  # S' = β S + Δ, V = θ + S'
                    dd = tl.load(ds + g * SZ + idx) + acc
                    tl.store(ds + g * SZ + idx, momentum * dd)
                else:
                    dd = acc
                tl.store(ddp + g * SZ + idx, dd)
            # dθ_j's direct part (all of it when block j is skipped)
            tl.store(accp + g * SZ + idx, acc)

    @triton.jit
    def _states(
        st1,
        st2,
        cap,
        apply,
        dst1,
        dst2,
        acc1p,
        acc2p,
        dd1p,
        dd2p,
        ds1,
        ds2,
        da1,
        da2,
        part1,
        part2,
        g,
        k,
        N,
        bptt,
        decay,
        momentum,
        NC: tl.constexpr,
        DH: tl.constexpr,
        MH: tl.constexpr,
        HAS_MOM: tl.constexpr,
        HAS_DECAY: tl.constexpr,
    ):
        _, i1, i2 = _idx(DH, MH)
        _state(
            st1,
            cap,
            apply,
            dst1,
            acc1p,
            dd1p,
            ds1,
            da1,
            part1,
            g,
            k,
            N,
            bptt,
            decay,
            momentum,
            i1,
            NC,
            DH,
            MH,
            HAS_MOM,
            HAS_DECAY,
            0,
        )
        _state(
            st2,
            cap,
            apply,
            dst2,
            acc2p,
            dd2p,
            ds2,
            da2,
            part2,
            g,
            k,
            N,
            bptt,
            decay,
            momentum,
            i2,
            NC,
            MH,
            DH,
            HAS_MOM,
            HAS_DECAY,
            1,
        )

    @triton.jit(do_not_specialize=["k", "N", "bptt"])
    def _bwd_state(
        st1,
        st2,
        cap,
        apply,
        dst1,
        dst2,
        acc1p,
        acc2p,
        dd1p,
        dd2p,
        ds1,
        ds2,
        da1,
        da2,
        part1,
        part2,
        k,
        N,
        bptt,
        decay,
        momentum,
        NC: tl.constexpr,
        DH: tl.constexpr,
        MH: tl.constexpr,
        HAS_MOM: tl.constexpr,
        HAS_DECAY: tl.constexpr,
    ):
        """``_states`` of the last state (k = N): a program per compressor."""
        _states(
            st1,
            st2,
            cap,
            apply,
            dst1,
            dst2,
            acc1p,
            acc2p,
            dd1p,
            dd2p,
            ds1,
            ds2,
            da1,
            da2,
            part1,
            part2,
            tl.program_id(0).to(tl.int64),
            k,
            N,
            bptt,
            decay,
            momentum,
            NC,
            DH,
            MH,
            HAS_MOM,
            HAS_DECAY,
        )

    @triton.jit(do_not_specialize=["n", "N", "bptt"])
    def _bwd_block(
        st1,
        st2,
        x,
        y,
        eta,
        apply,
        dd1p,
        dd2p,
        part1,
        part2,
        dx,
        dy,
        deta,
        cap,
        dst1,
        dst2,
        acc1p,
        acc2p,
        ds1,
        ds2,
        da1,
        da2,
        count,
        n,
        N,
        bptt,
        decay,
        momentum,
        BLK: tl.constexpr,
        CH: tl.constexpr,
        NC: tl.constexpr,
        DH: tl.constexpr,
        MH: tl.constexpr,
        PREC: tl.constexpr,
        HAS_MOM: tl.constexpr,
        HAS_DECAY: tl.constexpr,
    ):
        """The block step's VJP on one chunk, given dΔ_n (dd): its tokens' dX, dY, dη and its part
        of dθ_n; then (the compressor's last chunk program) ``_states`` at k = n, which writes
        dΔ_{n-1}."""
        g, c = tl.program_id(0).to(tl.int64), tl.program_id(1)
        _chunk_vjp(
            st1,
            st2,
            x,
            y,
            eta,
            apply,
            dd1p,
            dd2p,
            part1,
            part2,
            dx,
            dy,
            deta,
            g,
            c,
            n,
            N,
            BLK,
            CH,
            NC,
            DH,
            MH,
            PREC,
        )
        if _last_of(count, g, NC):
            _states(
                st1,
                st2,
                cap,
                apply,
                dst1,
                dst2,
                acc1p,
                acc2p,
                dd1p,
                dd2p,
                ds1,
                ds2,
                da1,
                da2,
                part1,
                part2,
                g,
                n,
                N,
                bptt,
                decay,
                momentum,
                NC,
                DH,
                MH,
                HAS_MOM,
                HAS_DECAY,
            )

    @triton.jit
    def _chunk_vjp(
        st1,
        st2,
        x,
        y,
        eta,
        apply,
        dd1p,
        dd2p,
        part1,
        part2,
        dx,
        dy,
        deta,
        g,
        c,
        n,
        N,
        BLK: tl.constexpr,
        CH: tl.constexpr,
        NC: tl.constexpr,
        DH: tl.constexpr,
        MH: tl.constexpr,
        PREC: tl.constexpr,
    ):
        if tl.load(apply + g * N + n) != 0:
            w1, w2, rt, xc, ec, hh, a, err, rr = _chunk(
                st1, st2, x, y, eta, g, n, N, c, BLK, CH, DH, MH, PREC
            )
            rd, i1, i2 = _idx(DH, MH)
            SZ = DH * MH
            dd1 = tl.load(dd1p + g * SZ + i1)
            dd2 = tl.load(dd2p + g * SZ + i2)
            gp = _gelu_grad(hh)
            sv = ec * rr
            gg = err * sv[:, None]
            q = tl.dot(gg, tl.trans(w2), input_precision=PREC)  # [CH, MH]
            gh = q * gp
            # Δ1 = -Xᵀ gh, Δ2 = -aᵀ g
            dgh = -tl.dot(xc, dd1, input_precision=PREC)  # [CH, MH]
            dxc = -tl.dot(gh, tl.trans(dd1), input_precision=PREC)  # [CH, DH]
            dq = dgh * gp
            dh = dgh * q * _gelu_grad2(hh)
            # [CH, DH]
            dg = tl.dot(dq, w2, input_precision=PREC) - tl.dot(a, dd2, input_precision=PREC)
            da = -tl.dot(gg, tl.trans(dd2), input_precision=PREC)  # [CH, MH]
            de = dg * sv[:, None]
            dsv = tl.sum(dg * err, 1)  # [CH]
            tl.store(deta + rt, dsv * rr)
            da += a * (-2.0 * dsv * sv * rr)[:, None]
            tl.store(dy + rt[:, None] * DH + rd[None, :], -de)
            da += tl.dot(de, tl.trans(w2), input_precision=PREC)
            dh += da * gp
            dxc += tl.dot(dh, tl.trans(w1), input_precision=PREC)
            tl.store(dx + rt[:, None] * DH + rd[None, :], dxc)
            p = (g * NC + c) * SZ
            tl.store(part1 + p + i1, tl.dot(tl.trans(xc), dh, input_precision=PREC))
            tl.store(
                part2 + p + i2,
                tl.dot(tl.trans(dq), gg, input_precision=PREC)
                + tl.dot(tl.trans(a), de, input_precision=PREC),
            )


def _meta(b, Dh, m, prec, chunk, warps):
    ch = min(b, chunk)
    return dict(BLK=b, CH=ch, NC=b // ch, DH=Dh, MH=m, PREC=prec, num_warps=warps), b // ch


class _Scan(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, w1, w2, s1, s2, a1, a2, x, y, eta, apply, decay, momentum, max_norm, bptt, grad_prec
    ):
        G, N, b, Dh = x.shape
        m = w1.shape[2]
        has_mom = s1 is not None
        c = lambda t: t.detach().float().contiguous()
        x, y, eta, a1, a2 = c(x), c(y), c(eta), c(a1), c(a2)
        s1 = s1.detach().float().contiguous() if has_mom else a1  # (launched copies them)
        s2 = s2.detach().float().contiguous() if has_mom else a2
        ap = (apply > 0).to(torch.int32).contiguous()
        meta, NC = _meta(b, Dh, m, PRECISION, CHUNK, NUM_WARPS)
        flags = dict(HAS_MOM=has_mom and bool(momentum), HAS_DECAY=bool(decay))
        scalars = (float(decay), float(momentum), float(max_norm))

        def loop(w1, w2, s1, s2, a1, a2, x, y, eta, ap):
            st1, st2 = x.new_empty(G, N + 1, Dh, m), x.new_empty(G, N + 1, m, Dh)
            st1[:, 0], st2[:, 0] = w1, w2
            cap, loss = x.new_empty(G, N, 2), x.new_empty(G, N, b)
            part1, part2 = x.new_empty(G, NC, Dh, m), x.new_empty(G, NC, m, Dh)
            # arrivals (zero after a launch)
            count = torch.zeros(G, dtype=torch.int32, device=x.device)
            for n in range(N):
                _fwd_block[(G, NC)](
                    st1,
                    st2,
                    x,
                    y,
                    eta,
                    part1,
                    part2,
                    loss,
                    s1,
                    s2,
                    a1,
                    a2,
                    ap,
                    cap,
                    count,
                    n,
                    N,
                    *scalars,
                    **meta,
                    **flags,
                )
            return st1, st2, cap, loss, s1, s2

        args = (
            w1.detach().float().contiguous(),
            w2.detach().float().contiguous(),
            s1,
            s2,
            a1,
            a2,
            x,
            y,
            eta,
            ap,
        )
        key = ("fwd", *scalars, *flags.values(), *meta.values())
        # the loop writes the momenta in place
        st1, st2, cap, loss, s1, s2 = launched(key, args, loop, N >= GRAPH_MIN_BLOCKS, (2, 3))
        ctx.save_for_backward(st1, st2, cap, x, y, eta, ap)
        ctx.opts = (float(decay), float(momentum), int(bptt), has_mom, flags, grad_prec)
        ctx.mark_non_differentiable(loss)
        return st1, st2, (s1 if has_mom else None), (s2 if has_mom else None), loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dst1, dst2, dsn1, dsn2, _dloss):
        st1, st2, cap, x, y, eta, ap = ctx.saved_tensors
        decay, momentum, bptt, has_mom, flags, grad_prec = ctx.opts
        G, N, b, Dh = x.shape
        m = st1.shape[-1]
        dz = lambda t, like: t.float().contiguous() if t is not None else torch.zeros_like(like)
        dst1, dst2 = dz(dst1, st1), dz(dst2, st2)  # (copies of them) become dθ_0..dθ_N in place
        ds1 = dz(dsn1, st1[:, 0]) if has_mom else None
        ds2 = dz(dsn2, st2[:, 0]) if has_mom else None
        meta, NC = _meta(b, Dh, m, GRAD_PRECISION[grad_prec], GRAD_CHUNK, GRAD_WARPS)

        def loop(st1, st2, cap, x, y, eta, ap, dst1, dst2, *moms):
            da1, da2 = torch.zeros_like(st1[:, 0]), torch.zeros_like(st2[:, 0])
            acc1, acc2, dd1, dd2 = (torch.empty_like(t) for t in (da1, da2, da1, da2))
            dx, dy, deta = torch.zeros_like(x), torch.zeros_like(y), torch.zeros_like(eta)
            part1, part2 = x.new_empty(G, NC, Dh, m), x.new_empty(G, NC, m, Dh)
            count = torch.zeros(G, dtype=torch.int32, device=x.device)
            moms = moms if has_mom else (da1, da2)  # (unused without momentum)
            _bwd_state[(G,)](
                st1,
                st2,
                cap,
                ap,
                dst1,
                dst2,
                acc1,
                acc2,
                dd1,
                dd2,
                *moms,
                da1,
                da2,
                part1,
                part2,
                N,
                N,
                bptt,
                decay,
                momentum,
                NC=NC,
                DH=Dh,
                MH=m,
                **flags,
                num_warps=STATE_WARPS,
            )
            for n in range(N - 1, -1, -1):
                _bwd_block[(G, NC)](
                    st1,
                    st2,
                    x,
                    y,
                    eta,
                    ap,
                    dd1,
                    dd2,
                    part1,
                    part2,
                    dx,
                    dy,
                    deta,
                    cap,
                    dst1,
                    dst2,
                    acc1,
                    acc2,
                    *moms,
                    da1,
                    da2,
                    count,
                    n,
                    N,
                    bptt,
                    decay,
                    momentum,
                    **meta,
                    **flags,
                )
            # dθ_0 alone leaves the loop (a graph's outputs are cloned out)
            return (dst1[:, 0], dst2[:, 0], da1, da2, dx, dy, deta) + (moms if has_mom else ())

        args = (st1, st2, cap, x, y, eta, ap, dst1, dst2) + ((ds1, ds2) if has_mom else ())
        key = ("bwd", decay, momentum, bptt, grad_prec, *flags.values(), *meta.values())
        # the loop writes dθ and the momenta's gradients in place
        out = launched(key, args, loop, N >= GRAPH_MIN_BLOCKS, (7, 8, 9, 10))
        dst1, dst2, da1, da2, dx, dy, deta = out[:7]
        ds1, ds2 = out[7:] if has_mom else (None, None)
        if has_mom and not flags["HAS_MOM"] and bptt and N > bptt:  # cut momenta pass nothing back
            ds1, ds2 = torch.zeros_like(ds1), torch.zeros_like(ds2)
        return (
            dst1,
            dst2,
            ds1,
            ds2,
            da1 if decay else None,
            da2 if decay else None,
            dx,
            dy,
            deta,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def scan_states(
    ds,
    moms,
    inits,
    keys,
    vals,
    eta,
    apply,
    decay: float,
    momentum: float,
    max_norm: float,
    bptt: int,
    grad_precision: str = "fp32",
):
    """Triton form of ``ops.ttt_cache.scan_states`` (same arguments and results; ``supports`` must
    hold): ds, inits (W1 [G, Dh, m], W2 [G, m, Dh]), moms the same or None; keys, vals [G, N, b,
    Dh]; eta [G, N, b]; apply [G, N]; ``grad_precision`` "fp32" or "tf32" (the backward's products).
    Returns ((W1, W2) [G, N + 1, ...], final momenta, loss [G, N, b])."""
    w1, w2 = (w0 + d for w0, d in zip(inits, ds))
    s1, s2 = moms if moms is not None else (None, None)
    st1, st2, m1, m2, loss = _Scan.apply(
        w1,
        w2,
        s1,
        s2,
        inits[0],
        inits[1],
        keys,
        vals,
        eta,
        apply,
        decay,
        momentum,
        max_norm,
        bptt,
        grad_precision,
    )
    return (st1, st2), ((m1, m2) if moms is not None else None), loss
