"""What a stored state belongs to: the model's config hash and a hash of its weights."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch
from torch import nn

STREAMING_LM = "moshi_ttt.StreamingState"  # the state_kind of StreamingLM states


def weights_hash(module: nn.Module) -> str:
    """sha256 over every state_dict tensor in name order (name, dtype, shape, raw bytes).

    Deterministic across processes and devices; about 1 GB/s on one CPU core.
    """
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            # raw bytes, any dtype
            h.update(t.contiguous().view(-1).view(torch.uint8).cpu().numpy().data)
    return h.hexdigest()


def config_hash(config: dict) -> str:
    """Short stable hash of a JSON-able config (the same recipe as ``ModelConfig.fingerprint``)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True, eq=False)
class ModelIdentity:
    """The model a state belongs to. ``state_kind`` names the state's layout (``STREAMING_LM`` or,
    e.g., the Moshi adapter's LMGen state); ``memory`` is a label shown by ``sessions list``."""

    state_kind: str
    config_hash: str
    weights_hash: str
    memory: str = ""
    config: dict = field(default_factory=dict)


def identity_of(model) -> ModelIdentity:
    """The identity of a StreamingLM: its config fingerprint and the hash of its weights."""
    cfg = model.cfg
    memory = cfg.memory.kind + (
        f"+inplace_ttt{list(cfg.inplace_ttt.layers)}" if cfg.inplace_ttt else ""
    )
    return ModelIdentity(
        STREAMING_LM, cfg.fingerprint(), weights_hash(model), memory, cfg.to_dict()
    )


def module_identity(
    module: nn.Module, config: dict, state_kind: str, memory: str = ""
) -> ModelIdentity:
    """The identity of any module whose streaming state is stored through
    ``SessionStore.put_tensors``
    (e.g. the Moshi adapter's LMGen): ``config`` must be JSON-able and name everything that shapes
    the state."""
    return ModelIdentity(
        state_kind, config_hash(config), weights_hash(module), memory, dict(config)
    )
