"""In-Place TTT in a Moshi layer's gating (DESIGN section 3), as a Moshi streaming module.

``TTTGating`` is the project's ``InPlaceTTTMLP`` (layers/inplace_ttt.py) wearing Moshi's
``StreamingModule`` protocol. It takes over the stock ``ActivationGating``'s ``linear_in`` /
``linear_out`` modules (same parameters, same names: checkpoints load strictly) and computes
Moshi's gating exactly: ``linear_in`` -> [B, T, 2, h], ``silu(gate) * up``, then ``linear_out``
(W_down, the fast weight's initial value W0). Parallel: ``forward_ttt`` (chunk scan, fast weights
from W0). Streaming: ``step`` over a ``TensorState`` (s, zbuf, xbuf, count per row, fp32).
"""

from __future__ import annotations

import torch
from moshi.modules.gating import ActivationGating
from moshi.modules.streaming import StreamingModule
from torch import nn
from torch.nn import functional as F

from ..config import InPlaceTTTConfig
from ..layers.inplace_ttt import InPlaceTTTMLP
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
            raise ValueError("In-Place TTT target='embed' needs the transformer input of this very forward "
                             f"(have {None if self.x is None else tuple(self.x.shape)}, need {tuple(like.shape)})")
        return self.x


class TTTGating(InPlaceTTTMLP, StreamingModule[TensorState]):
    def __init__(self, stock: ActivationGating, cfg: InPlaceTTTConfig, tap: EmbeddingTap | None = None,
                 respect_exec_mask: bool = True):
        if not isinstance(stock, ActivationGating) or not isinstance(stock.linear_in, nn.Linear):
            raise ValueError(f"In-Place TTT needs Moshi's ActivationGating with nn.Linear weights, got {type(stock).__name__}")
        if stock.activation is not F.silu:
            raise ValueError(f"In-Place TTT computes Moshi's silu gating; this layer's activation is {stock.activation}")
        if cfg.target == "embed" and tap is None:
            raise ValueError("In-Place TTT target='embed' needs the transformer's EmbeddingTap (patch_lm attaches one)")
        w = stock.linear_out.weight  # [D, h]
        with torch.device("meta"):  # no throw-away copy of the big weights
            super().__init__(w.shape[0], w.shape[1], cfg)
        self.linear_in, self.linear_out = stock.linear_in, stock.linear_out
        self.target_conv = nn.Parameter(torch.zeros(w.shape[0], 1, cfg.conv_kernel, device=w.device, dtype=w.dtype))
        self.target_proj = nn.Parameter(torch.zeros(w.shape[0], w.shape[0], device=w.device, dtype=w.dtype))
        if w.device.type != "meta":
            self.reset_ttt_parameters()
        self.tap, self.respect_exec_mask = tap, respect_exec_mask

    def added_keys(self) -> tuple[str, ...]:
        return ("target_conv", "target_proj")

    def reset_ttt_parameters(self) -> None:
        with torch.no_grad():  # the project's init (conv 0, W_target diagonal), made on the weights' device
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
        with exec_masked(state.tensors, state.exec_mask, self.respect_exec_mask):
            return self.step(x, x0, state.tensors.scope(""))
