"""moshi-ttt: test-time-training memory for streaming language models."""

from .config import PRESETS, InPlaceTTTConfig, MemoryConfig, ModelConfig
from .models.lm import StreamingLM
from .state import StreamingState

__all__ = [
    "InPlaceTTTConfig",
    "MemoryConfig",
    "ModelConfig",
    "PRESETS",
    "StreamingLM",
    "StreamingState",
]
