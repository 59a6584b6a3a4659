"""``ops.ttt_cache.scan_states`` (the training path's compressor scan) with a hand-written
backward in PyTorch operations: the fast path where the Triton scan does not run (the CPU).

Autograd through ``scan_step`` records every small operation of every block, and its backward
takes about twice as many; here the forward runs without a graph, keeping the states θ_n, the
caps c_n and eight activations per block, and the backward walks the blocks in reverse in about
as many operations as the forward. The math is that of ``ops.ttt_scan_triton`` (whole blocks
instead of token chunks). Forward, block n:

    h = X W1,  a = gelu(h),  e = a W2 − Y,  s = η / (1 + ‖a‖²),  g = e s
    Δ1 = −Xᵀ ((g W2ᵀ) ⊙ gelu'(h)),  Δ2 = −aᵀ g
    S' = β S + Δ,  U = θ + (S' or Δ),  U ← A + (1 − λ)(U − A),  θ' = c U,  c = min(1, R / ‖U‖)

Backward, from dθ' (the reads' gradient plus what later blocks send back):

    dU = c (dθ' − θ' (θ'·dθ') / ‖θ'‖²) if c < 1 else dθ',  dA += λ dU,  dV = (1 − λ) dU
    dΔ = dV (+ dS, then dS ← β (dS + dV) with momentum),  dθ = dV + VJP_θ(Δ; dΔ)

Both weight matrices hold Dh·m entries, so the update and its backward run on one [2, G, Dh·m]
tensor. Depth 2; the state in the keys' dtype (fp32 in the model).
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

_SQRT1_2, _INV_SQRT_2PI = 1.0 / math.sqrt(2.0), 1.0 / math.sqrt(2.0 * math.pi)


def supports(ds, keys) -> bool:
    """Depth 2, a floating state, a non-empty scan."""
    return len(ds) == 2 and keys.dim() == 4 and keys.shape[1] > 0 and keys.is_floating_point()


def _gelu_parts(h: torch.Tensor):
    """gelu'(h) = Φ(h) + h φ(h) and φ(h) (gelu''(h) = φ(h) (2 − h²))."""
    pdf = torch.exp(-0.5 * h * h).mul_(_INV_SQRT_2PI)
    return torch.erf(h * _SQRT1_2).add_(1.0).mul_(0.5).addcmul_(h, pdf), pdf


def _block(w1, w2, x, y, eta, grads: bool):
    """Block step at θ = (w1 [G, Dh, m], w2 [G, m, Dh]) on x, y [G, b, Dh], eta [G, b]: what the
    step and its VJP use, (a, e, g, gh = (g W2ᵀ) ⊙ gelu'(h), gelu'(h), (g W2ᵀ) ⊙ gelu''(h), 1 / (1
    + ‖a‖²), s); without ``grads`` the VJP's own term (gelu'') is None."""
    h = torch.bmm(x, w1)  # [G, b, m]
    a = F.gelu(h)
    err = torch.baddbmm(y, a, w2, beta=-1.0)  # a W2 − Y: [G, b, Dh]
    rr = 1.0 / (1.0 + a.pow(2).sum(-1))  # NLMS normaliser [G, b]
    sv = eta * rr
    gg = err * sv[..., None]
    gp, pdf = _gelu_parts(h)
    q = torch.bmm(gg, w2.transpose(1, 2))  # [G, b, m]
    gh = q * gp
    gpp = q.mul_(pdf.mul_(h.mul_(h).neg_().add_(2.0))) if grads else None  # in place: q, pdf, h
    return a, err, gg, gh, gp, gpp, rr, sv


def _all_apply(on: torch.Tensor) -> bool:
    """Whether every block applies (no masking needed), asked on the CPU only: no host sync on a
    GPU stream, which may be capturing a CUDA graph (a multi-token streaming step)."""
    return not on.is_cuda and bool(on.all())


def _flat(d, like, G: int, S: int) -> torch.Tensor:
    """An incoming gradient [G, ...] (None: zero) as [G, S]."""
    return d.reshape(G, S) if d is not None else like.new_zeros(G, S)


class _Scan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w1, w2, s1, s2, a1, a2, x, y, eta, apply, decay, momentum, max_norm, bptt):
        G, N, b, Dh = x.shape
        m = w1.shape[2]
        S = Dh * m
        has_mom = s1 is not None and bool(momentum)
        grads = any(ctx.needs_input_grad)
        x, y, eta = x.detach(), y.detach(), eta.detach()
        st = x.new_empty(N + 1, 2, G, S)  # θ_n, both matrices flattened
        st[0, 0], st[0, 1] = w1.detach().reshape(G, S), w2.detach().reshape(G, S)
        init = torch.stack([a1.detach().reshape(G, S), a2.detach().reshape(G, S)])
        mom = None
        if s1 is not None:
            mom = torch.stack([s1.detach().reshape(G, S), s2.detach().reshape(G, S)])
        cap, loss = x.new_ones(N, 2, G), x.new_empty(G, N, b)
        on = apply > 0  # [G, N]
        all_on = _all_apply(on)
        u, acts = x.new_empty(2, G, S), []  # acts: each block's activations, for the backward
        for n in range(N):
            w = st[n]
            wa, wb = w[0].view(G, Dh, m), w[1].view(G, m, Dh)
            xn = x[:, n]
            act = _block(wa, wb, xn, y[:, n], eta[:, n], grads)
            if grads:
                acts.append(act)
            a, err, gg, gh = act[:4]
            loss[:, n] = 0.5 * err.pow(2).sum(-1)
            u1, u2 = u[0].view(G, Dh, m), u[1].view(G, m, Dh)
            if has_mom:  # S' = β S + Δ, U = θ + S'
                torch.bmm(xn.transpose(1, 2), gh, out=u1)
                torch.bmm(a.transpose(1, 2), gg, out=u2)
                new_mom = torch.add(u.neg_(), mom, alpha=momentum)
                mom = new_mom if all_on else torch.where(on[None, :, n, None], new_mom, mom)
                torch.add(w, new_mom, out=u)
            else:  # U = θ + Δ
                u.copy_(w)
                u1.baddbmm_(xn.transpose(1, 2), gh, alpha=-1.0)
                u2.baddbmm_(a.transpose(1, 2), gg, alpha=-1.0)
            if decay:
                u.lerp_(init, decay)  # A + (1 − λ)(U − A)
            c = (max_norm / torch.linalg.vector_norm(u, dim=-1).clamp_min(1e-12)).clamp_max_(1.0)
            if not all_on:
                c = torch.where(on[None, :, n], c, 1.0)
            cap[n] = c
            torch.mul(u, c[..., None], out=st[n + 1])
            if not all_on:
                st[n + 1] = torch.where(on[None, :, n, None], st[n + 1], w)
        if grads:
            ctx.save_for_backward(st, cap, x, y, eta, on, init, *(t for act in acts for t in act))
        ctx.opts = (decay, momentum, bptt, has_mom, s1 is not None, all_on, Dh, m)
        ctx.mark_non_differentiable(loss)
        st1 = st[:, 0].view(N + 1, G, Dh, m).transpose(0, 1)
        st2 = st[:, 1].view(N + 1, G, m, Dh).transpose(0, 1)
        moms = (mom[0].view(G, Dh, m), mom[1].view(G, m, Dh)) if mom is not None else (None, None)
        return st1, st2, *moms, loss

    @staticmethod
    @once_differentiable
    def backward(ctx, dst1, dst2, dm1, dm2, _dloss):
        st, cap, x, y, eta, on, init, *acts = ctx.saved_tensors
        decay, momentum, bptt, has_mom, moms_in, all_on, Dh, m = ctx.opts
        N, G, S = st.shape[0] - 1, st.shape[2], Dh * m
        dst = x.new_zeros(N + 1, 2, G, S)  # the reads' gradients of θ_n
        for i, d in enumerate((dst1, dst2)):
            if d is not None:
                dst[:, i] = d.transpose(0, 1).reshape(N + 1, G, S)
        ds = torch.stack([_flat(dm1, x, G, S), _flat(dm2, x, G, S)]) if has_mom else None
        da = x.new_zeros(2, G, S) if decay else None
        dx, dy, deta = torch.zeros_like(x), torch.zeros_like(y), torch.zeros_like(eta)
        acc = dst[N].clone()  # dθ_N
        for n in range(N - 1, -1, -1):
            # cap, forgetting and momentum of block n: dθ_{n+1} -> dV, dΔ
            wn, c = st[n + 1], cap[n]  # [2, G, S], [2, G]
            onn = on[None, :, n, None]  # [1, G, 1]
            sq = wn.pow(2).sum(-1).clamp_min(1e-30)
            coef = torch.where(c < 1.0, c * (wn * acc).sum(-1) / sq, 0.0)
            dv = (acc * c[..., None]).sub_(wn * coef[..., None])  # dU
            if decay:
                da.add_(dv if all_on else dv * onn, alpha=decay)
                dv.mul_(1.0 - decay)
            if has_mom:  # S' = β S + Δ: dΔ = dS' = dS + dV, dS ← β dS'
                dd = dv + ds
                ds = dd * momentum if all_on else torch.where(onn, dd * momentum, ds)
            else:
                dd = dv
            if not all_on:  # a skipped block: θ_{n+1} = θ_n, S_{n+1} = S_n
                dd = dd * onn
                dv = torch.where(onn, dv, acc)
            # the block step's VJP at θ_n with cotangent dΔ = dd
            w = st[n]
            w1, w2 = w[0].view(G, Dh, m), w[1].view(G, m, Dh)
            dd1, dd2 = dd[0].view(G, Dh, m), dd[1].view(G, m, Dh)
            xn = x[:, n]
            a, err, gg, gh, gp, gpp, rr, sv = acts[8 * n : 8 * n + 8]
            dgh = -torch.bmm(xn, dd1)  # [G, b, m]
            dq = dgh * gp
            dh = dgh * gpp  # through gelu'
            dg = torch.bmm(dq, w2).sub_(torch.bmm(a, dd2))  # [G, b, Dh]
            de = dg * sv[..., None]
            dsv = (dg * err).sum(-1)  # [G, b]
            deta[:, n] = dsv * rr
            dy[:, n] = -de
            # da: from Δ2, the NLMS normaliser and the error
            dav = torch.baddbmm(a * (-2.0 * dsv * sv * rr)[..., None], de, w2.transpose(1, 2))
            dav.sub_(torch.bmm(gg, dd2.transpose(1, 2)))
            dh.addcmul_(dav, gp)
            dxn = torch.bmm(dh, w1.transpose(1, 2))
            dx[:, n] = dxn.sub_(torch.bmm(gh, dd1.transpose(1, 2)))
            p = dv  # dθ_n = dV + the VJP's part + the reads' gradient
            p[0].view(G, Dh, m).baddbmm_(xn.transpose(1, 2), dh)
            p[1].view(G, m, Dh).baddbmm_(dq.transpose(1, 2), gg).baddbmm_(a.transpose(1, 2), de)
            if bptt and n and n % bptt == 0:  # θ_n, S_n enter block n detached
                p.zero_()
                if has_mom:
                    ds.zero_()
            acc = p.add_(dst[n])
        grads = [acc[0].view(G, Dh, m), acc[1].view(G, m, Dh), None, None, None, None]
        if moms_in:  # without momentum the momenta pass through, cut by truncated BPTT
            dm = ds
            if not has_mom:
                dm = x.new_zeros(2, G, S)
                if not (bptt and N > bptt):
                    dm = torch.stack([_flat(dm1, x, G, S), _flat(dm2, x, G, S)])
            grads[2:4] = dm[0].view(G, Dh, m), dm[1].view(G, m, Dh)
        if decay:
            grads[4:6] = da[0].view(G, Dh, m), da[1].view(G, m, Dh)
        return (*grads, dx, dy, deta, None, None, None, None, None)


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
):
    """``ops.ttt_cache.scan_states`` for depth 2 and a float ``decay`` (same arguments and
    results): ds, inits (W1 [G, Dh, m], W2 [G, m, Dh]), moms the same or None; keys, vals [G, N,
    b, Dh]; eta [G, N, b]; apply [G, N]. Returns ((W1, W2) [G, N + 1, ...], final momenta, loss
    [G, N, b], which carries no gradient)."""
    if momentum and moms is None:
        raise ValueError("momentum needs momenta (moms), got None")
    w1, w2 = (w0 + d for w0, d in zip(inits, ds))
    s1, s2 = moms if moms is not None else (None, None)
    st1, st2, m1, m2, loss = _Scan.apply(
        w1, w2, s1, s2, inits[0], inits[1], keys, vals, eta, apply,
        float(decay), float(momentum), float(max_norm), int(bptt),
    )  # fmt: skip
    return (st1, st2), ((m1, m2) if moms is not None else None), loss
