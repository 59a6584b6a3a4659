"""What the Moshi adapter changes in a stock ``LMModel``: a frozen config with named presets."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from ..config import InPlaceTTTConfig, MemoryConfig, inplace_ttt_from_dict, memory_from_dict

# "full" grows: no CUDA graph
ADAPTER_MEMORY_KINDS = ("window", "sink", "pooled", "infini", "ttt_cache")
BASE_MEMORY_KINDS = ("window", "sink")


@dataclass(frozen=True)
class AdapterConfig:
    """Which layers of Moshi's main transformer change, and how.

    ``inplace_ttt``: In-Place TTT in the gating (MLP) of ``inplace_ttt.layers``; ``target="hidden"``
    (the layer's normalised MLP input, continual training) is the natural choice for a pretrained
    Moshi. ``memory``: the attention memory of ``memory_layers`` (None: every layer).
    ``base_memory``: a ``window`` or ``sink`` memory for the other layers (None: Moshi's own ring
    KV cache, of ``context`` steps when given, else the checkpoint's; it is exact for one step a
    call, or while a conversation fits in it: our memories are exact for any step count).
    ``gate_init``: initial gate logit of evicting memories (σ(6) = 0.9975 of the weight on the exact
    window, so a fresh model is close to stock and the gate still learns). ``yarn_scale``: YaRN
    factor s on Moshi's RoPE (original context = the checkpoint's context). ``respect_exec_mask``:
    rows that Moshi's ``set_exec_mask`` turns off keep their memory unchanged (one-token steps of
    the window, the TTT cache and In-Place TTT mask their own writes; other steps copy the state
    they change, once per step).
    """

    inplace_ttt: InPlaceTTTConfig | None = None
    memory: MemoryConfig | None = None
    memory_layers: tuple[int, ...] | None = None
    base_memory: MemoryConfig | None = None
    context: int | None = None
    gate_init: float = 6.0
    yarn_scale: float | None = None
    respect_exec_mask: bool = True

    def __post_init__(self):
        if self.memory_layers is not None:
            object.__setattr__(self, "memory_layers", tuple(int(i) for i in self.memory_layers))
            if len(set(self.memory_layers)) != len(self.memory_layers):
                raise ValueError(
                    f"AdapterConfig.memory_layers has duplicates: {self.memory_layers}"
                )
        if self.inplace_ttt is not None and not isinstance(self.inplace_ttt, InPlaceTTTConfig):
            raise ValueError("AdapterConfig.inplace_ttt must be an InPlaceTTTConfig or None")
        for name, kinds in (("memory", ADAPTER_MEMORY_KINDS), ("base_memory", BASE_MEMORY_KINDS)):
            m = getattr(self, name)
            if m is None:
                continue
            if not isinstance(m, MemoryConfig):
                raise ValueError(f"AdapterConfig.{name} must be a MemoryConfig or None")
            if m.kind not in kinds:
                raise ValueError(
                    f"AdapterConfig.{name}.kind={m.kind!r} is not supported in Moshi: expected one "
                    f"of {kinds} (a 'full' memory grows every step; use context=N instead)"
                )
        if self.memory is None and self.memory_layers is not None:
            raise ValueError("AdapterConfig.memory_layers is set but memory is None")
        if self.context is not None and self.context < 1:
            raise ValueError(f"AdapterConfig.context must be >= 1 or None, got {self.context}")
        if not math.isfinite(self.gate_init):
            raise ValueError(f"AdapterConfig.gate_init must be finite, got {self.gate_init}")
        if self.yarn_scale is not None and not (
            math.isfinite(self.yarn_scale) and self.yarn_scale > 1
        ):
            raise ValueError(
                "AdapterConfig.yarn_scale must be a finite number > 1 or None, got "
                f"{self.yarn_scale}"
            )

    def memory_layer_set(self, num_layers: int) -> tuple[int, ...]:
        if self.memory is None:
            return ()
        return tuple(range(num_layers)) if self.memory_layers is None else self.memory_layers

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "AdapterConfig":
        d = dict(d)
        for name in ("memory", "base_memory"):
            if d.get(name) is not None:
                d[name] = memory_from_dict(d[name])
        if d.get("inplace_ttt") is not None:
            d["inplace_ttt"] = inplace_ttt_from_dict(d["inplace_ttt"])
        if d.get("memory_layers") is not None:
            d["memory_layers"] = tuple(d["memory_layers"])
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "AdapterConfig":
        return cls.from_dict(json.loads(s))

    @classmethod
    def preset(cls, name: str, num_layers: int = 32, **overrides) -> "AdapterConfig":
        """A named preset for a model of ``num_layers`` layers, fields replaced by ``overrides``.

        ``off``: stock Moshi. ``inplace_ttt``: In-Place TTT in every 6th layer (5, 11, ...; the
        paper's spacing), chunk 256 steps (20.5 s). ``ttt_cache``: the TTT cache (window 64,
        8 virtual tokens, compressors of width 32 per head) in every 4th layer, a 64-step window
        in the others: about 52 MB of state per conversation on the 7B.
        ``both``: the two together.
        """
        if name not in PRESET_NAMES:
            raise ValueError(f"unknown adapter preset {name!r}: expected one of {PRESET_NAMES}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        ttt = InPlaceTTTConfig(
            layers=tuple(range(5, num_layers, 6)) or (num_layers - 1,),
            chunk_size=256,
            lr=0.3,
            target="hidden",
        )
        cache = dict(
            memory=MemoryConfig(
                kind="ttt_cache", window=64, num_virtual=8, block=16, compressor_hidden=32
            ),
            memory_layers=tuple(range(3, num_layers, 4)) or (num_layers - 1,),
            base_memory=MemoryConfig(kind="window", window=64),
        )
        base = {
            "off": {},
            "inplace_ttt": dict(inplace_ttt=ttt),
            "ttt_cache": cache,
            "both": dict(inplace_ttt=ttt, **cache),
        }[name]
        return cls(**{**base, **overrides})


PRESET_NAMES = ("off", "inplace_ttt", "ttt_cache", "both")


def tiny_lm_kwargs(**overrides) -> dict:
    """``LMModel`` keyword arguments of a tiny Moshi (the 7B's layout: RMS norm, RoPE, SiLU gating,
    a depformer with weights per step; 4 audio codebooks) for CPU tests and smoke runs."""
    kw = dict(
        dim=32,
        text_card=50,
        existing_text_padding_id=3,
        n_q=4,
        dep_q=2,
        card=40,
        num_heads=4,
        num_layers=3,
        hidden_scale=4.125,
        causal=True,
        layer_scale=None,
        context=64,
        max_period=10000,
        gating="silu",
        norm="rms_norm_f32",
        positional_embedding="rope",
        depformer_dim=16,
        depformer_dim_feedforward=32,
        depformer_num_heads=2,
        depformer_num_layers=1,
        depformer_layer_scale=None,
        depformer_multi_linear=True,
        depformer_context=2,
        depformer_max_period=10000,
        depformer_gating="silu",
        depformer_pos_emb="none",
        depformer_weights_per_step=True,
        delays=[0, 0, 1, 0, 1],
    )
    return {**kw, **overrides}
