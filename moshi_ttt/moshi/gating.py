"""In-Place TTT in a Moshi layer's gating, as a Moshi streaming module.

``TTTGating`` is the project's ``InPlaceTTTMLP`` (layers/inplace_ttt.py) wearing Moshi's
``StreamingModule`` protocol. It takes over the stock ``ActivationGating``'s ``linear_in`` /
``linear_out`` modules (same parameters, same names: checkpoints load strictly) and computes
Moshi's gating exactly: ``linear_in`` -> [B, T, 2, h], ``silu(gate) * up``, then ``linear_out``
(W_down, the fast weight's initial value W0). Parallel: ``forward_ttt`` (chunk scan, fast weights
from W0). Streaming over a ``TensorState`` (s, zbuf, xbuf, count per row, fp32): ``step`` for a
call of several steps, ``step_one`` for LMGen's one step a call (the same state and results, at
a quarter of the work: one output row and one masked chunk update instead of two chunks).
"""

from __future__ import annotations

import torch
from moshi.modules.gating import ActivationGating
from moshi.modules.streaming import StreamingModule
from torch import nn
from torch.nn import functional as F

from ..config import InPlaceTTTConfig
from ..layers.inplace_ttt import InPlaceTTTMLP
from ..ops.inplace_ttt import _clip_scale, chunk_target, fp32_matmul_precision
from ..state import ScopedState
from .streaming import TensorState, empty_state, exec_masked


class EmbeddingTap:
    """Holds the input of Moshi's main transformer (the summed token embeddings) during its
    forward, for In-Place TTT targets from embeddings (``target="embed"``)."""

    def __init__(self):
        self.x: torch.Tensor | None = None

    def attach(self, transformer: nn.Module):
        def hook(_module, args):
            self.x = args[0]

        return transformer.register_forward_pre_hook(hook)

    def get(self, like: torch.Tensor) -> torch.Tensor:
        if self.x is None or self.x.shape != like.shape:
            raise ValueError(
                "In-Place TTT target='embed' needs the transformer input of this very forward "
                f"(have {None if self.x is None else tuple(self.x.shape)}, need "
                f"{tuple(like.shape)})"
            )
        return self.x


class TTTGating(InPlaceTTTMLP, StreamingModule[TensorState]):
    def __init__(
        self,
        stock: ActivationGating,
        cfg: InPlaceTTTConfig,
        tap: EmbeddingTap | None = None,
        respect_exec_mask: bool = True,
    ):
        if not isinstance(stock, ActivationGating) or not isinstance(stock.linear_in, nn.Linear):
            raise ValueError(
                "In-Place TTT needs Moshi's ActivationGating with nn.Linear weights, got "
                f"{type(stock).__name__}"
            )
        if stock.activation is not F.silu:
            raise ValueError(
                "In-Place TTT computes Moshi's silu gating; this layer's activation is "
                f"{stock.activation}"
            )
        if cfg.target == "embed" and tap is None:
            raise ValueError(
                "In-Place TTT target='embed' needs the transformer's EmbeddingTap (patch_lm "
                "attaches one)"
            )
        w = stock.linear_out.weight  # [D, h]
        with torch.device("meta"):  # no throw-away copy of the big weights
            super().__init__(w.shape[0], w.shape[1], cfg)
        self.linear_in, self.linear_out = stock.linear_in, stock.linear_out
        self.target_conv = nn.Parameter(
            torch.zeros(w.shape[0], 1, cfg.conv_kernel, device=w.device, dtype=w.dtype)
        )
        self.target_proj = nn.Parameter(
            torch.zeros(w.shape[0], w.shape[0], device=w.device, dtype=w.dtype)
        )
        if w.device.type != "meta":
            self.reset_ttt_parameters()
        self.tap, self.respect_exec_mask = tap, respect_exec_mask

    def added_keys(self) -> tuple[str, ...]:
        return ("target_conv", "target_proj")

    def reset_ttt_parameters(self) -> None:
        # the project's init (conv 0, W_target diagonal), made on the weights' device
        with torch.no_grad():
            self.target_conv.zero_()
            d = torch.randn(self.target_proj.shape[0]) * 0.02
            self.target_proj.copy_(torch.diag(d).to(self.target_proj))

    def _init_streaming_state(self, batch_size: int) -> TensorState:
        device = self.linear_out.weight.device
        st = empty_state(batch_size)
        self.init_state(st.scope(""), batch_size, device)
        return TensorState(batch_size, device, tensors=st)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] (the layer's normalised MLP input) -> [B, T, D]."""
        x0 = x if self.ttt.target == "hidden" else self.tap.get(x)
        state = self._streaming_state
        if state is None:
            return self.forward_ttt(x, x0, None, None)
        # inference; masks its own updates (no state copy)
        if x.shape[1] == 1 and not torch.is_grad_enabled():
            return self.step_one(
                x, x0, state.tensors.scope(""), state.exec_mask if self.respect_exec_mask else None
            )
        with exec_masked(state.tensors, state.exec_mask, self.respect_exec_mask):
            return self.step(x, x0, state.tensors.scope(""))

    def step_one(
        self,
        x: torch.Tensor,
        x0: torch.Tensor,
        st: ScopedState,
        exec_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One new token per row, x, x0 [B, 1, D] -> [B, 1, D]: O = z (W0 + s)ᵀ with the weights
        before its chunk's update; the chunk's ΔW = η V̂ᵀZ (V̂ from the whole chunk) is
        computed every step and applied where this token completes the chunk (static shapes).
        Rows where ``exec_mask`` [B] is False keep their state."""
        B, _, D = x.shape
        C, lr = self.ttt.chunk_size, self.ttt.lr
        z = self.hidden(x)  # [B, 1, h] in the model dtype, like the plain MLP
        with (
            torch.autocast(x.device.type, enabled=False),
            fp32_matmul_precision(self.ttt.matmul_precision),
        ):
            dt = torch.promote_types(z.dtype, torch.float32)
            z, x0 = z.to(dt), x0.to(dt)
            s, count = st["s"], st["count"]
            out = z @ self.linear_out.weight.to(dt).T + torch.bmm(z, s.transpose(1, 2))  # [B, 1, D]
            slot = count[:, None, None]
            # [B, C, h] the chunk so far
            zb = st["zbuf"].scatter(1, slot.expand(B, 1, z.shape[-1]), z)
            xb = st["xbuf"].scatter(1, slot.expand(B, 1, D), x0)  # [B, C, D]
            v = chunk_target(xb, self.target_conv.to(dt), self.target_proj.to(dt), C)  # [B, C, D]
            done = (count + 1 == C).to(dt)  # [B]: this token completes the chunk
            # [B]
            run = torch.ones_like(count, dtype=torch.bool) if exec_mask is None else exec_mask
            coef = lr * done * run.to(dt)
            if self._clip() is not None:  # eval-only norm clip of the whole ΔW
                coef = coef * _clip_scale(lr * v.transpose(1, 2) @ zb, self._clip())
            if self.ttt.decay:  # s ← (1 − λ) s where the chunk completes
                s.mul_((1.0 - self.ttt.decay * done * run.to(dt))[:, None, None])
            s.baddbmm_((v * coef[:, None, None]).transpose(1, 2), zb)  # W += c η V̂ᵀZ
            m = run[:, None, None]
            st["zbuf"].copy_(torch.where(m, zb * (1 - done)[:, None, None], st["zbuf"]))
            st["xbuf"].copy_(torch.where(m, xb * (1 - done)[:, None, None], st["xbuf"]))
            count.copy_(torch.where(run, (count + 1) % C, count))
        return out.to(x.dtype)
