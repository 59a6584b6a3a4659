"""A conversation's whole LMGen streaming state (Moshi's caches, our fast weights, compressor states
and rings, LMGen's delay cache and offsets) as named tensors, stored in a ``SessionStore``."""

from __future__ import annotations

import dataclasses

import torch
from moshi.modules.streaming import StreamingModule
from moshi.modules.transformer import RingKVCache

from ..state import StreamingState

STATE_KIND = "moshi.lmgen/1"


def _states(module: StreamingModule) -> dict:
    """Streaming states by module name; an LMGen's model (not its child module) under ``lm.``."""
    states = dict(module.get_streaming_state())
    inner = getattr(module, "lm_model", None)
    if isinstance(inner, StreamingModule):
        states.update({f"lm.{k}" if k else "lm": v for k, v in inner.get_streaming_state().items()})
    return states


def streaming_tensors(module: StreamingModule) -> tuple[dict[str, torch.Tensor], dict]:
    """Every streaming tensor of ``module`` (an LMGen: with its model's) by name, and their
    integer fields."""
    tensors, ints = {}, {}
    for mod, state in _states(module).items():
        if state is None:
            continue
        for f in dataclasses.fields(state):
            v, key = getattr(state, f.name), f"{mod}.{f.name}" if mod else f.name
            if isinstance(v, torch.Tensor):
                tensors[key] = v
            elif isinstance(v, StreamingState):
                tensors.update({f"{key}.{k}": t for k, t in v.tensors.items()})
            elif isinstance(v, RingKVCache):
                tensors[f"{key}.cache"], tensors[f"{key}.end_offset"] = v.cache, v.end_offset
            elif isinstance(v, int) and not isinstance(v, bool):
                ints[key] = v
    return tensors, ints


def load_streaming_tensors(
    module: StreamingModule, tensors: dict[str, torch.Tensor], ints: dict
) -> None:
    """Copy a saved state into ``module``'s live streaming state, in place (CUDA graphs stay
    valid)."""
    own, own_ints = streaming_tensors(module)
    if set(own) != set(tensors) or set(own_ints) != set(ints):
        diff = sorted(set(own) ^ set(tensors) | set(own_ints) ^ set(ints))
        raise ValueError(
            f"stored LMGen state does not match this model's streaming state: {diff[:5]}"
        )
    for k, t in own.items():
        if t.shape != tensors[k].shape or t.dtype != tensors[k].dtype:
            raise ValueError(
                f"stored LMGen state {k}: {tuple(tensors[k].shape)} {tensors[k].dtype}, "
                f"expected {tuple(t.shape)} {t.dtype}"
            )
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(tensors[k])
    states = _states(module)
    for key, v in ints.items():
        mod, _, field = key.rpartition(".")
        setattr(states[mod], field, int(v))


def save_lmgen(store, cid: str, lm_gen: StreamingModule, identity, tokens: int | None = None):
    """Store ``lm_gen``'s whole batch-1 streaming state under ``cid`` (``identity``: from
    ``sessions.module_identity(lm, config, STATE_KIND)``)."""
    tensors, ints = streaming_tensors(lm_gen)
    return store.put_tensors(
        cid, {k: t.detach().cpu() for k, t in tensors.items()}, {"ints": ints}, identity, tokens
    )


def resume_lmgen(store, cid: str, lm_gen: StreamingModule, identity) -> None:
    """Load ``cid`` into ``lm_gen`` (already streaming with the same batch size) after the store's
    identity, format and hash checks."""
    tensors, meta = store.get_tensors(cid, identity)
    load_streaming_tensors(lm_gen, tensors, meta["ints"])
