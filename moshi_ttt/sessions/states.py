"""StreamingLM states in a SessionStore: one conversation = one batch row, stored as batch 1."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..state import StreamingState
from .format import SessionInfo, serialize
from .identity import STREAMING_LM, ModelIdentity, identity_of

if TYPE_CHECKING:
    from .store import SessionStore


def state_tensors(
    state: StreamingState, row: int | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors [1, ...] each, meta) of one conversation: row ``row`` of a batch, or a batch-1
    state.

    Everything the state holds is kept: fast weights, compressor state, window rings, positions,
    buffers, fills and meta (``tokens`` stays the state's stream counter, which ``full`` uses as
    its slot count).
    """
    if not isinstance(state, StreamingState):
        raise ValueError(f"state must be a StreamingState, got {type(state).__name__}")
    if row is None:
        if state.batch_size != 1:
            raise ValueError(
                f"state has batch size {state.batch_size}: pass row= to store one conversation"
            )
        row = 0
    if not isinstance(row, int) or not 0 <= row < state.batch_size:
        raise ValueError(f"row must be an int in [0, {state.batch_size}), got {row!r}")
    # [1, ...] views; serialize copies
    tensors = {k: v[row : row + 1] for k, v in state.tensors.items()}
    return tensors, {"state_meta": dict(state.meta, batch_size=1), "fills": dict(state.fills)}


def session_bytes(state: StreamingState, row: int | None = None) -> int:
    """Bytes of one conversation's state in the store, from the real state: its blob but for the
    session row the blob also carries (ids, times, meta, model config: about 1-2 KB)."""
    return len(serialize(state_tensors(state, row)[0]))


def save_state(
    store: SessionStore,
    cid: str,
    state: StreamingState,
    model,
    row: int | None = None,
    identity: ModelIdentity | None = None,
) -> SessionInfo:
    """Store one conversation of ``model``'s ``state`` (pass ``identity`` to skip re-hashing the
    weights)."""
    identity = identity or identity_of(model)
    if state.meta.get("fingerprint") != identity.config_hash:
        raise ValueError(
            f"state belongs to a different model config "
            f"({state.meta.get('fingerprint')} != {identity.config_hash})"
        )
    tensors, meta = state_tensors(state, row)
    tokens = int(tensors["pos"][0]) if "pos" in tensors else meta["state_meta"].get("tokens")
    return store.put_tensors(cid, tensors, meta, identity, tokens)


def load_state(
    store: SessionStore, cid: str, model, device=None, identity: ModelIdentity | None = None
) -> StreamingState:
    """The batch-1 state stored under ``cid``, checked against ``model`` (config, weights, names,
    dtypes and shapes), on ``device`` (default: the model's)."""
    identity = identity or identity_of(model)
    tensors, meta = store.get_tensors(cid, identity)
    _check_layout(f"session {cid!r}", tensors, model)
    state = StreamingState(tensors, meta["fills"], meta["state_meta"])
    return state.to(device if device is not None else next(model.parameters()).device)


def load_into(
    store: SessionStore,
    cid: str,
    model,
    state: StreamingState,
    row: int,
    identity: ModelIdentity | None = None,
) -> StreamingState:
    """Copy the conversation ``cid`` into row ``row`` of a batch ``state``, in place (a server
    resuming one conversation among others). Not for ``full`` memory, whose slots follow the
    batch's shared stream counter: load it with ``load_state`` as its own state."""
    if model.cfg.memory.kind == "full":
        raise ValueError("load_into cannot place a 'full' memory into a batch row: use load_state")
    if not isinstance(row, int) or not 0 <= row < state.batch_size:
        raise ValueError(f"row must be an int in [0, {state.batch_size}), got {row!r}")
    one = load_state(store, cid, model, identity=identity)
    for name, t in state.tensors.items():
        t[row : row + 1].copy_(one[name].to(t.device))
    return state


def check_config_layout(what: str, tensors: dict[str, torch.Tensor], info: SessionInfo) -> None:
    """For a StreamingLM state: ValueError naming ``what`` unless its config matches its config
    hash and its tensors have the names and shapes of that config's state."""
    if info.state_kind != STREAMING_LM:
        return
    from ..config import ModelConfig
    from ..models.lm import StreamingLM

    try:
        cfg = ModelConfig.from_dict(info.config)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{what}: its model config is unreadable ({e})") from None
    if cfg.fingerprint() != info.config_hash:
        raise ValueError(
            f"{what}: its model config does not match its config hash "
            f"({cfg.fingerprint()} != {info.config_hash})"
        )
    with torch.device("meta"):
        model = StreamingLM(cfg)
    _check_layout(what, tensors, model)


def _check_layout(what: str, tensors: dict[str, torch.Tensor], model) -> None:
    want = {k: v for k, v in model.init_state(1, device="meta").tensors.items()}
    if set(tensors) != set(want):
        raise ValueError(
            f"{what} does not match the model's state: missing "
            f"{sorted(set(want) - set(tensors))[:5]}, unexpected "
            f"{sorted(set(tensors) - set(want))[:5]}"
        )
    growing = model.cfg.memory.kind == "full"
    for k, w in want.items():
        t = tensors[k]
        same = t.dim() == w.dim() and (growing or t.shape == w.shape)
        # float width is the caller's choice
        if t.is_floating_point() != w.is_floating_point() or not same:
            raise ValueError(
                f"{what}: state tensor {k} is {t.dtype} {tuple(t.shape)}, "
                f"the model's is {w.dtype} {tuple(w.shape)}"
            )
