"""StreamingLM: a Moshi-shaped decoder with one parallel (training) and one streaming path."""

from __future__ import annotations

import math
import numbers
import operator

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
        self.gating = (
            InPlaceTTTMLP(cfg.dim, cfg.hidden_dim, ttt)
            if self.is_ttt
            else GatedMLP(cfg.dim, cfg.hidden_dim)
        )

    def _mlp(self, h, x0, pos, seg, st):
        if not self.is_ttt:
            return self.gating(h)
        src = x0 if self.gating.ttt.target == "embed" else h
        if st is not None:
            return self.gating.step(h, src, st.scope("ttt."))
        return self.gating.forward_ttt(
            h, src, pos, seg if self.gating.ttt.reset_on_boundary else None
        )

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
        self._fingerprint, self._layout = cfg.fingerprint(), None
        self.emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        for i, layer in enumerate(self.layers):
            if isinstance(layer.self_attn.memory, nn.Module):
                # named in error messages
                layer.self_attn.memory.name = f"layers.{i}.self_attn.memory"
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
    def _check_tokens(self, tokens) -> torch.Tensor:
        """The tokens as int64 (any integer dtype is accepted); ValueError if they are unusable."""
        if not isinstance(tokens, torch.Tensor):
            raise ValueError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
        if tokens.dtype in (torch.bool,) or tokens.is_floating_point() or tokens.is_complex():
            raise ValueError(f"tokens must have an integer dtype, got {tokens.dtype}")
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape [batch, time], got {tuple(tokens.shape)}")
        if tokens.shape[0] < 1:
            raise ValueError("tokens must hold at least one row (batch size 0)")
        if tokens.shape[1] < 1:
            raise ValueError("tokens must hold at least one time step")
        if tokens.device != self.head.weight.device:
            raise ValueError(
                f"tokens are on {tokens.device}, the model on {self.head.weight.device}"
            )
        capturing = tokens.is_cuda and torch.cuda.is_current_stream_capturing()
        lo, hi = (
            (int(tokens.min()), int(tokens.max())) if not capturing and tokens.numel() else (0, 0)
        )
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise ValueError(
                f"token ids must be in [0, {self.cfg.vocab_size}), got min {lo} max {hi}"
            )
        return tokens.long()

    def _state_layout(self) -> dict[str, tuple[tuple[int, ...], bool]]:
        """Per state tensor: its shape after the batch dim (-1 where it grows) and whether it is
        floating point."""
        if self._layout is None:
            ref = self.init_state(1, device="meta").tensors
            self._layout = {
                k: (tuple(-1 if n == 0 else n for n in t.shape[1:]), t.is_floating_point())
                for k, t in ref.items()
            }
        return self._layout

    def _layout_key(self, state: StreamingState) -> tuple:
        """What a checked state is remembered by: the config, its names and its tensor objects."""
        return self._fingerprint, list(state.tensors), list(state.tensors.values())

    def _layout_unchanged(self, state: StreamingState) -> bool:
        seen = state.layout_checked
        return (
            seen is not None
            and seen[0] == self._fingerprint
            and seen[1] == list(state.tensors)
            and all(map(operator.is_, seen[2], state.tensors.values()))
        )

    def _check_state(self, tokens, state) -> None:
        if not isinstance(state, StreamingState):
            raise ValueError(f"state must be a StreamingState, got {type(state).__name__}")
        if state.meta.get("fingerprint") != self._fingerprint:
            raise ValueError(
                "state belongs to a different model config "
                f"({state.meta.get('fingerprint')} != {self._fingerprint})"
            )
        B = state.batch_size
        if tokens.shape[0] != B:
            raise ValueError(f"tokens batch size {tokens.shape[0]} does not match the state's {B}")
        tensors = state.tensors
        pos = tensors.get("pos")
        if pos is not None and pos.device != tokens.device:
            raise ValueError(f"state is on {pos.device}, the model on {tokens.device}")
        if self._layout_unchanged(state):
            return  # the tensors of the last check: only a new or replaced tensor is checked again
        layout = self._state_layout()
        if tensors.keys() != layout.keys():
            missing = sorted(layout.keys() - tensors.keys())
            extra = sorted(tensors.keys() - layout.keys())
            raise ValueError(
                f"state does not match the model: missing tensors {missing[:5]}, "
                f"unexpected {extra[:5]}"
            )
        for name, (shape, floating) in layout.items():
            t = tensors[name]
            if (
                t.shape[0] != B
                or t.dim() != len(shape) + 1
                or t.is_floating_point() != floating
                or any(n != w and w >= 0 for n, w in zip(t.shape[1:], shape))
            ):
                raise ValueError(
                    f"state tensor {name} is {t.dtype} {tuple(t.shape)}, the model "
                    f"needs {'a float' if floating else 'an integer'} tensor of "
                    f"shape {(B, *shape)} (-1: any length)"
                )
        state.layout_checked = self._layout_key(state)

    # ---- paths ------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, resets: torch.Tensor | None = None) -> torch.Tensor:
        """Parallel path. tokens [B, T] -> logits [B, T, V].

        ``resets`` bool [B, T] (optional; integer: non-zero): memory resets before token t (a new
        document starts).
        """
        tokens = self._check_tokens(tokens)
        B, T = tokens.shape
        if resets is not None:
            if not isinstance(resets, torch.Tensor):
                raise ValueError(f"resets must be a torch.Tensor, got {type(resets).__name__}")
            if resets.is_floating_point() or resets.is_complex():
                raise ValueError(f"resets must be a bool (or integer) tensor, got {resets.dtype}")
            if resets.shape != (B, T):
                raise ValueError(f"resets must have shape {(B, T)}, got {tuple(resets.shape)}")
            if resets.device != tokens.device:
                raise ValueError(f"resets are on {resets.device}, the tokens on {tokens.device}")
            resets = resets.to(torch.bool)
        pos, seg = segment_positions(resets, B, T, tokens.device)
        x = x0 = self.emb(tokens)
        for layer in self.layers:
            x = layer(x, pos, seg if resets is not None else None, x0)
        return self.head(self.out_norm(x))

    def init_state(self, batch_size: int, device=None, dtype=None) -> StreamingState:
        """Empty streaming memory for ``batch_size`` conversations."""
        integral = isinstance(batch_size, numbers.Integral) and not isinstance(batch_size, bool)
        if not integral or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        batch_size = int(batch_size)
        p = self.head.weight
        device, dtype = device or p.device, dtype or p.dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
        state = StreamingState(
            {},
            {},
            {
                "fingerprint": self._fingerprint,
                "batch_size": batch_size,
                "memory": self.cfg.memory.kind,
                "tokens": 0,
            },
        )
        state.add("pos", torch.zeros(batch_size, dtype=torch.long, device=device), 0)
        for i, layer in enumerate(self.layers):
            layer.self_attn.init_state(state.scope(f"layers.{i}."), batch_size, device, dtype)
            if layer.is_ttt:  # fast weights and their buffers stay fp32 whatever ``dtype`` is
                layer.gating.init_state(state.scope(f"layers.{i}.ttt."), batch_size, device)
        state.layout_checked = self._layout_key(state)
        return state

    def step(self, tokens: torch.Tensor, state: StreamingState):
        """Streaming path: tokens [B, k] (any k >= 1) -> (logits [B, k, V], state updated in
        place)."""
        tokens = self._check_tokens(tokens)
        self._check_state(tokens, state)
        k = tokens.shape[1]
        pos = state["pos"][:, None] + torch.arange(k, device=tokens.device)  # [B, k]
        x = x0 = self.emb(tokens)
        for i, layer in enumerate(self.layers):
            x = layer.step(x, pos, state.scope(f"layers.{i}."), x0)
        state["pos"].add_(k)
        state.meta["tokens"] += k  # tokens streamed since init (all rows; resets do not rewind it)
        state.layout_checked = self._layout_key(state)  # a full memory may have grown its tensors
        return self.head(self.out_norm(x)), state
