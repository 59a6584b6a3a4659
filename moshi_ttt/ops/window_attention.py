"""Causal attention within documents, over a sliding window (and sink tokens), without a [B, T, T]
mask: FlexAttention with a block-sparse mask on CUDA, banded chunks elsewhere (the window kind),
a dense boolean mask and SDPA as the reference.

Query i sees key j of its row when both lie in one document (seg_i = seg_j), j <= i, and

    full     always
    window   i - j < W
    sink     i - j < W or pos_j < S   (pos: the position within the document)

so a window of W costs O(T W) instead of O(T²) on the fast paths: FlexAttention skips the blocks
of 128 x 128 (query, key) pairs the mask rules out and computes the rest; the banded form splits
the queries into chunks of W, each against the 2W keys that can hold its window.
"""

from __future__ import annotations

import functools

import torch
from torch.nn import functional as F

from . import impl
from .banded import band, chunked
from .masks import visible

KINDS = ("full", "window", "sink")
# "auto" takes the banded form (where FlexAttention does not run) from T >= BANDED_MIN x W: on
# 2 CPU cores, forward and backward, it was slower than the dense mask at T = 4 W and 6 W and
# faster from 8 W, 3-4x at 16 W and 24 W (bench/window_forms.py, docs/results/bench-tiny-cpu)
BANDED_MIN = 8
IMPLS = ("auto", "flex", "banded", "dense")


def _check(q, k, v, pos, seg, kind: str, window: int, num_sink: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"window_attention: kind must be one of {KINDS}, got {kind!r}")
    if kind != "full" and window < 1:
        raise ValueError(f"window_attention: window must be >= 1, got {window}")
    if kind == "sink" and num_sink < 0:
        raise ValueError(f"window_attention: num_sink must be >= 0, got {num_sink}")
    B, H, T, Dh = q.shape
    if k.shape != q.shape or v.shape[:3] != q.shape[:3] or pos.shape != (B, T):
        raise ValueError(
            f"window_attention: q, k, v [B, H, T, Dh] and pos [B, T] expected, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(pos.shape)}"
        )
    if seg is not None and seg.shape != (B, T):
        raise ValueError(f"window_attention: seg must be [B, T] = {(B, T)}, got {tuple(seg.shape)}")


def window_attention_dense(
    q,
    k,
    v,
    pos,
    seg,
    kind: str,
    window: int,
    num_sink: int = 0,
    scale: float | None = None,
    return_lse: bool = False,
):
    """The reference: a [B, T, T] mask from positions (``masks.visible``) and segments, SDPA (or,
    with ``return_lse``, the softmax spelt out in fp32 with its log-sum-exp [B, H, T])."""
    mask = visible(pos, pos, kind, window, num_sink)  # [B, T, T]
    if seg is not None:
        mask = mask & (seg[:, :, None] == seg[:, None, :])
    if not return_lse:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scale)
    s = (q.float() @ k.float().transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
    s = s.masked_fill(~mask[:, None], float("-inf"))
    lse = torch.logsumexp(s, -1)  # [B, H, T]
    return (torch.exp(s - lse[..., None]) @ v.float()).to(q.dtype), lse


def window_attention_banded(
    q,
    k,
    v,
    pos,
    seg,
    window: int,
    scale: float | None = None,
    return_lse: bool = False,
):
    """The window kind in chunks: queries [cW, (c+1)W) against keys [(c-1)W, (c+1)W), masked by
    positions and documents (``masks.visible`` on the chunk); SDPA on [B, H·NC, W, 2W] (or, with
    ``return_lse``, the softmax spelt out in fp32 with its log-sum-exp [B, H, T])."""
    B, H, T, Dh = q.shape
    W = window
    qc, kb, vb = chunked(q, W), band(k, W), band(v, W)  # [B, H, NC, W | 2W, Dh]
    NC = qc.shape[2]
    pq, pk = chunked(pos, W, -1), band(pos, W, -1)  # [B, NC, W], [B, NC, 2W]
    ok = visible(pq.flatten(0, 1), pk.flatten(0, 1), "window", W, 0).view(B, NC, W, 2 * W)
    if seg is not None:  # distinct fills: padding never matches a document
        ok = ok & (chunked(seg, W, -2)[..., None] == band(seg, W, -3)[..., None, :])
    ok = ok | ~ok.any(-1, keepdim=True)  # padded queries (never read) see every slot
    unchunk = lambda x: x.flatten(2, 3)[:, :, :T]
    if return_lse:
        s = (qc.float() @ kb.float().transpose(-1, -2)) * (scale or Dh**-0.5)
        s = s.masked_fill(~ok[:, None], float("-inf"))  # [B, H, NC, W, 2W]
        lse = torch.logsumexp(s, -1)
        o = torch.exp(s - lse[..., None]) @ vb.float()
        return unchunk(o).to(q.dtype), lse.flatten(2)[:, :, :T]
    mask = ok[:, None].expand(B, H, NC, W, 2 * W).reshape(B, H * NC, W, 2 * W)
    o = F.scaled_dot_product_attention(
        qc.reshape(B, H * NC, W, Dh),
        kb.reshape(B, H * NC, 2 * W, Dh),
        vb.reshape(B, H * NC, 2 * W, -1),
        attn_mask=mask,
        scale=scale,
    )
    return unchunk(o.view(B, H, NC, W, -1))


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


_LAST_MASK: list = []  # (pos, seg, versions and rule, block mask) of the last call


def flex_block_mask(pos, seg, kind: str, window: int, num_sink: int, T: int, compiled: bool):
    """FlexAttention's block mask of ``window_attention``'s rule (keys and queries in one row).
    Without documents (and sinks) it depends on T alone and is kept per (T, rule); otherwise the
    last one is reused while ``pos`` and ``seg`` are the same tensor objects, unchanged (every
    layer of one forward; the cache holds them, so their identity cannot pass to new tensors)."""
    if seg is None and kind != "sink":
        return _static_block_mask(kind, window, T, pos.device, compiled)
    rule = (
        pos._version,
        None if seg is None else seg._version,
        kind,
        window,
        num_sink,
        T,
        compiled,
    )
    if _LAST_MASK and _LAST_MASK[0] is pos and _LAST_MASK[1] is seg and _LAST_MASK[2] == rule:
        return _LAST_MASK[3]
    bm = _block_mask(pos, seg, kind, window, num_sink, T, compiled)
    _LAST_MASK[:] = [pos, seg, rule, bm]
    return bm


@functools.lru_cache(maxsize=16)
def _static_block_mask(kind: str, window: int, T: int, device, compiled: bool):
    return _block_mask(None, None, kind, window, 0, T, compiled, device)


def _block_mask(
    pos, seg, kind: str, window: int, num_sink: int, T: int, compiled: bool, device=None
):
    from torch.nn.attention.flex_attention import create_block_mask

    def rule(b, h, qi, kj):
        ok = kj <= qi
        if seg is not None:
            ok = ok & (seg[b, qi] == seg[b, kj])
        if kind == "window":
            ok = ok & (qi - kj < window)
        elif kind == "sink":
            ok = ok & ((qi - kj < window) | (pos[b, kj] < num_sink))
        return ok

    B = None if seg is None and kind != "sink" else pos.shape[0]
    return create_block_mask(
        rule, B, None, T, T, device=device if pos is None else pos.device, _compile=compiled
    )


def window_attention_flex(
    q,
    k,
    v,
    pos,
    seg,
    kind: str,
    window: int,
    num_sink: int = 0,
    scale: float | None = None,
    return_lse: bool = False,
    compiled: bool = True,
):
    """FlexAttention with the block-sparse mask (``compiled``: torch.compile'd kernels, CUDA;
    eager: PyTorch's reference of FlexAttention, for tests). Positions within a document are
    consecutive, so i - j stands for pos_i - pos_j inside one."""
    from torch.nn.attention.flex_attention import flex_attention

    T = q.shape[2]
    bm = flex_block_mask(pos, seg, kind, window, num_sink, T, compiled)
    fn = _compiled_flex() if compiled else flex_attention
    if not return_lse:
        return fn(q, k, v, block_mask=bm, scale=scale)
    o, lse = fn(q, k, v, block_mask=bm, scale=scale, return_lse=True)
    return o, lse.float()


def flex_supported(q: torch.Tensor) -> bool:
    """The compiled FlexAttention path: CUDA tensors, a head size of at least 16 (power of two),
    kernels not turned off (``ops.impl``)."""
    return q.is_cuda and impl.current().kernels != "off" and impl.powers_of_two(q.shape[-1])


def window_attention(
    q,
    k,
    v,
    pos,
    seg,
    kind: str,
    window: int,
    num_sink: int = 0,
    scale: float | None = None,
    return_lse: bool = False,
    impl: str = "auto",
):
    """Attention of q over k, v (all [B, H, T, Dh], RoPE applied) under the rule above. pos
    [B, T] positions within each document; seg [B, T] document ids (None: one per row, pos =
    0..T-1). -> o [B, H, T, Dh] (and the log-sum-exp [B, H, T], fp32, with ``return_lse``).
    ``impl``: "flex" (block-sparse FlexAttention, compiled), "banded" (chunks of the window; the
    window kind only), "dense" (the reference), or "auto" (flex where ``flex_supported``, else
    banded for the window kind from T >= ``BANDED_MIN`` x window, else dense)."""
    _check(q, k, v, pos, seg, kind, window, num_sink)
    if impl not in IMPLS:
        raise ValueError(f"window_attention: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "banded" and kind != "window":
        raise ValueError(f"window_attention: impl='banded' is for kind='window', got {kind!r}")
    if impl == "auto":
        impl = "dense"
        if flex_supported(q):
            impl = "flex"
        elif kind == "window" and q.shape[2] >= BANDED_MIN * window:
            impl = "banded"
    if impl == "flex":
        return window_attention_flex(q, k, v, pos, seg, kind, window, num_sink, scale, return_lse)
    if impl == "banded":
        return window_attention_banded(q, k, v, pos, seg, window, scale, return_lse)
    return window_attention_dense(q, k, v, pos, seg, kind, window, num_sink, scale, return_lse)
