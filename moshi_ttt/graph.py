"""A streaming step captured once as a CUDA graph and replayed for every new token."""

from __future__ import annotations

import torch

from .models.lm import StreamingLM
from .state import StreamingState


class GraphedStep:
    """``step(tokens)`` for a fixed [B, k] token shape: copies the tokens in, replays the graph,
    returns the logits (a buffer overwritten by the next call: clone it to keep it). The state is
    updated in place, exactly as ``model.step`` would (every memory but ``full``)."""

    def __init__(
        self, model: StreamingLM, state: StreamingState, tokens_per_step: int = 1, warmup: int = 3
    ):
        if model.cfg.memory.kind == "full":
            raise ValueError(
                "a full-attention state grows every step and cannot be replayed as a CUDA graph"
            )
        device = state["pos"].device
        self.state = state
        self.tokens = torch.zeros(
            state.batch_size, tokens_per_step, dtype=torch.long, device=device
        )
        scratch = StreamingState(
            {k: v.clone() for k, v in state.tensors.items()}, dict(state.fills), dict(state.meta)
        )
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a copy, so the real state is untouched
            for _ in range(warmup):
                model.step(self.tokens, scratch)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits, _ = model.step(self.tokens, state)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits
