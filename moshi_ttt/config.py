"""Frozen configs for the model, its memory and In-Place TTT, with named presets."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field

MEMORY_KINDS = ("full", "window", "sink", "pooled", "infini", "ttt_cache")
IMPLEMENTED_MEMORY_KINDS = MEMORY_KINDS
COMBINES = ("gate", "concat")  # separate softmaxes mixed by a learned gate / one softmax
VIRTUAL_POSITIONS = ("relative", "decay", "none")  # RoPE offsets / recency bias / none
COLD_STARTS = ("zero", "learned", "wait")  # zero output layer / learned state / no read
# a window plus a read of evicted tokens, mixed by α
GATED_KINDS = ("pooled", "infini", "ttt_cache")
GRAD_PRECISIONS = ("tf32", "fp32")  # products in the backward of the fused compressor scan (GPU)


@dataclass(frozen=True)
class MemoryConfig:
    """What each attention layer remembers.

    ``full``: every past token. ``window``: the last ``window`` tokens (ring buffer).
    ``sink``: the first ``num_sink`` tokens of the stream plus the last ``window`` (StreamingLLM).
    ``pooled``: the window plus the evicted tokens averaged into ``num_virtual`` slots.
    ``infini``: the window plus Infini-attention's linear memory of evicted tokens, gated.
    ``ttt_cache``: the window plus a compressor (per head, fast weights) that learns every evicted
    (key, value) pair in mini-batches of ``block`` tokens and offers ``num_virtual`` virtual tokens
    (an evicted token is readable once its block completes; recall held up to ``block`` =
    ``window`` / 2 and fell beyond, docs/results/block-sweep-cpu):
    ``compressor_hidden`` its width (0: 2 x head dim), ``compressor_depth`` its layers (2 or 3),
    ``compressor_shared`` one compressor for all heads of a layer (else one per head), ``inner_lr``
    the bound on its per-token step size, ``decay`` forgetting towards the initial state,
    ``forget_gate`` learns it per block and compressor from the block's keys, λ_n = σ(w·k̄_n + c)
    with c starting at logit(decay) (Titans' data-dependent forgetting; needs decay > 0),
    ``momentum`` (Titans), ``max_state_norm`` a cap on ‖W‖_F, ``combine`` ``"gate"`` (separate
    softmaxes mixed by a learned gate per head) or ``"concat"`` (one softmax), ``virtual_position``
    ``"relative"`` (RoPE offsets), ``"decay"`` (learned recency bias) or ``"none"``, ``cold_start``
    ``"zero"`` (output layer starts at zero), ``"learned"`` (learned initial state) or ``"wait"``
    (no virtual tokens before the first update), ``bptt`` how many compressor updates gradients flow
    through (0: all), ``check_finite`` a per-update check that names the layer and update on
    NaN/Inf, ``compile_scan`` runs the compressor's update loop through torch.compile (autograd
    through compiled steps instead of the hand-written scans of ``ops.ttt_scan_triton`` and
    ``ops.ttt_scan_torch``), ``grad_precision`` the products in the backward of the fused GPU
    scan: ``"tf32"`` (gradients to about 1e-3 relative) or ``"fp32"`` (three TF32 products); its
    forward, the state, is fp32 either way.

    Readers (how attention reads what left the window): ``read_query`` adds one virtual token per
    query read from the state at the query itself, ``V_q = f_θ(q̂_t)``, ``K_q = key_q + V_q A``
    (``ttt_cache``); ``gate_per_token`` makes the window/memory gate a function of the query,
    ``α_t = σ(c_h + w_h·q_t)`` (every kind with a gate: ``ttt_cache``, ``pooled``, ``infini``);
    ``compressor_proj`` gives the compressor its own keys and values, learned projections of the
    evicted token's attention keys and values across all heads (identity at initialisation),
    and the query read its own query (``ttt_cache``). ``gate_init`` is the gate's starting value
    c_h (α = σ(c_h), the window's weight): 0 mixes window and memory equally; a large value starts
    a memory close to the window alone (a memory added to a trained model, or trained from scratch).

    Defaults are the stationary settings measured in docs/results/stationarity: ``decay`` 0.01
    (the compressor's norm stays flat far past the training length) and ``gate_init`` 3 (α = 0.95:
    a memory trained from scratch starts as the window and is not worse than it).
    """

    kind: str = "window"
    window: int = 64
    num_sink: int = 4
    num_virtual: int = 4
    block: int = 16
    compressor_hidden: int = 0
    compressor_depth: int = 2
    compressor_shared: bool = False
    inner_lr: float = 1.0
    decay: float = 0.01
    forget_gate: bool = False
    momentum: float = 0.0
    max_state_norm: float = 100.0
    combine: str = "gate"
    virtual_position: str = "relative"
    cold_start: str = "wait"
    bptt: int = 0
    check_finite: bool = False
    compile_scan: bool = False
    grad_precision: str = "tf32"
    read_query: bool = False
    gate_per_token: bool = False
    compressor_proj: bool = False
    gate_init: float = 3.0

    def __post_init__(self):
        if self.kind not in MEMORY_KINDS:
            raise ValueError(
                f"MemoryConfig.kind={self.kind!r} is unknown: expected one of {MEMORY_KINDS}"
            )
        if self.kind not in IMPLEMENTED_MEMORY_KINDS:
            raise ValueError(
                f"MemoryConfig.kind={self.kind!r} is not implemented yet: "
                f"available kinds are {IMPLEMENTED_MEMORY_KINDS}"
            )
        if self.window < 1:
            raise ValueError(f"MemoryConfig.window must be >= 1, got {self.window}")
        if self.num_sink < 0:
            raise ValueError(f"MemoryConfig.num_sink must be >= 0, got {self.num_sink}")
        if self.kind == "sink" and self.num_sink < 1:
            raise ValueError("MemoryConfig.kind='sink' needs num_sink >= 1")
        if self.num_virtual < 1:
            raise ValueError(f"MemoryConfig.num_virtual must be >= 1, got {self.num_virtual}")
        for name, allowed in (
            ("combine", COMBINES),
            ("virtual_position", VIRTUAL_POSITIONS),
            ("cold_start", COLD_STARTS),
            ("grad_precision", GRAD_PRECISIONS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"MemoryConfig.{name}={getattr(self, name)!r}: expected one of {allowed}"
                )
        if self.block < 1 or self.compressor_hidden < 0 or self.bptt < 0:
            raise ValueError("MemoryConfig.block must be >= 1, compressor_hidden and bptt >= 0")
        if self.compressor_depth not in (2, 3):
            raise ValueError(
                f"MemoryConfig.compressor_depth must be 2 or 3, got {self.compressor_depth}"
            )
        if not 0 < self.inner_lr <= 10:
            raise ValueError(f"MemoryConfig.inner_lr must be in (0, 10], got {self.inner_lr}")
        if not (0 <= self.decay < 1 and 0 <= self.momentum < 1):
            raise ValueError(
                f"MemoryConfig.decay and momentum must be in [0, 1), got {self.decay}, "
                f"{self.momentum}"
            )
        if self.max_state_norm <= 0:
            raise ValueError(f"MemoryConfig.max_state_norm must be > 0, got {self.max_state_norm}")
        if self.forget_gate and (self.kind != "ttt_cache" or self.decay <= 0):
            raise ValueError(
                "MemoryConfig.forget_gate learns a TTT cache's decay from its starting "
                f"value: it needs kind='ttt_cache' and decay > 0, got {self.kind!r}, "
                f"decay={self.decay}"
            )
        for name in ("read_query", "compressor_proj"):
            if getattr(self, name) and self.kind != "ttt_cache":
                raise ValueError(
                    f"MemoryConfig.{name} reads a TTT-cache compressor: it needs "
                    f"kind='ttt_cache', got {self.kind!r}"
                )
        if not math.isfinite(self.gate_init):
            raise ValueError(f"MemoryConfig.gate_init must be finite, got {self.gate_init}")
        if self.gate_per_token and self.kind not in GATED_KINDS:
            raise ValueError(
                f"MemoryConfig.gate_per_token needs a gated memory {GATED_KINDS}, got {self.kind!r}"
            )


@dataclass(frozen=True)
class InPlaceTTTConfig:
    """In-Place TTT on the MLP of the listed layers.

    ``chunk_size`` in tokens (steps: at 12.5 Hz a 256-step chunk is 20.5 s); ``lr`` the fixed inner
    rate η; ``target`` the source X0 of V̂: ``"embed"`` (token embeddings, training from scratch) or
    ``"hidden"`` (the layer's normalised MLP input, continual training); ``clip_tau`` clips ‖ΔW‖_F
    in eval mode only; ``decay`` λ forgets: the sum of updates s = W − W0 becomes
    (1 − λ) s + ΔW at every chunk, so ‖s‖ stays bounded on streams of any length (default 0.5,
    measured in docs/results/stationarity: about the two last chunks count);
    ``reset_on_boundary``: fast weights return to W0 at document boundaries of a
    training sequence (streaming resets are always per row via ``state.reset``);
    ``matmul_precision`` ``"highest"`` (IEEE fp32 products) or ``"high"`` (TF32 products on CUDA):
    sums and state are fp32 either way.
    """

    layers: tuple[int, ...] = ()
    chunk_size: int = 64
    lr: float = 0.3
    target: str = "embed"
    conv_kernel: int = 5
    clip_tau: float | None = None
    decay: float = 0.5
    reset_on_boundary: bool = True
    matmul_precision: str = "highest"

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"InPlaceTTTConfig.layers has duplicates: {self.layers}")
        if self.lr <= 0:
            raise ValueError(f"InPlaceTTTConfig.lr must be > 0, got {self.lr}")
        if self.clip_tau is not None and self.clip_tau <= 0:
            raise ValueError(f"InPlaceTTTConfig.clip_tau must be > 0 or None, got {self.clip_tau}")
        if not 0 <= self.decay < 1:
            raise ValueError(f"InPlaceTTTConfig.decay must be in [0, 1), got {self.decay}")
        if self.chunk_size < 1:
            raise ValueError(f"InPlaceTTTConfig.chunk_size must be >= 1, got {self.chunk_size}")
        if self.target not in ("embed", "hidden"):
            raise ValueError(
                f"InPlaceTTTConfig.target must be 'embed' or 'hidden', got {self.target!r}"
            )
        if self.conv_kernel < 1:
            raise ValueError(f"InPlaceTTTConfig.conv_kernel must be >= 1, got {self.conv_kernel}")
        if self.matmul_precision not in ("highest", "high"):
            raise ValueError(
                f"InPlaceTTTConfig.matmul_precision must be 'highest' or 'high', "
                f"got {self.matmul_precision!r}"
            )


# fields whose default changed after configs were saved without them: a saved config that lacks
# one was made when the field did not exist, so it loads with the value in effect then
MEMORY_LEGACY = {"gate_init": 0.0}
INPLACE_TTT_LEGACY = {"decay": 0.0}


def memory_from_dict(d: dict) -> MemoryConfig:
    """A saved ``MemoryConfig`` (fields it lacks: their value before they existed, else default)."""
    return MemoryConfig(**{**MEMORY_LEGACY, **d})


def inplace_ttt_from_dict(d: dict) -> InPlaceTTTConfig:
    """A saved ``InPlaceTTTConfig``, as ``memory_from_dict``."""
    return InPlaceTTTConfig(**{**INPLACE_TTT_LEGACY, **d, "layers": tuple(d["layers"])})


@dataclass(frozen=True)
class ModelConfig:
    """A Moshi-shaped decoder: embedding, pre-norm blocks (attention + gated MLP), norm, head."""

    vocab_size: int = 256
    dim: int = 64
    num_layers: int = 2
    num_heads: int = 4
    hidden_dim: int = 0  # gated MLP width; 0 means round(dim * 11 / 4) as in Moshi 7B
    max_period: float = 10_000.0
    norm_eps: float = 1e-5
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    inplace_ttt: InPlaceTTTConfig | None = None
    rope_scale: float = 1.0  # YaRN extension factor s (1: plain RoPE); ops/rope.py
    rope_original_context: int = 0  # the context (steps) RoPE was trained on; 0: no YaRN

    def __post_init__(self):
        object.__setattr__(self, "rope_scale", float(self.rope_scale))  # 4 and 4.0: one fingerprint
        object.__setattr__(self, "rope_original_context", int(self.rope_original_context))
        if not (math.isfinite(self.rope_scale) and self.rope_scale >= 1.0):
            raise ValueError(
                f"ModelConfig.rope_scale must be a finite number >= 1, got {self.rope_scale}"
            )
        if self.rope_original_context < 0:
            raise ValueError(
                f"ModelConfig.rope_original_context must be >= 0, got {self.rope_original_context}"
            )
        if self.rope_scale > 1 and self.rope_original_context == 0:
            raise ValueError("ModelConfig.rope_scale > 1 (YaRN) needs rope_original_context >= 1")
        for name in ("vocab_size", "dim", "num_layers", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.num_heads:
            raise ValueError(
                f"ModelConfig.dim={self.dim} is not divisible by num_heads={self.num_heads}"
            )
        if (self.dim // self.num_heads) % 2:
            raise ValueError(f"head dim {self.dim // self.num_heads} must be even for RoPE")
        if self.hidden_dim < 0:
            raise ValueError(f"ModelConfig.hidden_dim must be >= 0, got {self.hidden_dim}")
        if not isinstance(self.memory, MemoryConfig):
            raise ValueError("ModelConfig.memory must be a MemoryConfig")
        if self.inplace_ttt is not None:
            if not isinstance(self.inplace_ttt, InPlaceTTTConfig):
                raise ValueError("ModelConfig.inplace_ttt must be an InPlaceTTTConfig or None")
            bad = [i for i in self.inplace_ttt.layers if not 0 <= i < self.num_layers]
            if bad:
                raise ValueError(
                    f"InPlaceTTTConfig.layers {bad} out of range for {self.num_layers} layers"
                )
        if self.hidden_dim == 0:
            object.__setattr__(self, "hidden_dim", round(self.dim * 11 / 4))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d["memory"] = memory_from_dict(d["memory"])
        if d.get("inplace_ttt") is not None:
            d["inplace_ttt"] = inplace_ttt_from_dict(d["inplace_ttt"])
        return cls(**d)

    def fingerprint(self) -> str:
        """Short stable hash of the config (used to match saved states to models). Fields added
        later (YaRN, compressor depth and sharing) are left out at their defaults, so older
        configs keep their hash."""
        d = self.to_dict()
        for name, default in (("rope_scale", 1.0), ("rope_original_context", 0)):
            if d[name] == default:
                del d[name]
        for name, default in (
            ("compressor_depth", 2),
            ("compressor_shared", False),
            ("read_query", False),
            ("gate_per_token", False),
            ("compressor_proj", False),
            ("gate_init", 0.0),
            ("forget_gate", False),
        ):
            if d["memory"][name] == default:
                del d["memory"][name]
        if d["inplace_ttt"] is not None and d["inplace_ttt"]["decay"] == 0.0:
            del d["inplace_ttt"]["decay"]
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """A named preset (``tiny``, ``small``) with fields replaced by ``overrides``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: expected one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS = {
    # ~0.1M parameters: CPU tests and the default end-to-end job.
    "tiny": ModelConfig(
        vocab_size=256,
        dim=64,
        num_layers=2,
        num_heads=4,
        memory=MemoryConfig(kind="window", window=64),
    ),
    # ~0.5M parameters: the recall study (key-value binding from scratch, window 32).
    "recall": ModelConfig(
        vocab_size=256,
        dim=128,
        num_layers=2,
        num_heads=4,
        memory=MemoryConfig(kind="window", window=32),
    ),
    # ~26M parameters with a byte vocabulary: the GPU study and benchmarks.
    "small": ModelConfig(
        vocab_size=256,
        dim=512,
        num_layers=8,
        num_heads=8,
        memory=MemoryConfig(kind="window", window=256),
    ),
}


def variant(
    base: ModelConfig, spec: str, chunk: int = 64, window: int | None = None
) -> ModelConfig:
    """``base`` with the memory and In-Place TTT named by ``spec``: ``kind``, ``kind+tttN``
    (In-Place
    TTT in every N-th layer: N-1, 2N-1, ...) or ``kind+tttN/tf32`` (TF32 products in its scan)."""
    kind, _, ttt = spec.partition("+ttt")
    mem = dataclasses.replace(base.memory, kind=kind, window=window or base.memory.window)
    cfg = dataclasses.replace(base, memory=mem, inplace_ttt=None)
    if ttt:
        every, _, prec = ttt.partition("/")
        if not every.isdigit() or int(every) < 1 or prec not in ("", "tf32"):
            raise ValueError(f"bad variant {spec!r}: expected KIND, KIND+tttN or KIND+tttN/tf32")
        layers = tuple(range(int(every) - 1, cfg.num_layers, int(every)))
        cfg = dataclasses.replace(
            cfg,
            inplace_ttt=InPlaceTTTConfig(
                layers=layers,
                chunk_size=chunk,
                matmul_precision="high" if prec == "tf32" else "highest",
            ),
        )
    return cfg


# short names of memory fields in run names (``memory_variant``): true booleans as "+alias",
# other values as "-alias<value>"
FIELD_NAMES = {
    "read_query": "query",
    "gate_per_token": "tokgate",
    "compressor_proj": "proj",
    "num_virtual": "M",
    "compressor_hidden": "h",
    "block": "b",
    "forget_gate": "forget",
    "ttt.decay": "tttdecay",
    "ttt.clip_tau": "tttclip",
}


def _field_value(spec: str, key: str, v: str, default):
    """The value of ``key=v`` in a memory spec, of the type of the field's default (a float where
    the default is None)."""
    if isinstance(default, bool):
        if v not in ("true", "false"):
            raise ValueError(f"bad memory {spec!r}: {key} takes true or false, got {v!r}")
        return v == "true"
    kind = float if default is None else type(default)
    try:
        return kind(v)
    except ValueError as e:
        raise ValueError(f"bad memory {spec!r}: {key}={v!r} is not a {kind.__name__}") from e


def memory_variant(
    base: ModelConfig,
    spec: str,
    chunk: int = 64,
    window: int | None = None,
    block: int | None = None,
) -> tuple[str, ModelConfig]:
    """``kind[+tttN[/tf32]][@W][:field=value,...]`` -> (run name, config): ``variant`` of ``spec``'s
    kind and In-Place TTT, ``@W`` another window, ``:field=value`` MemoryConfig fields (booleans
    ``true``/``false``) or ``ttt.field=value`` InPlaceTTTConfig fields (with ``+tttN``), ``block``
    the default block. E.g. ``ttt_cache:read_query=true,num_virtual=8`` ->
    ``ttt_cache-32+query-M8``,
    ``window+ttt2:ttt.decay=0.05`` -> ``window-32+ttt2-tttdecay0.05``."""
    head, _, extra = spec.partition(":")
    head, _, w = head.partition("@")
    if w and not w.isdigit():
        raise ValueError(f"bad memory {spec!r}: @W needs a positive window, got {w!r}")
    cfg = variant(base, head, chunk, int(w) if w else window)
    fields, ttt_fields = ({} if block is None else {"block": block}), {}
    names = {f.name for f in dataclasses.fields(MemoryConfig)} - {"kind"}
    ttt_names = {f.name for f in dataclasses.fields(InPlaceTTTConfig)} - {"layers"}
    suffix = ""
    for item in filter(None, extra.split(",")):
        k, eq, v = item.partition("=")
        group, _, name = k.rpartition(".")
        known = name in names if group == "" else group == "ttt" and name in ttt_names
        if not eq or not known:
            raise ValueError(
                f"bad memory {spec!r}: {item!r} is not FIELD=VALUE of a MemoryConfig "
                "field or ttt.FIELD=VALUE of an InPlaceTTTConfig field"
            )
        if group == "ttt" and cfg.inplace_ttt is None:
            raise ValueError(f"bad memory {spec!r}: {k} sets In-Place TTT, which needs +tttN")
        target, into = (cfg.inplace_ttt, ttt_fields) if group else (cfg.memory, fields)
        into[name] = _field_value(spec, k, v, getattr(target, name))
        alias = FIELD_NAMES.get(k, k)
        suffix += (
            (f"+{alias}" if into[name] else "") if isinstance(into[name], bool) else f"-{alias}{v}"
        )
    cfg = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, **fields))
    if ttt_fields:
        cfg = dataclasses.replace(
            cfg, inplace_ttt=dataclasses.replace(cfg.inplace_ttt, **ttt_fields)
        )
    kind, _, ttt = head.partition("+")
    name = kind if kind == "full" else f"{kind}-{cfg.memory.window}"
    return name + (f"+{ttt.replace('/', '-')}" if ttt else "") + suffix, cfg
