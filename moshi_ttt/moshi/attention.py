"""A project memory (layers/memory.py, layers/evicting.py) in a Moshi attention layer, and YaRN on
Moshi's RoPE.

``MemoryAttention`` subclasses Moshi's ``StreamingMultiheadAttention`` and takes over the stock
layer's ``in_projs`` / ``out_projs`` (same parameters, same names) and RoPE (Moshi's interleaved
layout: ``ops.rope.apply_rope_qk`` computes it bit for bit). Keys and values go to the memory
instead of Moshi's ``RingKVCache``: ``window``/``sink`` (exact rings, masks from absolute
positions) or an evicting memory (``ttt_cache``, ``pooled``, ``infini``: the window plus a memory
of every evicted token). Positions are Moshi's per-row offsets, so a reset row restarts at 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from moshi.modules.rope import RotaryEmbedding
from moshi.modules.transformer import StreamingMultiheadAttention, _MHAState
from torch import nn

from ..config import MemoryConfig
from ..layers.memories import make_memory
from ..layers.memory import Heads
from ..ops.rope import apply_rope_qk, rope_frequencies, yarn_attention_scale, yarn_frequencies
from ..state import StreamingState
from .streaming import empty_state, exec_masked


def rope_freqs(
    max_period: float, head_dim: int, yarn_scale: float | None, original_context: int | None
):
    """Moshi's RoPE frequencies, or YaRN's (ops/rope.py) when ``yarn_scale`` is set. [Dh/2] fp32."""
    if yarn_scale is None:
        return rope_frequencies(head_dim, max_period)
    return yarn_frequencies(head_dim, max_period, yarn_scale, original_context)


class YarnRope(nn.Module):
    """Drop-in for Moshi's ``RotaryEmbedding`` with YaRN: pairs rotate at h(θ_d) and q, k are each
    multiplied by √(1/t) = 0.1 ln s + 1, so Moshi's softmax sees qᵀk / (t √Dh) (YaRN §3.2, §3.4)."""

    def __init__(self, stock: RotaryEmbedding, head_dim: int, scale: float, original_context: int):
        super().__init__()
        if not stock.interleave:
            raise ValueError(
                "YaRN is implemented for Moshi's interleaved RoPE only ('rope', not 'rope_concat')"
            )
        self.max_period, self.interleave, self.scale = stock.max_period, True, scale
        self.mscale = yarn_attention_scale(scale)
        self.register_buffer(
            "freqs",
            rope_freqs(stock.max_period, head_dim, scale, original_context),
            persistent=False,
        )

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        offset: torch.Tensor,
        time_before_heads: bool = False,
    ):
        """q, k [B, H, T, D] (or [B, T, H, D] with ``time_before_heads``); offset [B] -> rotated,
        scaled."""
        if time_before_heads:
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        pos = offset.view(-1, 1) + torch.arange(q.shape[2], device=q.device)  # [B, T]
        qo, ko = apply_rope_qk(q, k, pos, self.freqs)
        qo = (qo.float() * self.mscale).to(q.dtype)
        ko = (ko.float() * self.mscale).to(k.dtype)
        if time_before_heads:
            qo, ko = qo.transpose(1, 2), ko.transpose(1, 2)
        return qo, ko


@dataclass
class _MemoryState(_MHAState):
    tensors: StreamingState | None = None

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        self.tensors.reset(reset_mask)


class MemoryAttention(StreamingMultiheadAttention):
    def __init__(
        self,
        stock: StreamingMultiheadAttention,
        memory: MemoryConfig,
        name: str = "",
        yarn_scale: float | None = None,
        original_context: int | None = None,
        respect_exec_mask: bool = True,
    ):
        if (
            stock.cross_attention
            or stock.weights_per_step
            or stock.kv_repeat != 1
            or not stock.causal
        ):
            raise ValueError(
                f"{name}: a memory needs causal self-attention without weights_per_step or "
                "kv_repeat"
            )
        if stock.rope is None or not getattr(stock.rope, "interleave", False):
            raise ValueError(
                f"{name}: a memory needs Moshi's interleaved RoPE ('rope' positional embedding)"
            )
        w = stock.in_projs[0].weight
        super().__init__(
            stock.embed_dim,
            stock.num_heads,
            causal=True,
            context=stock.context,
            rope=stock.rope,
            device="meta",
        )  # the projections are the stock ones, set below
        self.in_projs, self.out_projs = stock.in_projs, stock.out_projs
        H, Dh = stock.num_heads, stock.embed_dim // stock.num_heads
        self.mem_cfg, self.head_dim, self.respect_exec_mask = memory, Dh, respect_exec_mask
        mem = make_memory(memory, H, Dh, yarn_scale)
        if isinstance(mem, nn.Module):
            mem.name = name or mem.name  # named in finite-check errors
            mem.to(device=w.device, dtype=w.dtype)
        self.memory = mem
        freqs = rope_freqs(stock.rope.max_period, Dh, yarn_scale, original_context).to(w.device)
        self.register_buffer("freqs", freqs, persistent=False)

    def added_keys(self) -> tuple[str, ...]:
        return (
            tuple("memory." + k for k in self.memory.state_dict())
            if isinstance(self.memory, nn.Module)
            else ()
        )

    def _init_streaming_state(self, batch_size: int) -> _MemoryState:
        w = self.in_projs[0].weight
        st = empty_state(batch_size)
        self.memory.init(st.scope(""), batch_size, w.device, w.dtype)
        return _MemoryState(
            batch_size,
            w.device,
            None,
            offset=torch.zeros(batch_size, device=w.device, dtype=torch.long),
            offset_cpu=0,
            tensors=st,
        )

    def _attend(self, x: Heads, pos, state):
        """The layer's ``Heads`` [B, H, T, Dh] at pos [B, T] -> [B, H, T, Dh]. A row off Moshi's
        exec mask evicts and stores nothing (the memory's ``self_masked`` state, the rest
        restored by ``exec_masked``)."""
        if state is None:
            return self.memory.attend_parallel(x, pos, None, self.freqs)
        active = state.exec_mask if self.respect_exec_mask else None
        return self.memory.attend_step(x, pos, state.tensors.scope(""), self.freqs, active)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Self-attention of query [B, T, D] (key, value: the same tensor, as Moshi passes them)."""
        state = self._streaming_state
        B, T = query.shape[:2]
        offset = (
            state.offset
            if state is not None
            else torch.zeros(B, device=query.device, dtype=torch.long)
        )
        q, k, v = rearrange(
            self.in_projs[0](query), "b t (p h d) -> p b h t d", p=3, h=self.num_heads
        )
        pos = offset[:, None] + torch.arange(T, device=query.device)  # [B, T] absolute positions
        qr, kr = apply_rope_qk(q, k, pos, self.freqs)
        x = Heads(v=v, q=qr, k=kr, q_raw=q, k_raw=k)
        if state is None:
            o = self._attend(x, pos, None)
        else:
            own = self.memory.self_masked(T)  # state the memory itself keeps for off rows
            W = self.mem_cfg.window
            slots = lambda: pos[:, -W:] % W  # [B, n] the ring slots this step writes
            with exec_masked(
                state.tensors, state.exec_mask, self.respect_exec_mask, slots, skip=own
            ):
                o = self._attend(x, pos, state)
        x = self.out_projs[0](rearrange(o.to(query.dtype), "b h t d -> b t (h d)"))
        if state is not None:
            # offset += T on rows of the exec mask: one in-place kernel, no device copy (a copy
            # is a memcpy node in a captured CUDA graph)
            state.offset.add_(state.exec_mask, alpha=T)
            state.offset_cpu += T
        return x
