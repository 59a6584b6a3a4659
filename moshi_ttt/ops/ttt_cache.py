"""TTT-cache compressor ops: an MLP of depth L (2 or 3) with fast weights.

    f_θ(x) = gelu(... gelu(x W1) ...) W_L,  θ = (W1 [Dh, m], ..., W_L [m, Dh])
    ℓ_t = ½ ‖f_θ(k̂_t) − v_t‖²  over each mini-batch of b evicted tokens (k̂ = L2-normalised key)
    θ ← θ − Σ_t η_t ∇_θ ℓ_t(θ)   (one gradient step per mini-batch, at the block-start state)

η_t = η_max · σ(w·k̂_t + c) / (b (1 + ‖a_t‖²)), with a_t the last hidden activation (the input of
W_L), is bounded and normalised by that activation's energy (normalised LMS), so a mini-batch
step cannot overshoot. Optional forgetting pulls θ back towards its initial state (a constant λ,
or a learned one per block and compressor: a tensor instead of a float), optional
momentum follows Titans, and a norm cap keeps each ‖W‖_F bounded. Weights are tuples
``ws = (W1, ..., W_L)``, each [G, d_in, d_out] for G independent compressors. Two
implementations of the block step share one signature: ``block_step_naive`` takes per-token
gradients with autograd in a token loop (the reference), ``block_step`` backpropagates by hand
for the whole block at once.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from . import impl, ttt_scan_torch, ttt_scan_triton


def compressor(ws, x: torch.Tensor) -> torch.Tensor:
    """f_θ(x). ws (W1 [G, Dh, m], ..., W_L [G, m, Dh]) (extra batch dims broadcast), x [G, n,
    Dh]."""
    for w in ws[:-1]:
        x = F.gelu(x @ w)
    return x @ ws[-1]


def _gelu_grad(h: torch.Tensor) -> torch.Tensor:
    """d gelu(h) / dh for the exact (erf) gelu: Φ(h) + h φ(h)."""
    cdf = 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * h * h) / math.sqrt(2.0 * math.pi)
    return cdf + h * pdf


def nlms_eta(eta: torch.Tensor, a_last: torch.Tensor) -> torch.Tensor:
    """η / (1 + ‖a‖²): eta [G, b], last hidden activation a [G, b, m]."""
    return eta / (1.0 + a_last.pow(2).sum(-1))


def block_step(ws, x, y, eta):
    """One mini-batch gradient step. x, y [G, b, Dh]; eta [G, b] (0 drops a token), normalised
    here by ``nlms_eta``.

    Returns (deltas (ΔW1, ..., ΔW_L), loss per token before the step [G, b]); the caller adds
    the deltas (so forgetting and momentum are shared by both implementations).
    """
    hs, acts = [], [x]  # pre-activations [G, b, m], layer inputs
    for w in ws[:-1]:
        hs.append(acts[-1] @ w)
        acts.append(F.gelu(hs[-1]))
    err = acts[-1] @ ws[-1] - y  # [G, b, Dh]
    g = err * nlms_eta(eta, acts[-1])[..., None]  # η_t ∂ℓ_t/∂out
    deltas = []
    for i in range(len(ws) - 1, -1, -1):
        deltas.append(-(acts[i].transpose(1, 2) @ g))  # -Σ_t η_t a_tᵀ g_t: [G, d_in, d_out]
        if i:
            g = (g @ ws[i].transpose(1, 2)) * _gelu_grad(hs[i - 1])
    return tuple(reversed(deltas)), 0.5 * err.pow(2).sum(-1)


def block_step_naive(ws, x, y, eta):
    """Reference: per-token gradients by autograd, summed over the block at the block-start
    state."""
    with torch.enable_grad():
        if not all(w.requires_grad for w in ws):
            ws = tuple(w.detach().requires_grad_() for w in ws)
        return _naive(tuple(ws), x, y, eta)


def _naive(ws, x, y, eta):
    deltas, losses = [torch.zeros_like(w) for w in ws], []
    for t in range(x.shape[1]):
        xt, yt = x[:, t : t + 1], y[:, t : t + 1]
        a = xt
        for w in ws[:-1]:
            a = F.gelu(a @ w)
        eta_t = eta[:, t] / (1.0 + a[:, 0].pow(2).sum(-1))  # NLMS, token by token
        loss = 0.5 * (a @ ws[-1] - yt).pow(2).sum(-1)[:, 0]  # [G]
        grads = torch.autograd.grad(loss.sum(), ws, create_graph=True)
        deltas = [d - eta_t[:, None, None] * gr for d, gr in zip(deltas, grads)]
        losses.append(loss)
    return tuple(deltas), torch.stack(losses, 1)


def apply_update(w, delta, mom, w_init, decay, momentum: float, max_norm: float):
    """θ_new from θ and the gradient step: momentum (S ← βS + Δ), forgetting towards the initial
    state (θ ← θ0 + (1 − λ)(θ − θ0), λ a float or one per row [G]), then a cap on ‖θ‖_F. All
    [G, ...]; returns (θ_new, S_new)."""
    if momentum:
        mom = momentum * mom + delta
        delta = mom
    w = w + delta
    if torch.is_tensor(decay):
        w = w_init + (1.0 - decay.to(w.dtype))[:, None, None] * (w - w_init)
    elif decay:
        w = w_init + (1.0 - decay) * (w - w_init)
    norm = torch.linalg.vector_norm(w, dim=(1, 2), keepdim=True)
    w = w * torch.clamp(max_norm / norm.clamp_min(1e-12), max=1.0)
    return w, mom


def scan_step(
    ws,
    moms,
    inits,
    x,
    y,
    eta,
    apply_n,
    decay,
    momentum: float,
    max_norm: float,
    naive: bool = False,
):
    """One block: gradient step, momentum, forgetting (λ a float or [G]) and norm cap; rows with
    ``apply_n`` [G] false keep their state. ws, inits tuples of [G, ...]; moms a tuple or None.
    Returns (ws, moms, loss
    before the step [G, b])."""
    a = apply_n[:, None, None] > 0
    deltas, loss = (block_step_naive if naive else block_step)(ws, x, y, eta)
    new_ws, new_moms = [], []
    for i, (w, d, w0) in enumerate(zip(ws, deltas, inits)):
        mom = moms[i] if moms is not None else None
        nw, nm = apply_update(w, d, mom, w0, decay, momentum, max_norm)
        new_ws.append(torch.where(a, nw, w))
        new_moms.append(torch.where(a, nm, mom) if momentum else mom)
    return tuple(new_ws), (tuple(new_moms) if moms is not None else None), loss


def scan_states(
    ds,
    moms,
    inits,
    keys,
    vals,
    eta,
    apply,
    decay,
    momentum: float,
    max_norm: float,
    bptt: int,
    naive: bool = False,
    step=scan_step,
):
    """The sequential part of ``compress_scan``: N block steps (``step``: ``scan_step`` or its
    compiled form) from θ = inits + ds; ``decay`` a float or [G, N]. Returns (every state, a tuple
    of [G, N + 1, ...] (index n:
    after n blocks), the final momenta, the loss of each token before its block's step [G, N,
    b])."""
    ws = tuple(w0 + d for w0, d in zip(inits, ds))
    hist, losses = [ws], []
    for n in range(keys.shape[1]):
        if bptt and n and n % bptt == 0:  # truncated BPTT: earlier updates become constants
            ws = tuple(w.detach() for w in ws)
            moms = tuple(m.detach() for m in moms) if moms is not None else None
        lam = decay[:, n] if torch.is_tensor(decay) else decay
        ws, moms, loss = step(
            ws,
            moms,
            inits,
            keys[:, n],
            vals[:, n],
            eta[:, n],
            apply[:, n],
            lam,
            momentum,
            max_norm,
            naive,
        )
        hist.append(ws)
        losses.append(loss)
    states = tuple(torch.stack([h[i] for h in hist], 1) for i in range(len(ws)))
    loss = torch.stack(losses, 1) if losses else keys.new_zeros(keys.shape[0], 0, keys.shape[2])
    return states, moms, loss


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
    decay=0.0,
    momentum: float = 0.0,
    max_norm: float = 100.0,
) -> torch.Tensor:
    """A streaming step's block update: the rows with ``done`` [G] take one ``scan_step`` on their
    completed block and read their new state; the others keep theirs. In place.

    ds, moms (or None): tuples of [G, d_in, d_out] state offsets and momenta, G = B·HC rows in
    (row, compressor) order; inits [HC, d_in, d_out] each; x (normalised keys), y [G, b, Dh]; eta
    [G, b]; ``decay`` a float or [G]; probes [HC, M, Dh] (normalised). Returns the read f_θ(p̂_m)
    [G, M, Dh] of the done rows
    (the others' rows are unspecified). ``ops.ttt_cache_triton.complete_block`` is the fast form.
    """
    reps = x.shape[0] // inits[0].shape[0]
    w0 = tuple(w.to(x.dtype).repeat(reps, 1, 1) for w in inits)
    ws = tuple(a + d for a, d in zip(w0, ds))
    new, new_moms, _ = scan_step(
        ws, moms, w0, x, y, eta, done.to(x.dtype), decay, momentum, max_norm
    )
    for d, w, a in zip(ds, new, w0):
        d.copy_(w - a)
    if moms is not None:
        for mo, nm in zip(moms, new_moms):
            mo.copy_(nm)
    return compressor(new, probes.to(x.dtype).repeat(reps, 1, 1))


_compiled = None


def compiled_scan_step():
    """``scan_step`` through torch.compile: one block's update, forward and backward, as a few
    fused kernels (compiled once per shape; unrolling the whole loop compiles too slowly)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(scan_step, dynamic=False)
    return _compiled


def compress_scan(
    ds,
    moms,
    inits,
    keys,
    vals,
    eta,
    apply,
    read,
    *,
    decay=0.0,
    momentum: float = 0.0,
    max_norm: float = 100.0,
    bptt: int = 0,
    record: bool = False,
    check: str | None = None,
    compiled: bool = False,
    grad_precision: str = "fp32",
):
    """Mini-batch TTT over N blocks of evicted tokens, reading the virtual tokens after each update.

    ds: the state as offsets from the initial state ``inits`` (tuples of [G, d_in, d_out]; a
    reset sets the offsets to zero); moms the momenta (a tuple, or None); keys (normalised),
    vals [G, N, b, Dh]; eta [G, N, b] per-token step sizes; apply [G, N] 1 where a block counts
    (a skipped block leaves the state as it is); ``decay`` λ a float or per block [G, N]
    (learned forgetting: the fused kernels take floats only); read(states) -> (K, V): states [G,
    S, d_in, d_out] each -> [G, S, M, Dh], called once on all N + 1 states. Gradients flow
    through at most ``bptt`` consecutive updates (0: all). Returns (K, V) reads [G, N + 1, M,
    Dh] (index n: after n blocks), the final (ds, moms) and, when ``record``, the inner losses
    before and after each update [G, N] (mean over the block's tokens). Depth-2 scans with a
    float ``decay`` (unless ``compiled``) run as the fused kernels of ``ops.ttt_scan_triton``
    (fp32 on CUDA; the backward's products in ``grad_precision``, "fp32" or "tf32") or else with
    the hand-written backward of ``ops.ttt_scan_torch``; the others by autograd through
    ``scan_step``; with the "update" part on its reference (``ops.impl``), per-token gradients by
    autograd (``block_step_naive``).
    """
    naive = impl.reference("update")
    fused = not (naive or compiled or torch.is_tensor(decay))
    args = (tuple(ds), moms, tuple(inits), keys, vals, eta, apply, decay, momentum, max_norm, bptt)
    if fused and keys.shape[1] and ttt_scan_triton.supports(ds, keys):
        states, moms, loss = ttt_scan_triton.scan_states(*args, grad_precision)
    elif fused and ttt_scan_torch.supports(ds, keys):
        states, moms, loss = ttt_scan_torch.scan_states(*args)
    else:
        step = compiled_scan_step() if compiled and not naive else scan_step
        states, moms, loss = scan_states(*args, naive, step)
    if check is not None and not (keys.is_cuda and torch.cuda.is_current_stream_capturing()):
        # [N]
        finite = torch.stack(
            [torch.isfinite(s[:, 1:]).flatten(2).all(-1).all(0) for s in states]
        ).all(0)
        if not finite.all():
            bad = int((~finite).nonzero()[0, 0])
            raise FloatingPointError(f"{check}: compressor state not finite after update {bad}")
    before = after = None
    if record and keys.shape[1]:
        with torch.no_grad():
            valid = (eta > 0).float()  # [G, N, b]
            denom = valid.sum(-1).clamp_min(1.0)
            # θ after block n on its tokens
            err = compressor(tuple(s[:, 1:] for s in states), keys) - vals
            before = (loss * valid).sum(-1) / denom
            after = (0.5 * err.pow(2).sum(-1) * valid).sum(-1) / denom
    final = tuple(s[:, -1] - w0 for s, w0 in zip(states, inits))
    return read(states), (final, moms), (before, after)


def reconstruction_terms(
    keys: torch.Tensor,
    vals: torch.Tensor,
    kv: torch.Tensor,
    vv: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Training stage 1's reconstruction: after absorbing block n, its keys, as queries into the
    virtual tokens (K_n, V_n) of the state after it, should recover its values:
        v̂_t = softmax(√Dh k̂_t K_nᵀ) V_n,   terms = (Σ_t ‖v̂_t - v_t‖², number of tokens t).
    keys (normalised), vals [G, N, b, Dh]; kv, vv [G, N, M, Dh]; mask [G, N, b] (tokens that
    count; None: all). Products and sums in fp32, autocast or not; the count is a Python int.
    """
    with torch.autocast(keys.device.type, enabled=False):  # fp32 products under autocast too
        q = keys.float()
        s = q @ kv.float().transpose(-1, -2) * math.sqrt(q.shape[-1])  # [G, N, b, M]
        att = torch.softmax(s, -1)
        err = (att @ vv.float() - vals.float()).pow(2).sum(-1)  # [G, N, b]
    if mask is None:
        return err.sum(), err.numel()
    return (err * mask.float()).sum(), int(mask.sum())
