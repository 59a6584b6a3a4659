"""The project's tensor states inside Moshi's streaming protocol (``moshi.modules.streaming``).

A ``TensorState`` is a Moshi ``State`` holding a ``StreamingState`` (named tensors, batch first):
Moshi's ``reset_streaming(mask)`` resets exactly the masked rows in place, and ``exec_masked``
makes a step a no-op for rows whose ``exec_mask`` is off. Every update is an in-place tensor op,
so a CUDA graph captured once replays all of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
from moshi.modules.streaming import State, StreamingModule
from moshi.modules.transformer import RingKVCache

from ..state import StreamingState


def empty_state(batch_size: int) -> StreamingState:
    return StreamingState({}, {}, {"batch_size": batch_size})


@dataclass
class TensorState(State):
    tensors: StreamingState | None = None

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        self.tensors.reset(reset_mask)


@contextlib.contextmanager
def exec_masked(tensors: StreamingState, exec_mask: torch.Tensor, enabled: bool = True):
    """Rows with ``exec_mask`` False get their tensors back as they were before the block."""
    if not enabled:
        yield
        return
    before = {k: t.clone() for k, t in tensors.tensors.items()}
    yield
    for k, t in tensors.tensors.items():
        m = exec_mask.view(-1, *([1] * (t.dim() - 1)))
        t.copy_(torch.where(m, t, before[k]))


def _tensors_of(state) -> list[torch.Tensor]:
    out = []
    for f in dataclasses.fields(state):
        v = getattr(state, f.name)
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, StreamingState):
            out.extend(v.tensors.values())
        elif isinstance(v, RingKVCache):
            out.extend((v.cache, v.end_offset))
    return out


def detach_streaming_state(module: StreamingModule) -> None:
    """Cut the autograd history of every streaming tensor of ``module`` and its children (in
    place), so the next segment's gradients stop at the carried state (truncated BPTT)."""
    for state in module.get_streaming_state().values():
        if state is None:
            continue
        for t in _tensors_of(state):
            if t.grad_fn is not None or t.requires_grad:
                t.detach_()


def state_nbytes(module: StreamingModule) -> int:
    """Bytes of every streaming tensor of ``module`` (Moshi's KV caches and ours), all rows."""
    seen, total = set(), 0
    for state in module.get_streaming_state().values():
        if state is None:
            continue
        for t in _tensors_of(state):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total
