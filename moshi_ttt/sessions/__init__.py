"""Conversation memory that outlives the process: streaming states stored by conversation id.

    store = SessionStore("sessions/")             # sessions/sessions.sqlite + sessions/blobs/
    store.save("alice-1", state, model)           # a batch-1 state, or row=i of a batch
    state = store.load("alice-1", model)          # checked: format, config, weights, blob hash
    load_into(store, "alice-1", model, batch_state, row=3)   # resume into a row of a running batch

Any other streaming state (e.g. the Moshi adapter's LMGen state) goes through the generic pair

    ident = module_identity(module, config_dict, state_kind="moshi.LMGen", memory="ttt_cache")
    store.put_tensors(cid, {"name": tensor, ...}, {"json": "meta"}, ident, tokens=n)
    tensors, meta = store.get_tensors(cid, ident)   # CPU tensors; same checks as load

Every bad input raises ValueError naming the problem: a malformed id, an unknown id, a state of
another config or other weights, a corrupt blob, a store or file of another format version, a
state with non-finite values or positions out of range, an unreadable index. Each blob carries
its own row, so ``rebuild_index(root)`` recovers a lost or unreadable index from the blobs.
"""

from .format import SESSION_FORMAT, SessionInfo, check_id
from .identity import (
    STREAMING_LM,
    ModelIdentity,
    identity_of,
    module_identity,
    weights_hash,
)
from .rebuild import RebuildReport, rebuild_index
from .states import load_into, load_state, save_state, session_bytes, state_tensors
from .store import SessionStore

__all__ = [
    "SESSION_FORMAT",
    "STREAMING_LM",
    "ModelIdentity",
    "RebuildReport",
    "SessionInfo",
    "SessionStore",
    "check_id",
    "identity_of",
    "load_into",
    "load_state",
    "module_identity",
    "rebuild_index",
    "save_state",
    "session_bytes",
    "state_tensors",
    "weights_hash",
]
