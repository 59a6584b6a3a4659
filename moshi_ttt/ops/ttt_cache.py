"""TTT-cache compressor ops (DESIGN section 4): a 2-layer MLP with fast weights per (row, head).

    f_θ(x) = gelu(x W1) W2,  θ = (W1 [Dh, m], W2 [m, Dh])
    ℓ_t = ½ ‖f_θ(k̂_t) − v_t‖²  over each mini-batch of b evicted tokens (k̂ = L2-normalised key)
    θ ← θ − Σ_t η_t ∇_θ ℓ_t(θ)   (one gradient step per mini-batch, at the block-start state)

η_t = η_max · σ(w·k̂_t + c) / (b (1 + ‖gelu(k̂_t W1)‖²)) is bounded and normalised by the hidden
activation's energy (normalised LMS), so a mini-batch step cannot overshoot. Optional
forgetting pulls θ back towards its initial state, optional momentum follows Titans, and a norm
cap keeps ‖W‖_F bounded. Two implementations of the block step share one signature:
``block_step_naive`` takes per-token gradients with autograd in a token loop (the reference),
``block_step`` uses the closed-form batched gradient.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def compressor(w1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """f_θ(x). w1 [G, Dh, m], w2 [G, m, Dh], x [G, n, Dh] -> [G, n, Dh]."""
    return F.gelu(x @ w1) @ w2


def _gelu_grad(h: torch.Tensor) -> torch.Tensor:
    """d gelu(h) / dh for the exact (erf) gelu: Φ(h) + h φ(h)."""
    cdf = 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * h * h) / math.sqrt(2.0 * math.pi)
    return cdf + h * pdf


def block_step(w1, w2, x, y, eta):
    """One mini-batch gradient step. x, y [G, b, Dh]; eta [G, b] (0 drops a token).

    Returns (ΔW1 [G, Dh, m], ΔW2 [G, m, Dh], loss per token before the step [G, b]); the caller
    adds the deltas (so forgetting and momentum are shared by both implementations).
    """
    h = x @ w1  # [G, b, m]
    a = F.gelu(h)
    err = a @ w2 - y  # [G, b, Dh]
    ge = err * eta[..., None]
    d_w2 = a.transpose(1, 2) @ ge  # Σ_t η_t a_tᵀ err_t: [G, m, Dh]
    d_h = (ge @ w2.transpose(1, 2)) * _gelu_grad(h)  # [G, b, m]
    d_w1 = x.transpose(1, 2) @ d_h  # [G, Dh, m]
    return -d_w1, -d_w2, 0.5 * err.pow(2).sum(-1)


def block_step_naive(w1, w2, x, y, eta):
    """Reference: per-token gradients by autograd, summed over the block at the block-start state."""
    with torch.enable_grad():
        if not (w1.requires_grad and w2.requires_grad):
            w1, w2 = w1.detach().requires_grad_(), w2.detach().requires_grad_()
        return _naive(w1, w2, x, y, eta)


def _naive(w1, w2, x, y, eta):
    d1, d2, losses = torch.zeros_like(w1), torch.zeros_like(w2), []
    for t in range(x.shape[1]):
        xt, yt = x[:, t:t + 1], y[:, t:t + 1]
        loss = 0.5 * (compressor(w1, w2, xt) - yt).pow(2).sum(-1)[:, 0]  # [G]
        g1, g2 = torch.autograd.grad(loss.sum(), (w1, w2), create_graph=True)
        d1 = d1 - eta[:, t, None, None] * g1
        d2 = d2 - eta[:, t, None, None] * g2
        losses.append(loss)
    return d1, d2, torch.stack(losses, 1)


def apply_update(w, delta, mom, w_init, decay: float, momentum: float, max_norm: float):
    """θ_new from θ and the gradient step: momentum (S ← βS + Δ), forgetting towards the initial
    state (θ ← θ0 + (1 − λ)(θ − θ0)), then a cap on ‖θ‖_F. All [G, ...]; returns (θ_new, S_new)."""
    if momentum:
        mom = momentum * mom + delta
        delta = mom
    w = w + delta
    if decay:
        w = w_init + (1.0 - decay) * (w - w_init)
    norm = torch.linalg.vector_norm(w, dim=(1, 2), keepdim=True)
    w = w * torch.clamp(max_norm / norm.clamp_min(1e-12), max=1.0)
    return w, mom


def scan_step(w1, w2, mom1, mom2, init1, init2, x, y, eta, apply_n, decay: float, momentum: float,
              max_norm: float, naive: bool = False):
    """One block: gradient step, momentum, forgetting and norm cap; rows with ``apply_n`` [G] false
    keep their state. Returns (w1, w2, mom1, mom2, loss before the step [G, b])."""
    a = apply_n[:, None, None] > 0
    eta = eta / (1.0 + F.gelu(x @ w1).pow(2).sum(-1))  # normalised (NLMS) step: no overshoot whatever m
    u1, u2, loss = (block_step_naive if naive else block_step)(w1, w2, x, y, eta)
    n1, nm1 = apply_update(w1, u1, mom1, init1, decay, momentum, max_norm)
    n2, nm2 = apply_update(w2, u2, mom2, init2, decay, momentum, max_norm)
    if momentum:
        mom1, mom2 = torch.where(a, nm1, mom1), torch.where(a, nm2, mom2)
    return torch.where(a, n1, w1), torch.where(a, n2, w2), mom1, mom2, loss


_compiled_step = None


def compiled_scan_step():
    """``scan_step`` through torch.compile (fewer, fused kernels; compiled once per shape)."""
    global _compiled_step
    if _compiled_step is None:
        _compiled_step = torch.compile(scan_step, dynamic=False)
    return _compiled_step


def compress_scan(d1, d2, mom1, mom2, init1, init2, keys, vals, eta, apply, read, *, decay: float = 0.0,
                  momentum: float = 0.0, max_norm: float = 100.0, bptt: int = 0, naive: bool = False,
                  record: bool = False, check: str | None = None, compiled: bool = False):
    """Mini-batch TTT over N blocks of evicted tokens, reading the virtual tokens after each update.

    d1, d2 [G, Dh, m], [G, m, Dh]: the state as offsets from the initial state init1, init2 (a
    reset sets them to zero); mom1, mom2 the momentum (or None); keys (normalised), vals
    [G, N, b, Dh]; eta [G, N, b] per-token step sizes; apply [G, N] 1 where a block counts (a
    skipped block leaves the state as it is); read(w1, w2) -> (K, V): [G, S, Dh, m], [G, S, m, Dh]
    -> [G, S, M, Dh], called once on all N + 1 states. Gradients flow through at most ``bptt``
    consecutive updates (0: all). Returns (K, V) reads [G, N + 1, M, Dh] (index n: after n
    blocks), the final (d1, d2, mom1, mom2) and, when ``record``, the inner losses before and
    after each update [G, N] (mean over the block's tokens).
    """
    step = compiled_scan_step() if compiled and not naive else scan_step
    N = keys.shape[1]
    w1, w2 = init1 + d1, init2 + d2
    w1s, w2s, before, after = [w1], [w2], [], []
    for n in range(N):
        if bptt and n and n % bptt == 0:  # truncated BPTT: earlier updates become constants
            w1, w2 = w1.detach(), w2.detach()
            mom1, mom2 = (m.detach() if m is not None else None for m in (mom1, mom2))
        w1, w2, mom1, mom2, loss = step(w1, w2, mom1, mom2, init1, init2, keys[:, n], vals[:, n], eta[:, n],
                                        apply[:, n], decay, momentum, max_norm, naive)
        if check is not None and not (keys.is_cuda and torch.cuda.is_current_stream_capturing()):
            if not (torch.isfinite(w1).all() and torch.isfinite(w2).all()):
                raise FloatingPointError(f"{check}: compressor state not finite after update {n}")
        if record:
            with torch.no_grad():
                valid = (eta[:, n] > 0).float()
                denom = valid.sum(1).clamp_min(1.0)
                err = compressor(w1, w2, keys[:, n]) - vals[:, n]
                before.append((loss * valid).sum(1) / denom)
                after.append((0.5 * err.pow(2).sum(-1) * valid).sum(1) / denom)
        w1s.append(w1)
        w2s.append(w2)
    stack = (lambda xs: torch.stack(xs, 1) if xs else None)
    reads = read(torch.stack(w1s, 1), torch.stack(w2s, 1))
    return reads, (w1 - init1, w2 - init2, mom1, mom2), (stack(before), stack(after))
