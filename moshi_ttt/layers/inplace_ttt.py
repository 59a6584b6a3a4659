"""In-Place TTT MLP: the gated MLP whose ``linear_out`` (W_down) is a fast weight.

Parameters keep Moshi's names (``linear_in``, ``linear_out``) and add ``target_conv`` (depthwise,
zero-initialised) and ``target_proj`` (W_target, diagonal N(0, 0.02)), so a fresh layer computes
exactly the plain MLP. Fast-weight state (streaming) per batch row, all fp32:
``s`` [B, d, h] the sum of applied updates (W = W0 + s, a reset sets s = 0 and so returns to
the *current* W0), ``zbuf`` [B, C, h] / ``xbuf`` [B, C, D] the inputs of the unfinished chunk
(zero beyond ``count``), ``count`` [B] how many tokens it holds.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import InPlaceTTTConfig
from ..ops import impl
from ..ops.inplace_ttt import (
    chunk_target,
    fp32_matmul_precision,
    pad_to_chunks,
    ttt_chunk_scan,
    ttt_naive,
)
from ..ops.segments import pack, segment_rows, unpack
from ..state import ScopedState
from .mlp import GatedMLP


def _no_autocast(t: torch.Tensor):
    return torch.autocast(t.device.type, enabled=False)


def _f32(t: torch.Tensor) -> torch.Tensor:
    """At least fp32 (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class InPlaceTTTMLP(GatedMLP):
    def __init__(self, dim: int, hidden: int, cfg: InPlaceTTTConfig):
        super().__init__(dim, hidden)
        self.ttt = cfg
        self.target_conv = nn.Parameter(torch.zeros(dim, 1, cfg.conv_kernel))
        self.target_proj = nn.Parameter(torch.zeros(dim, dim))
        self.reset_ttt_parameters()

    def reset_ttt_parameters(self) -> None:
        """Conv zero, W_target diagonal ~N(0, 0.02): the layer starts as the plain MLP (never zero
        both)."""
        with torch.no_grad():
            self.target_conv.zero_()
            self.target_proj.copy_(torch.diag(torch.randn(self.target_proj.shape[0]) * 0.02))

    def _clip(self) -> float | None:
        return None if self.training else self.ttt.clip_tau  # inference-only guard

    def _scan(self, z, x0, s0=None, apply=None):
        """fp32 scan over chunk-aligned rows. z [R, L, h], x0 [R, L, D] (L multiple of C) -> (O,
        s)."""
        C, precision = self.ttt.chunk_size, self.ttt.matmul_precision
        with fp32_matmul_precision(precision):
            # [R, L, D]
            v = chunk_target(x0, self.target_conv.to(z.dtype), self.target_proj.to(z.dtype), C)
        # the "update" part on its reference (ops.impl): fast weights materialised chunk by chunk
        scan = ttt_naive if impl.reference("update") else ttt_chunk_scan
        return scan(
            z,
            v,
            self.linear_out.weight.to(z.dtype),
            self.ttt.lr,
            C,
            s0=s0,
            apply=apply,
            clip_tau=self._clip(),
            precision=precision,
            decay=self.ttt.decay,
        )

    def forward_ttt(
        self, x: torch.Tensor, x0: torch.Tensor, pos: torch.Tensor, seg: torch.Tensor | None
    ):
        """Parallel path. x [B, T, D] (normalised MLP input), x0 [B, T, D] target source,
        pos/seg [B, T] positions and segment ids (fast weights restart at W0 in every segment)."""
        B, T, D = x.shape
        C = self.ttt.chunk_size
        z = self.hidden(x)  # in the autocast dtype, like the plain MLP
        with _no_autocast(x):
            z, x0 = _f32(z), _f32(x0)
            if seg is None:
                o, _ = self._scan(pad_to_chunks(z, C), pad_to_chunks(x0, C))
                return o[:, :T].to(x.dtype)
            # one row per segment, starting at its position 0, so chunks align as in streaming
            r, rows, L = segment_rows(pos, seg, C)
            o, _ = self._scan(pack(z, r, pos, rows, L), pack(x0, r, pos, rows, L))
            return unpack(o, r, pos).to(x.dtype)

    def init_state(self, st: ScopedState, B: int, device) -> None:
        C, h, D = (
            self.ttt.chunk_size,
            self.linear_out.weight.shape[1],
            self.linear_out.weight.shape[0],
        )
        dt = torch.promote_types(self.linear_out.weight.dtype, torch.float32)
        st.add("s", torch.zeros(B, D, h, device=device, dtype=dt), 0.0)
        st.add("zbuf", torch.zeros(B, C, h, device=device, dtype=dt), 0.0)
        st.add("xbuf", torch.zeros(B, C, D, device=device, dtype=dt), 0.0)
        st.add("count", torch.zeros(B, dtype=torch.long, device=device), 0)

    def step(self, x: torch.Tensor, x0: torch.Tensor, st: ScopedState) -> torch.Tensor:
        """Streaming path for k tokens: the buffered chunk plus the new tokens are laid out from the
        chunk start and scanned like training; only complete chunks update ``s``. Static shapes
        only."""
        B, k, D = x.shape
        C = self.ttt.chunk_size
        L = C * -(-(C + k) // C)
        z = self.hidden(x)
        with _no_autocast(x):
            z, x0 = _f32(z), _f32(x0)
            count = st["count"]
            # [B, k] slots of the new tokens
            idx = count[:, None] + torch.arange(k, device=x.device)
            zl = torch.cat([st["zbuf"], z.new_zeros(B, L - C, z.shape[-1])], 1).scatter(
                1, idx[:, :, None].expand(-1, -1, z.shape[-1]), z
            )  # [B, L, h]
            xl = torch.cat([st["xbuf"], x0.new_zeros(B, L - C, D)], 1).scatter(
                1, idx[:, :, None].expand(-1, -1, D), x0
            )  # [B, L, D]
            ends = (torch.arange(L // C, device=x.device) + 1) * C  # [N]
            apply = (ends[None] <= (count + k)[:, None]).float()  # [B, N] complete chunks
            o, s = self._scan(zl, xl, s0=st["s"], apply=apply)
            out = o.gather(1, idx[:, :, None].expand(-1, -1, D))  # [B, k, D]
            # the open chunk
            keep = ((count + k) // C * C)[:, None] + torch.arange(C, device=x.device)
            st["zbuf"].copy_(zl.gather(1, keep[:, :, None].expand(-1, -1, z.shape[-1])))
            st["xbuf"].copy_(xl.gather(1, keep[:, :, None].expand(-1, -1, D)))
            st["s"].copy_(s)
            count.copy_((count + k) % C)
        return out.to(x.dtype)
