"""Moshi integration: the only subpackage that imports ``moshi``.

``patch_lm(lm, AdapterConfig(...))`` puts In-Place TTT, attention memories (TTT cache, window,
...) and YaRN into a stock ``moshi.models.LMModel``; ``checkpoint`` saves and loads what it added;
``train.conversation_losses`` trains with memory carried across a conversation's segments.
"""

from .adapter import adapter_config, added_keys, added_state_dict, patch_lm, unpatch_lm
from .checkpoint import load_added, load_full, load_stock, save_added, save_full
from .config import PRESET_NAMES, AdapterConfig

__all__ = [
    "AdapterConfig",
    "PRESET_NAMES",
    "patch_lm",
    "unpatch_lm",
    "added_keys",
    "added_state_dict",
    "adapter_config",
    "save_added",
    "load_added",
    "save_full",
    "load_full",
    "load_stock",
]
