"""The registry of memories: ``make_memory`` builds the one a ``MemoryConfig`` names."""

from __future__ import annotations

from ..config import MemoryConfig
from .infini import InfiniMemory
from .memory import FullMemory, SinkMemory, WindowMemory
from .pooled import PooledMemory
from .ttt_cache import TTTCacheMemory

MEMORIES = {
    "full": FullMemory,
    "window": WindowMemory,
    "sink": SinkMemory,
    "pooled": PooledMemory,
    "infini": InfiniMemory,
    "ttt_cache": TTTCacheMemory,
}


def make_memory(cfg: MemoryConfig, heads: int, head_dim: int, rope_scale: float | None = 1.0):
    """The memory of ``cfg.kind`` for ``heads`` heads of ``head_dim`` (``rope_scale`` YaRN's
    scale: its softmax temperature applies to every logit; None or 1: none)."""
    if cfg.kind not in MEMORIES:
        raise ValueError(
            f"memory kind {cfg.kind!r} has no implementation (known: {', '.join(MEMORIES)})"
        )
    return MEMORIES[cfg.kind](cfg, heads, head_dim, rope_scale or 1.0)
