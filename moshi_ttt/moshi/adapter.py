"""``patch_lm``: put In-Place TTT, attention memories and YaRN into a stock Moshi ``LMModel``.

Modules are swapped in place through Moshi's own structure (``lm.transformer.layers[i].gating``,
``.self_attn``, the shared ``rope``), keeping every stock parameter under its stock name, so a
stock checkpoint loads strictly before or after patching. New parameters start where the method
allows the stock model: In-Place TTT as the plain MLP (conv 0), evicting memories with the gate on
the exact window (``gate_init``) and no virtual tokens before the first eviction (``cold_start``).
"""

from __future__ import annotations

import torch
from moshi.models.lm import LMModel
from moshi.modules.streaming import StreamingModule
from torch import nn

from .attention import MemoryAttention, YarnRope
from .config import AdapterConfig
from .gating import EmbeddingTap, TTTGating

PATCHED = (TTTGating, MemoryAttention)


def _check(lm: LMModel, cfg: AdapterConfig) -> int:
    if not isinstance(lm, LMModel):
        raise ValueError(f"patch_lm needs a moshi LMModel, got {type(lm).__name__}")
    if not isinstance(cfg, AdapterConfig):
        raise ValueError(f"patch_lm needs an AdapterConfig, got {type(cfg).__name__}")
    if getattr(lm, "moshi_ttt_config", None) is not None:
        raise ValueError("this LMModel is already patched (unpatch_lm it first)")
    if any(m.is_streaming for m in lm.modules() if isinstance(m, StreamingModule)):
        raise ValueError("patch the LMModel before it starts streaming")
    n = len(lm.transformer.layers)
    for what, layers in (
        ("inplace_ttt.layers", cfg.inplace_ttt.layers if cfg.inplace_ttt else ()),
        ("memory_layers", cfg.memory_layer_set(n)),
    ):
        bad = [i for i in layers if not 0 <= i < n]
        if bad:
            raise ValueError(f"AdapterConfig.{what} {bad} out of range for Moshi's {n} layers")
    if (
        cfg.yarn_scale is not None or cfg.memory is not None or cfg.base_memory is not None
    ) and lm.transformer.rope is None:
        raise ValueError(
            "memories and YaRN need a Moshi model with RoPE (positional_embedding='rope')"
        )
    if cfg.yarn_scale is not None and lm.context is None:
        raise ValueError("YaRN needs the model's trained context (LMModel.context is None)")
    return n


def patch_lm(lm: LMModel, cfg: AdapterConfig) -> LMModel:
    """Patch ``lm`` in place (and return it). ``unpatch_lm`` gives the stock modules back."""
    n = _check(lm, cfg)
    tr = lm.transformer
    originals = {
        "rope": tr.rope,
        "layers": [(layer.self_attn, layer.gating, layer.self_attn.context) for layer in tr.layers],
    }
    handles = []
    if cfg.yarn_scale is not None:
        dh = lm.dim // tr.layers[0].self_attn.num_heads
        rope = YarnRope(tr.rope, dh, cfg.yarn_scale, lm.context).to(
            lm.transformer.layers[0].gating.linear_in.weight.device
        )
        tr.rope = rope
        for layer in tr.layers:
            layer.self_attn.rope = rope
    tap = None
    if cfg.inplace_ttt is not None and cfg.inplace_ttt.target == "embed":
        tap = EmbeddingTap()
        handles.append(tap.attach(tr))
    mem_layers = set(cfg.memory_layer_set(n))
    for i, layer in enumerate(tr.layers):
        name = f"transformer.layers.{i}.self_attn"
        mem = cfg.memory if i in mem_layers else cfg.base_memory
        if mem is not None:
            layer.self_attn = MemoryAttention(
                layer.self_attn, mem, name, cfg.yarn_scale, lm.context, cfg.respect_exec_mask
            )
            if isinstance(layer.self_attn.memory, nn.Module) and hasattr(
                layer.self_attn.memory, "gate"
            ):
                with torch.no_grad():
                    layer.self_attn.memory.gate.fill_(cfg.gate_init)
        elif cfg.context is not None:
            layer.self_attn.context = cfg.context
        if cfg.inplace_ttt is not None and i in cfg.inplace_ttt.layers:
            layer.gating = TTTGating(layer.gating, cfg.inplace_ttt, tap, cfg.respect_exec_mask)
    _forget_children(lm)
    lm.moshi_ttt_config, lm.moshi_ttt_originals, lm.moshi_ttt_handles = cfg, originals, handles
    return lm


def unpatch_lm(lm: LMModel) -> LMModel:
    """Give ``lm`` its stock modules back (the new parameters are dropped)."""
    if getattr(lm, "moshi_ttt_config", None) is None:
        raise ValueError("this LMModel is not patched")
    tr, orig = lm.transformer, lm.moshi_ttt_originals
    tr.rope = orig["rope"]
    for layer, (attn, gating, context) in zip(tr.layers, orig["layers"]):
        layer.self_attn, layer.gating = attn, gating
        attn.rope, attn.context = orig["rope"], context
    for h in lm.moshi_ttt_handles:
        h.remove()
    _forget_children(lm)
    lm.moshi_ttt_config = lm.moshi_ttt_originals = lm.moshi_ttt_handles = None
    return lm


def _forget_children(lm: nn.Module) -> None:
    """Moshi caches each module's streaming children on first use; swapped modules need a fresh
    walk."""
    for m in lm.modules():
        if isinstance(m, StreamingModule):
            m._cached_children = None


def added_keys(lm: LMModel) -> list[str]:
    """``state_dict`` keys of the parameters (and persistent buffers) the adapter added."""
    return [
        f"{prefix}.{k}"
        for prefix, m in lm.named_modules()
        if isinstance(m, PATCHED)
        for k in m.added_keys()
    ]


def added_state_dict(lm: LMModel, state: dict | None = None) -> dict[str, torch.Tensor]:
    """The adapter's parameters of ``state`` (a whole state dict of ``lm``) or
    ``lm.state_dict()``."""
    sd = lm.state_dict() if state is None else state
    return {k: sd[k] for k in added_keys(lm)}


def adapter_config(lm: LMModel) -> AdapterConfig:
    cfg = getattr(lm, "moshi_ttt_config", None)
    if cfg is None:
        raise ValueError("this LMModel is not patched (patch_lm it first)")
    return cfg
