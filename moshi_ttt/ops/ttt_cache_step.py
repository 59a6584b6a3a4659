"""The TTT cache's one-token streaming step as two ops that take tensors, never the layer, and
run a Triton kernel where it applies (``ops.ttt_step_triton``) or their PyTorch reference here:
``evict_one`` (the evicted token joins the open block; a completed block updates the compressor)
and ``attend_one`` (the query against the ring and the virtual tokens); plus the pure pieces
every path of the layer shares.

    η_t = inner_lr σ(k̂_t·w + c) / b                         (``step_sizes``)
    λ_n = σ(k̄_n·w_f + c_f), k̄_n the mean of block n's keys  (``forget_decay``; else a constant)
    K_m = key_m + V_m A, at the relative RoPE offsets       (``virtual_keys``)
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from . import l2norm_triton as l2norm
from . import ttt_cache_triton as ttt_triton
from . import ttt_step_triton as ttt_step
from .banded import mix
from .rope import rotate
from .ttt_cache import complete_block

StepState, StepWeights = ttt_step.StepState, ttt_step.StepWeights


def step_sizes(keys, lr_w, lr_b, inner_lr: float, block: int) -> torch.Tensor:
    """η_t = inner_lr σ(k̂_t·w_h + c_h) / b: keys [rows * H, N, b, Dh] normalised, lr_w [H, Dh],
    lr_b [H] -> [rows * H, N, b]."""
    rows = keys.shape[0] // lr_w.shape[0]
    w, b = lr_w.repeat(rows, 1).to(keys.dtype), lr_b.repeat(rows).to(keys.dtype)
    logits = torch.einsum("gnbd,gd->gnb", keys, w) + b[:, None, None]
    return inner_lr * torch.sigmoid(logits) / block


def forget_decay(keys, eta, forget_w, forget_b, decay: float):
    """λ per block and compressor: ``decay``, or with forget_w [hc, Dh], forget_b [hc]
    σ(k̄·w + c) of the mean k̄ of the block's tokens (those with η > 0). keys [rows * hc, ..., b,
    Dh], eta [rows * hc, ..., b] -> a float or [rows * hc, ...]."""
    if forget_w is None:
        return decay
    rows = keys.shape[0] // forget_w.shape[0]
    on = (eta > 0).to(keys.dtype)
    mean = (keys * on[..., None]).sum(-2) / on.sum(-1, keepdim=True).clamp_min(1.0)  # [G, .., Dh]
    w = forget_w.to(keys.dtype).repeat(rows, 1)  # [G, Dh]
    w = w.view(w.shape[0], *([1] * (mean.dim() - 2)), w.shape[1])
    b = forget_b.to(keys.dtype).repeat(rows).view(-1, *([1] * (mean.dim() - 2)))
    return torch.sigmoid((mean * w).sum(-1) + b)


def per_head(x: torch.Tensor, rows: int, heads: int) -> torch.Tensor:
    """A shared compressor's reads [rows, S, H * M, Dh] -> [rows * H, S, M, Dh] (per-head
    compressors, rows * H of them: unchanged)."""
    if x.shape[0] == rows * heads:
        return x
    S, Dh = x.shape[1], x.shape[-1]
    return x.view(rows, S, heads, -1, Dh).transpose(1, 2).reshape(rows * heads, S, -1, Dh)


def with_recency(s: torch.Tensor, recency: torch.Tensor) -> torch.Tensor:
    """Virtual token m's logit minus softplus(recency_h) m: s [B, H, ..., M], recency [H]."""
    gamma = F.softplus(recency).to(s.dtype).view(1, -1, *([1] * (s.dim() - 2)))
    return s - gamma * torch.arange(s.shape[-1], device=s.device, dtype=s.dtype)


def virtual_keys(v: torch.Tensor, vkeys: torch.Tensor, vkey_proj: torch.Tensor, rot=None):
    """K_m = key_m + V_m A: v [rows * H, S, M, Dh], vkeys [H, M, Dh], vkey_proj [H, Dh, Dh]; rot
    the (cos, sin) [M, Dh/2] of the relative offsets (None: no rotation)."""
    G, S, M, Dh = v.shape
    H = vkeys.shape[0]
    vh = v.view(-1, H, S, M, Dh)
    k = vkeys.to(v.dtype)[None, :, None] + torch.einsum(
        "rhsmd,hde->rhsme", vh, vkey_proj.to(v.dtype)
    )
    k = k.reshape(G, S, M, Dh)
    return rotate(k, *rot) if rot is not None else k


def evict_one(
    cand_k: torch.Tensor,
    cand_v: torch.Tensor,
    valid: torch.Tensor,
    state: StepState,
    weights: StepWeights,
    rot,
    *,
    inner_lr: float,
    decay: float,
    momentum: float,
    max_norm: float,
    check: str | None = None,
) -> None:
    """One evicted token per row, in place on ``state``: cand_k (before RoPE), cand_v [B, H, 1,
    Dh], valid [B] (False: no token). The token joins the open block at slot ecount; a row whose
    block completes takes one compressor step on it (``complete_block``) and caches the read of
    its new state (K, V); ``check`` names the layer in the error when a state is not finite.
    ``ttt_step_triton.evict_step`` where ``evict_supports`` holds (no check), else the same in
    PyTorch."""
    B, H, _, Dh = cand_k.shape
    b = state.ek.shape[2]
    if check is None and ttt_step.evict_supports(state, weights):
        ttt_step.evict_step(
            cand_k,
            cand_v,
            valid,
            state,
            weights,
            rot,
            eta_scale=inner_lr / b,
            decay=decay,
            momentum=momentum,
            max_norm=max_norm,
        )
        return
    with torch.autocast(cand_k.device.type, enabled=False):
        kn = l2norm.reference(cand_k)  # [B, H, 1, Dh]
        eta_t = step_sizes(kn.reshape(B * H, 1, 1, Dh), weights.lr_w, weights.lr_b, inner_lr, b)
    ecount = state.ecount
    # the first free slot: written whether or not a token was evicted (a free slot is never read)
    idx = ecount.view(B, 1, 1, 1).expand(B, H, 1, Dh)
    state.ek.scatter_(2, idx, kn)
    state.ev.scatter_(2, idx, cand_v.to(kn.dtype))
    state.eeta.scatter_(2, idx[..., 0], eta_t.view(B, H, 1))
    done = valid & (ecount + 1 >= b)  # [B]
    if _updates(done):
        _complete(state, weights, done, rot, decay, momentum, max_norm, check)
    ecount.copy_(torch.where(valid, (ecount + 1) % b, ecount))
    state.updates.add_(done.long())


def _updates(done: torch.Tensor) -> bool:
    """Whether a step runs ``_complete`` (which changes nothing on rows without ``done``): on
    CUDA always (no host synchronisation; a captured graph replays one path whatever the rows
    do), elsewhere (the CPU) only when some row completes its block."""
    return done.is_cuda or bool(done.any())


def _complete(state: StepState, weights: StepWeights, done, rot, decay, momentum, max_norm, check):
    """The rows with ``done`` [B] take one step on their full open block and cache its read:
    ``ttt_cache_triton.complete_block`` where it applies (no gradients), else the reference."""
    B, H = state.ek.shape[:2]
    hc = weights.inits[0].shape[0]
    x, y, eta = state.ek, state.ev, state.eeta  # [B, H, b, Dh], [B, H, b]
    if hc == H:
        x, y, eta = x.flatten(0, 1), y.flatten(0, 1), eta.flatten(0, 1)
    else:  # one block of b H tokens per row, η / H
        x, y = x.reshape(B, -1, x.shape[-1]), y.reshape(B, -1, y.shape[-1])
        eta = eta.reshape(B, -1) / H
    ds = tuple(d.flatten(0, 1) for d in state.ds)
    moms = tuple(m.flatten(0, 1) for m in state.moms) if state.moms is not None else None
    probes = F.normalize(weights.probes, dim=-1).reshape(hc, -1, weights.probes.shape[-1])
    inits = tuple(w.to(x.dtype) for w in weights.inits)
    fast = not (torch.is_grad_enabled() or weights.forget_w is not None) and ttt_triton.supports(
        ds, x, probes
    )
    with torch.autocast(x.device.type, enabled=False):
        lam = forget_decay(x, eta, weights.forget_w, weights.forget_b, decay)
        v = (ttt_triton.complete_block if fast else complete_block)(
            ds,
            moms,
            inits,
            x,
            y,
            eta,
            done[:, None].expand(B, hc).reshape(-1),
            probes,
            decay=lam,
            momentum=momentum,
            max_norm=max_norm,
        )
        v = per_head(v[:, None], B, H)  # [B * H, 1, M, Dh]
        k = virtual_keys(v, weights.vkeys, weights.vkey_proj, rot)
    m = done.view(B, 1, 1, 1)
    state.vk.copy_(torch.where(m, k.view_as(state.vk).to(state.vk.dtype), state.vk))
    state.vv.copy_(torch.where(m, v.view_as(state.vv).to(state.vv.dtype), state.vv))
    if check is not None and not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        if not all(torch.isfinite(d).all() for d in ds):
            raise FloatingPointError(f"{check}: compressor state not finite after an update")


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
    inv_t: float,
    gated: bool,
    recency_bias: bool,
) -> torch.Tensor:
    """A one-token step's attention output [B, H, 1, Dh] (fp32): q (after RoPE) against the ring
    ring_k, ring_v [B, H, W, Dh] at kpos [B, W] (-1: empty), q_raw [B, H, 1, Dh] against the
    virtual tokens vk, vv [B, H, M, Dh] of the rows with has [B]; logits qᵀk inv_t / √Dh, the
    virtual ones minus softplus(recency_h) m with ``recency_bias``. ``gated``: α softmax(window)
    + (1 - α) softmax(virtual), α = σ(gate) [H]; else one softmax (``ops.banded.mix``).
    ``ttt_step_triton.attend_one`` where ``attend_supports`` holds, else the same in PyTorch."""
    B, H, _, Dh = q.shape
    if ttt_step.attend_supports(ring_k, vk.shape[2]):
        return ttt_step.attend_one(
            q,
            q_raw,
            ring_k,
            ring_v,
            kpos,
            vk,
            vv,
            has,
            gate,
            recency,
            scale=inv_t / math.sqrt(Dh),
            gated=gated,
            recency_bias=recency_bias,
        )
    s_r = q.float() @ ring_k.float().transpose(-1, -2) / math.sqrt(Dh) * inv_t  # [B, H, 1, W]
    s_r = s_r.masked_fill(~(kpos >= 0)[:, None, None, :], float("-inf"))
    s_v = torch.einsum("bhqd,bhmd->bhqm", q_raw.float(), vk.float()) / math.sqrt(Dh) * inv_t
    if recency_bias:  # virtual token m weighted by exp(-γ m)
        s_v = with_recency(s_v, recency)
    f = torch.promote_types(gate.dtype, torch.float32)
    alpha = torch.sigmoid(gate.to(f)).view(1, H, 1).expand(B, H, 1)
    out, _ = mix(
        s_r,
        ring_v,
        has[:, None, None].expand(B, H, 1),
        alpha,
        "gate" if gated else "concat",
        scores=s_v,
        values=vv[:, :, None],
    )
    return out
