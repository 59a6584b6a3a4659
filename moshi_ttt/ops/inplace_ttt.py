"""In-Place TTT tensor ops (paper arXiv 2604.06169).

Per chunk i of C tokens, with Z the MLP hidden activations and V̂ the target:
    O_i = Z_i W^(i-1)ᵀ                      (apply with the weights before chunk i)
    ΔW_i = η V̂_iᵀ Z_i,  W^(i) = W^(i-1) + ΔW_i   (then update)
Equivalently O_i = Z_i W0ᵀ + η Σ_{j<i} (Z_i Z_jᵀ) V̂_j: block-causal linear attention with q = k =
Z, v = V̂.
With forgetting λ the sum of updates s = W − W0 decays before each update,
    s_i = (1 − λ) s_(i-1) + ΔW_i,
so ‖s‖ stays below max‖ΔW‖ / λ however long the stream (a skipped chunk neither decays nor adds).

Two implementations with one signature: ``ttt_naive`` materialises W^(i) chunk by chunk under
autograd (the reference); ``ttt_chunk_scan`` runs the same scan with an fp32 running sum and a
backward pass that recomputes the sums in reverse, so no per-chunk d x d_ff matrix is ever kept.
All arithmetic is fp32 (or float64 when the inputs are), with autocast disabled.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn import functional as F


def chunk_target(
    x0: torch.Tensor, conv_weight: torch.Tensor, w_target: torch.Tensor, chunk: int
) -> torch.Tensor:
    """V̂ = Conv1D(X0) W_target, the depthwise conv run inside each chunk only (zero padding at
    chunk edges).

    x0 [B, T, D] with T a multiple of ``chunk``; conv_weight [D, 1, K]; w_target [D, D] -> [B, T,
    D].
    """
    B, T, D = x0.shape
    K = conv_weight.shape[-1]
    xc = x0.reshape(B * (T // chunk), chunk, D).transpose(1, 2)  # [B*N, D, C]
    # "same" padding inside the chunk: no token of another chunk
    xc = F.pad(xc, ((K - 1) // 2, K // 2))
    y = F.conv1d(xc, conv_weight.to(xc.dtype), groups=D)  # [B*N, D, C]
    return y.transpose(1, 2).reshape(B, T, D) @ w_target.to(y.dtype)


def _clip_scale(dw: torch.Tensor, clip_tau: float | None) -> torch.Tensor:
    """min(1, τ / ‖ΔW‖_F) per row, as a constant (the clip is an inference-only guard). dw [B, d, h]
    -> [B]."""
    if clip_tau is None:
        return dw.new_ones(dw.shape[0])
    norm = torch.linalg.vector_norm(dw.detach(), dim=(1, 2))
    return torch.clamp(clip_tau / norm.clamp_min(1e-30), max=1.0)


@contextlib.contextmanager
def fp32_matmul_precision(precision: str):
    """``"highest"``: IEEE fp32 products; ``"high"``: TF32 products on CUDA (fp32 accumulation and
    state either way; CPU is always IEEE). Restores the caller's setting on exit."""
    m = torch.backends.cuda.matmul
    # torch >= 2.9: the per-backend API (mixing it with allow_tf32 raises)
    if hasattr(m, "fp32_precision"):
        old = m.fp32_precision
        m.fp32_precision = "tf32" if precision == "high" else "ieee"
        try:
            yield
        finally:
            m.fp32_precision = old
    else:
        old = m.allow_tf32
        m.allow_tf32 = precision == "high"
        try:
            yield
        finally:
            m.allow_tf32 = old


def ttt_naive(
    z: torch.Tensor,
    v: torch.Tensor,
    w0: torch.Tensor,
    lr: float,
    chunk: int,
    s0: torch.Tensor | None = None,
    apply: torch.Tensor | None = None,
    clip_tau: float | None = None,
    precision: str = "highest",
    decay: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference scan. z [B, T, h], v [B, T, d], w0 [d, h], s0 [B, d, h] (sum of earlier updates),
    apply [B, N] (1 where chunk n's update counts, N = T / chunk), ``decay`` λ in [0, 1)
    -> (O [B, T, d], s_final [B, d, h])."""
    with fp32_matmul_precision(precision):
        return _naive(z, v, w0, lr, chunk, s0, apply, clip_tau, decay)


def _naive(z, v, w0, lr, chunk, s0, apply, clip_tau, decay=0.0):
    B, T, _ = z.shape
    s = w0.new_zeros(B, *w0.shape) if s0 is None else s0
    outs = []
    for n in range(T // chunk):
        # [B, C, h], [B, C, d]
        zn, vn = z[:, n * chunk : (n + 1) * chunk], v[:, n * chunk : (n + 1) * chunk]
        w = w0 + s  # W^(n-1) per row: [B, d, h]
        outs.append(zn @ w.transpose(1, 2))  # [B, C, d]
        dw = lr * vn.transpose(1, 2) @ zn  # ΔW_n [B, d, h]
        scale = _clip_scale(dw, clip_tau)
        on = z.new_ones(B) if apply is None else apply[:, n]
        keep = 1.0 - decay * on  # [B]: 1 − λ where the chunk counts
        s = keep[:, None, None] * s + (scale * on)[:, None, None] * dw
    return torch.cat(outs, dim=1), s


class _ChunkScan(torch.autograd.Function):
    """Runs W = W0 + s in place: forward W ← W0 + k_n (W − W0) + c_n V̂_nᵀ Z_n (k_n = 1 − λ a_n);
    backward walks back from the final W: W −= c_n V̂_nᵀ Z_n without forgetting, or, with it,
    replays the forward once and keeps every W^(n-1) (O(N B d h) during the backward only)."""

    @staticmethod
    def forward(ctx, z, v, w0, s0, apply, lr, chunk, clip_tau, precision, decay):
        B, T, _ = z.shape
        N = T // chunk
        with fp32_matmul_precision(precision):
            w = w0 + s0  # [B, d, h]: the running fast weight W^(n-1)
            start = w.clone() if decay else w.new_empty(0)  # W^(0), replayed by the backward
            out = z.new_empty(B, T, w0.shape[0])
            coef = z.new_empty(B, N)  # c_n = η · clip factor · apply, per row
            keep = 1.0 - decay * apply  # [B, N] k_n
            for n in range(N):
                sl = slice(n * chunk, (n + 1) * chunk)
                zn, vn = z[:, sl], v[:, sl]
                torch.bmm(zn, w.transpose(1, 2), out=out[:, sl])
                if decay:
                    w.sub_(w0).mul_(keep[:, n, None, None]).add_(w0)
                if clip_tau is None:
                    coef[:, n] = lr * apply[:, n]
                    w.baddbmm_((vn * coef[:, n, None, None]).transpose(1, 2), zn)
                else:
                    dw = lr * vn.transpose(1, 2) @ zn
                    coef[:, n] = lr * _clip_scale(dw, clip_tau) * apply[:, n]
                    w.add_(dw * (coef[:, n] / lr)[:, None, None])
        ctx.save_for_backward(z, v, w0, w, coef, keep, start)
        ctx.chunk, ctx.precision, ctx.decay = chunk, precision, decay
        return out, w - w0

    @staticmethod
    def backward(ctx, d_out, d_s):
        z, v, w0, w, coef, keep, start = ctx.saved_tensors
        chunk = ctx.chunk
        N = z.shape[1] // chunk
        with fp32_matmul_precision(ctx.precision):
            history = None
            if ctx.decay:  # W^(n-1) of every chunk, replayed from s0 (no exact inverse of k_n)
                history, wn = [], start
                for n in range(N):
                    sl = slice(n * chunk, (n + 1) * chunk)
                    history.append(wn)
                    vc = v[:, sl] * coef[:, n, None, None]
                    decayed = w0 + keep[:, n, None, None] * (wn - w0)
                    wn = torch.baddbmm(decayed, vc.transpose(1, 2), z[:, sl])
            # r = dL/ds_n: later chunks' dO_mᵀ Z_m (decayed) plus dL/ds_final
            r = d_s.clone() if d_s is not None else torch.zeros_like(w)
            w = w.clone()
            dz, dv = torch.empty_like(z), torch.empty_like(v)
            for n in reversed(range(N)):
                sl = slice(n * chunk, (n + 1) * chunk)
                zn, don = z[:, sl], d_out[:, sl]
                vc = v[:, sl] * coef[:, n, None, None]  # c_n V̂_n [B, C, d]
                if history is None:
                    w.baddbmm_(vc.transpose(1, 2), zn, alpha=-1.0)  # back to W^(n-1)
                else:
                    w = history[n]
                torch.baddbmm(torch.bmm(don, w), vc, r, out=dz[:, sl])
                torch.bmm(zn, r.transpose(1, 2), out=dv[:, sl])
                dv[:, sl] *= coef[:, n, None, None]
                if ctx.decay:
                    r.mul_(keep[:, n, None, None])
                r.baddbmm_(don.transpose(1, 2), zn)
            d_w0 = torch.einsum("btd,bth->dh", d_out, z)
        return dz, dv, d_w0, r, None, None, None, None, None, None


def ttt_chunk_scan(
    z: torch.Tensor,
    v: torch.Tensor,
    w0: torch.Tensor,
    lr: float,
    chunk: int,
    s0: torch.Tensor | None = None,
    apply: torch.Tensor | None = None,
    clip_tau: float | None = None,
    precision: str = "highest",
    decay: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast scan, same signature and results as ``ttt_naive``; memory O(T (d + h) + B d h)
    (plus N B d h during the backward with ``decay``).

    ``precision`` ``"high"`` lets CUDA use TF32 products (see ``fp32_matmul_precision``).
    """
    B, T, _ = z.shape
    s0 = w0.new_zeros(B, *w0.shape) if s0 is None else s0
    apply = z.new_ones(B, T // chunk) if apply is None else apply.to(z.dtype)
    return _ChunkScan.apply(z, v, w0, s0, apply, lr, chunk, clip_tau, precision, float(decay))


def pad_to_chunks(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """Zero-pad dim 1 to a multiple of ``chunk``. [B, T, F] -> [B, ceil(T / C) * C, F]"""
    pad = -x.shape[1] % chunk
    return F.pad(x, (0, 0, 0, pad)) if pad else x
