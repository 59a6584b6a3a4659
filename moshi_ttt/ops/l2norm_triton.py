"""Row-wise L2 normalisation y = x / max(‖x‖, ε) in fp32 as one Triton kernel each way, the
compressor keys' normalisation in training (``F.normalize(x.float(), dim=-1)`` is the reference:
``normalize`` falls back to it wherever ``supports`` does not hold).

Backward: dx = r (dy − y (y·dy)) with r = 1 / ‖x‖ where ‖x‖ > ε, and dx = dy / ε where the norm is
clamped (y = x / ε is linear there).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from . import impl
from . import ttt_cache_triton as tct

EPS = 1e-12  # F.normalize's default
ROWS = 32  # rows per program
triton, tl = tct.triton, (tct.tl if tct.triton is not None else None)


def supports(x: torch.Tensor) -> bool:
    """Half or single precision in, a power-of-two width of 16 to 1024, a tensor a kernel may
    take (``impl.kernel_runs``)."""
    if (
        triton is None
        or x.dtype not in (torch.float32, torch.bfloat16, torch.float16)
        or x.dim() < 1
    ):
        return False
    if not impl.kernel_runs(x):
        return False
    D = x.shape[-1]
    return D <= 1024 and impl.powers_of_two(D)


if triton is not None:

    @triton.jit
    def _fwd(x, y, r, R, EPS: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        ok = rows < R
        idx = rows[:, None] * D + tl.arange(0, D)[None, :]
        xv = tl.load(x + idx, mask=ok[:, None], other=0.0).to(tl.float32)  # [ROWS, D]
        inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(xv * xv, 1)), EPS)
        tl.store(y + idx, xv * inv[:, None], mask=ok[:, None])
        tl.store(r + rows, inv, mask=ok)

    @triton.jit
    def _bwd(dy, y, r, dx, R, EPS: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        ok = rows < R
        idx = rows[:, None] * D + tl.arange(0, D)[None, :]
        g = tl.load(dy + idx, mask=ok[:, None], other=0.0).to(tl.float32)
        yv = tl.load(y + idx, mask=ok[:, None], other=0.0)
        inv = tl.load(r + rows, mask=ok, other=1.0)
        unclamped = (inv < 1.0 / EPS).to(tl.float32)  # ‖x‖ > ε
        dot = tl.sum(yv * g, 1) * unclamped
        tl.store(
            dx + idx,
            (inv[:, None] * (g - yv * dot[:, None])).to(dx.dtype.element_ty),
            mask=ok[:, None],
        )


class _Normalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        D = x.shape[-1]
        xs = x.detach().contiguous().view(-1, D)
        R = xs.shape[0]
        y, r = torch.empty(R, D, device=x.device), torch.empty(R, device=x.device)
        _fwd[(triton.cdiv(R, ROWS),)](xs, y, r, R, EPS=EPS, ROWS=ROWS, D=D, num_warps=4)
        ctx.save_for_backward(y, r)
        ctx.dtype = x.dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        y, r = ctx.saved_tensors
        R, D = y.shape
        dx = torch.empty(R, D, device=y.device, dtype=ctx.dtype)
        _bwd[(triton.cdiv(R, ROWS),)](
            dy.contiguous().view(-1, D), y, r, dx, R, EPS=EPS, ROWS=ROWS, D=D, num_warps=4
        )
        return dx.view(dy.shape)


def reference(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] -> x / max(‖x‖, ε) over the last dimension, in promote(x.dtype, fp32)."""
    return F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1, eps=EPS)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """``reference`` as a Triton kernel where ``supports`` holds (and the "update" part is not on
    its reference, ``ops.impl``)."""
    if impl.reference("update") or not supports(x):
        return reference(x)
    return _Normalize.apply(x)
