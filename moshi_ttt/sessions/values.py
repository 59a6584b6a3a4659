"""Value checks on a stored state, run on save, load and import: every float tensor finite and,
for StreamingLM states, positions and counters in range (``layers/`` names them)."""

from __future__ import annotations

import torch

from .identity import STREAMING_LM

POSITIONS = ("kpos", "sink_pos")  # a stored token's position: -1 (empty) or 0 <= p < the row's pos
COUNTERS = ("count", "ecount", "updates")  # >= 0
BOUNDED = {"count": ("zbuf", 1), "ecount": ("ek", 2)}  # < the size of that sibling along that dim


def check_values(tensors: dict[str, torch.Tensor], meta, state_kind: str, what: str) -> None:
    """ValueError naming ``what`` and the tensor unless the state's values are possible."""
    for name, t in tensors.items():
        if t.is_floating_point() or t.is_complex():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise ValueError(
                    f"{what}: state tensor {name} has {bad} non-finite values (NaN or inf)"
                )
    if state_kind == STREAMING_LM:
        _check_streaming(tensors, meta, what)


def _check_streaming(tensors: dict[str, torch.Tensor], meta, what: str) -> None:
    if not (
        isinstance(meta, dict)
        and isinstance(meta.get("fills"), dict)
        and isinstance(meta.get("state_meta"), dict)
    ):
        raise ValueError(f"{what}: its meta must hold the state's 'fills' and 'state_meta' dicts")
    tokens = meta["state_meta"].get("tokens", 0)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"{what}: state meta 'tokens' is {tokens!r}, expected an int >= 0")
    pos = tensors.get("pos")
    if pos is not None:
        if pos.is_floating_point() or pos.dim() != 1:
            raise ValueError(
                f"{what}: state tensor pos is {pos.dtype} {tuple(pos.shape)}, "
                "expected integers [batch]"
            )
        _at_least(what, "pos", pos, 0)
    for name, t in tensors.items():
        prefix, _, leaf = name.rpartition(".")
        if leaf in POSITIONS:
            _positions(what, name, t, pos)
        elif leaf in COUNTERS:
            _at_least(what, name, t, 0)
            sibling, dim = BOUNDED.get(leaf, (None, 0))
            buf = tensors.get(f"{prefix}.{sibling}" if prefix else sibling) if sibling else None
            if buf is not None and buf.dim() > dim and (t >= buf.shape[dim]).any():
                raise ValueError(
                    f"{what}: state tensor {name} holds "
                    f"{_first(t, t >= buf.shape[dim])}: expected 0 <= {leaf} < "
                    f"{buf.shape[dim]}"
                )


def _first(t: torch.Tensor, bad: torch.Tensor):
    return t[bad].flatten()[0].item()


def _at_least(what: str, name: str, t: torch.Tensor, low: int) -> None:
    if (t < low).any():
        raise ValueError(
            f"{what}: state tensor {name} holds {_first(t, t < low)}: expected >= {low}"
        )


def _positions(what: str, name: str, t: torch.Tensor, pos: torch.Tensor | None) -> None:
    if t.is_floating_point():
        raise ValueError(f"{what}: state tensor {name} is {t.dtype}, expected integer positions")
    bad = t < -1
    rowwise = pos is not None and t.dim() >= 1 and t.shape[0] == pos.shape[0]
    if rowwise:
        bad = bad | (t >= pos.view(-1, *([1] * (t.dim() - 1))))
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        limit = f" ({int(pos[i[0]])})" if rowwise else ""
        raise ValueError(
            f"{what}: state tensor {name} holds position {t[i].item()}: expected "
            f"-1 (empty) or 0 <= position < the row's pos{limit}"
        )
