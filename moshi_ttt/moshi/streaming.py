"""The project's tensor states inside Moshi's streaming protocol (``moshi.modules.streaming``).

A ``TensorState`` is a Moshi ``State`` holding a ``StreamingState`` (named tensors, batch first):
Moshi's ``reset_streaming(mask)`` resets exactly the masked rows in place, and ``exec_masked``
makes a step a no-op for rows whose ``exec_mask`` is off. Every update is an in-place tensor op,
so a CUDA graph captured once replays all of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
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


RING_NAMES = ("k", "v", "kraw", "kpos")  # ring buffers of layers/memory.py and layers/evicting.py


def _ring_index(t: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """slots [B, n] -> an index into the ring axis of t ([B, H, W, Dh]: dim 2; [B, W]: dim 1)."""
    if t.dim() == 2:
        return slots
    return slots[:, None, :, None].expand(t.shape[0], t.shape[1], slots.shape[1], t.shape[3])


@contextlib.contextmanager
def exec_masked(
    tensors: StreamingState,
    exec_mask: torch.Tensor,
    enabled: bool = True,
    ring_slots: Callable[[], torch.Tensor] | None = None,
    skip: tuple = (),
):
    """Rows with ``exec_mask`` False get their tensors back as they were before the block.

    ``ring_slots`` () -> [B, n]: the only slots the block writes in the ring buffers
    (``RING_NAMES``), so only those are saved and restored, formed only when some ring is not in
    ``skip``; every other tensor is saved whole, but those named in ``skip`` (the block itself
    leaves them unchanged for those rows).
    """
    if not enabled:
        yield
        return
    rings = {k for k in tensors.tensors if k in RING_NAMES and k not in skip}
    ring_slots = ring_slots() if rings and ring_slots is not None else None
    rings = rings if ring_slots is not None else set()
    before = {
        k: t.gather(1 if t.dim() == 2 else 2, _ring_index(t, ring_slots))
        if k in rings
        else t.clone()
        for k, t in tensors.tensors.items()
        if k not in skip
    }
    yield
    for k, t in tensors.tensors.items():
        if k in skip:
            continue
        m = exec_mask.view(-1, *([1] * (t.dim() - 1)))
        if k in rings:
            dim, idx = (1 if t.dim() == 2 else 2), _ring_index(t, ring_slots)
            t.scatter_(dim, idx, torch.where(m, t.gather(dim, idx), before[k]))
        else:
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
