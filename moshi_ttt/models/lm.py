"""StreamingLM: a Moshi-shaped decoder with one parallel (training) and one streaming path."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig
from ..layers.attention import StreamingAttention
from ..layers.inplace_ttt import InPlaceTTTMLP
from ..layers.mlp import GatedMLP
from ..layers.norm import RMSNorm
from ..ops.masks import segment_positions
from ..state import StreamingState


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + gating(norm(x)) (Moshi's layer layout)."""

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = StreamingAttention(cfg)
        self.norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        ttt = cfg.inplace_ttt
        self.is_ttt = ttt is not None and index in ttt.layers
        self.gating = InPlaceTTTMLP(cfg.dim, cfg.hidden_dim, ttt) if self.is_ttt else GatedMLP(cfg.dim, cfg.hidden_dim)

    def _mlp(self, h, x0, pos, seg, st):
        if not self.is_ttt:
            return self.gating(h)
        src = x0 if self.gating.ttt.target == "embed" else h
        if st is not None:
            return self.gating.step(h, src, st.scope("ttt."))
        return self.gating.forward_ttt(h, src, pos, seg if self.gating.ttt.reset_on_boundary else None)

    def forward(self, x, pos, seg, x0):
        x = x + self.self_attn(self.norm1(x), pos, seg)
        return x + self._mlp(self.norm2(x), x0, pos, seg, None)

    def step(self, x, pos, st, x0):
        x = x + self.self_attn.step(self.norm1(x), pos, st)
        return x + self._mlp(self.norm2(x), x0, pos, None, st)


class StreamingLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise ValueError(f"StreamingLM needs a ModelConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        for i, layer in enumerate(self.layers):
            if isinstance(layer.self_attn.memory, nn.Module):
                layer.self_attn.memory.name = f"layers.{i}.self_attn.memory"  # named in error messages
        self.out_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if name.endswith("alpha"):
                nn.init.ones_(p)
            elif name.endswith("out_proj.weight") or name.endswith("linear_out.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.cfg.num_layers))
            elif name.endswith("target_conv") or name.endswith("target_proj") or ".memory." in name:
                continue  # In-Place TTT's and the TTT cache's own init
            else:
                nn.init.normal_(p, std=0.02)

    # ---- input checks -------------------------------------------------------------------
    def _check_tokens(self, tokens) -> None:
        if not isinstance(tokens, torch.Tensor):
            raise ValueError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
        if tokens.dtype in (torch.bool,) or tokens.is_floating_point() or tokens.is_complex():
            raise ValueError(f"tokens must have an integer dtype, got {tokens.dtype}")
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape [batch, time], got {tuple(tokens.shape)}")
        if tokens.shape[1] < 1:
            raise ValueError("tokens must hold at least one time step")
        capturing = tokens.is_cuda and torch.cuda.is_current_stream_capturing()
        lo, hi = (int(tokens.min()), int(tokens.max())) if not capturing and tokens.numel() else (0, 0)
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size}), got min {lo} max {hi}")

    def _check_state(self, tokens, state) -> None:
        if not isinstance(state, StreamingState):
            raise ValueError(f"state must be a StreamingState, got {type(state).__name__}")
        if state.meta.get("fingerprint") != self.cfg.fingerprint():
            raise ValueError("state belongs to a different model config "
                             f"({state.meta.get('fingerprint')} != {self.cfg.fingerprint()})")
        if tokens.shape[0] != state.batch_size:
            raise ValueError(f"tokens batch size {tokens.shape[0]} does not match the state's {state.batch_size}")

    # ---- paths ------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, resets: torch.Tensor | None = None) -> torch.Tensor:
        """Parallel path. tokens [B, T] -> logits [B, T, V].

        ``resets`` bool [B, T] (optional): memory resets before token t (a new document starts).
        """
        self._check_tokens(tokens)
        B, T = tokens.shape
        if resets is not None and resets.shape != (B, T):
            raise ValueError(f"resets must have shape {(B, T)}, got {tuple(resets.shape)}")
        pos, seg = segment_positions(resets, B, T, tokens.device)
        x = x0 = self.emb(tokens)
        for layer in self.layers:
            x = layer(x, pos, seg if resets is not None else None, x0)
        return self.head(self.out_norm(x))

    def init_state(self, batch_size: int, device=None, dtype=None) -> StreamingState:
        """Empty streaming memory for ``batch_size`` conversations."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        p = self.head.weight
        device, dtype = device or p.device, dtype or p.dtype
        state = StreamingState({}, {}, {"fingerprint": self.cfg.fingerprint(), "batch_size": batch_size,
                                        "memory": self.cfg.memory.kind, "tokens": 0})
        state.add("pos", torch.zeros(batch_size, dtype=torch.long, device=device), 0)
        for i, layer in enumerate(self.layers):
            layer.self_attn.init_state(state.scope(f"layers.{i}."), batch_size, device, dtype)
            if layer.is_ttt:  # fast weights and their buffers stay fp32 whatever ``dtype`` is
                layer.gating.init_state(state.scope(f"layers.{i}.ttt."), batch_size, device)
        return state

    def step(self, tokens: torch.Tensor, state: StreamingState):
        """Streaming path: tokens [B, k] (any k >= 1) -> (logits [B, k, V], state updated in place)."""
        self._check_tokens(tokens)
        self._check_state(tokens, state)
        k = tokens.shape[1]
        pos = state["pos"][:, None] + torch.arange(k, device=tokens.device)  # [B, k]
        x = x0 = self.emb(tokens)
        for i, layer in enumerate(self.layers):
            x = layer.step(x, pos, state.scope(f"layers.{i}."), x0)
        state["pos"].add_(k)
        state.meta["tokens"] += k  # tokens streamed since init (all rows; resets do not rewind it)
        return self.head(self.out_norm(x)), state
