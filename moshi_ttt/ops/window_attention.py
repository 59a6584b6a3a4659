"""Causal attention within documents, over a sliding window (and sink tokens), without a [B, T, T]
mask: FlexAttention with a block-sparse mask on CUDA, banded chunks elsewhere (window and sink),
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
    o, lse = _softmax_lse(q, k, v, mask[:, None], scale)  # lse [B, H, T]
    return o.to(q.dtype), lse


def _softmax_lse(q, k, v, ok, scale: float | None):
    """The softmax spelt out in fp32: q [..., Q, Dh] over k, v [..., K, Dh] where ``ok`` [..., Q,
    K] (broadcast) -> (output [..., Q, Dh] fp32, log-sum-exp [..., Q])."""
    s = (q.float() @ k.float().transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
    s = s.masked_fill(~ok, float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.exp(s - lse[..., None]) @ v.float(), lse


def _sink_slots(k, v, pos, seg, W: int, num_sink: int):
    """The sink tokens a chunk's queries may need beyond its band: the first ``num_sink`` tokens
    of the document of each chunk's first query (any other document of the chunk starts inside
    it, so its first tokens lie within every later query's window). -> keys, values [B, H, NC, S,
    Dh] and their positions and documents [B, NC, S]."""
    B, H, T, Dh = k.shape
    first = torch.arange(0, T, W, device=pos.device)  # [NC]
    start = first - pos[:, first]  # [B, NC] the document's first token
    # past the row: the last token again, which no query sees as a sink (no query of its
    # document lies W or more positions after it; other documents differ)
    t = (start[..., None] + torch.arange(num_sink, device=pos.device)).clamp_max(T - 1)
    take = lambda x: x.gather(2, t.flatten(1)[:, None, :, None].expand(B, H, -1, x.shape[-1]))
    ks, vs = (take(x).view(B, H, *t.shape[1:], x.shape[-1]) for x in (k, v))
    ps = pos.gather(1, t.flatten(1)).view_as(t)
    ss = None if seg is None else seg.gather(1, t.flatten(1)).view_as(t)
    return ks, vs, ps, ss


def window_attention_banded(
    q,
    k,
    v,
    pos,
    seg,
    window: int,
    num_sink: int = 0,
    scale: float | None = None,
    return_lse: bool = False,
):
    """The window (``num_sink`` 0) or sink kind in chunks: queries [cW, (c+1)W) against keys
    [(c-1)W, (c+1)W) under the window rule, masked by positions and documents (``masks.visible``
    on the chunk), plus the ``num_sink`` first tokens of the document of the chunk's first query
    (``_sink_slots``) where they lie W or more positions back; SDPA on [B, H·NC, W, 2W + S] (or,
    with ``return_lse``, the softmax spelt out in fp32 with its log-sum-exp [B, H, T])."""
    B, H, T, Dh = q.shape
    W = window
    qc, kb, vb = chunked(q, W), band(k, W), band(v, W)  # [B, H, NC, W | 2W, Dh]
    NC = qc.shape[2]
    pq, pk = chunked(pos, W, -1), band(pos, W, -1)  # [B, NC, W], [B, NC, 2W]
    ok = visible(pq.flatten(0, 1), pk.flatten(0, 1), "window", W, 0).view(B, NC, W, 2 * W)
    sq = None if seg is None else chunked(seg, W, -2)  # distinct fills: padding never matches
    if seg is not None:
        ok = ok & (sq[..., None] == band(seg, W, -3)[..., None, :])
    if num_sink:
        ks, vs, ps, ss = _sink_slots(k, v, pos, seg, W, num_sink)
        # [B, NC, W, S]: a sink of the query's document, older than its window
        ok_s = pq[..., None] - ps[:, :, None, :] >= W
        if seg is not None:
            ok_s = ok_s & (sq[..., None] == ss[:, :, None, :])
        ok = torch.cat([ok, ok_s], -1)
        kb, vb = torch.cat([kb, ks], -2), torch.cat([vb, vs], -2)
    ok = ok | ~ok.any(-1, keepdim=True)  # padded queries (never read) see every slot
    K = ok.shape[-1]
    unchunk = lambda x: x.flatten(2, 3)[:, :, :T]
    if return_lse:
        o, lse = _softmax_lse(qc, kb, vb, ok[:, None], scale)  # lse [B, H, NC, W]
        return unchunk(o).to(q.dtype), lse.flatten(2)[:, :, :T]
    mask = ok[:, None].expand(B, H, NC, W, K).reshape(B, H * NC, W, K)
    o = F.scaled_dot_product_attention(
        qc.reshape(B, H * NC, W, Dh),
        kb.reshape(B, H * NC, K, Dh),
        vb.reshape(B, H * NC, K, -1),
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
    ``impl``: "flex" (block-sparse FlexAttention, compiled), "banded" (chunks of the window, plus
    the sinks; window and sink kinds), "dense" (the reference), or "auto" (flex where
    ``flex_supported``, else banded for the window and sink kinds from T >= ``BANDED_MIN`` x
    window, else dense)."""
    _check(q, k, v, pos, seg, kind, window, num_sink)
    if impl not in IMPLS:
        raise ValueError(f"window_attention: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "banded" and kind == "full":
        raise ValueError("window_attention: impl='banded' is for the window and sink kinds")
    if impl == "auto":
        impl = "dense"
        if flex_supported(q):
            impl = "flex"
        elif kind != "full" and q.shape[2] >= BANDED_MIN * window:
            impl = "banded"
    if impl == "flex":
        return window_attention_flex(q, k, v, pos, seg, kind, window, num_sink, scale, return_lse)
    if impl == "banded":
        S = num_sink if kind == "sink" else 0
        return window_attention_banded(q, k, v, pos, seg, window, S, scale, return_lse)
    return window_attention_dense(q, k, v, pos, seg, kind, window, num_sink, scale, return_lse)
