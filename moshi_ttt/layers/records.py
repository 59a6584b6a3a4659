"""What a forward pass reports besides its output, gathered by context managers (nothing is left
on modules between calls):

    with reconstruction() as terms:   # the TTT cache's reconstruction terms (training stage 1)
        model(tokens)
    loss = reconstruction_loss(terms)
    with recording() as stats:        # diagnostics of the memories of evicted tokens
        model(tokens)
    stats[memory]["alpha"], ...
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

_terms = contextvars.ContextVar("moshi_ttt_reconstruction", default=None)
_stats = contextvars.ContextVar("moshi_ttt_stats", default=None)


@contextlib.contextmanager
def reconstruction():
    """Inside, every TTT cache that absorbs blocks adds its reconstruction terms (sum of squared
    errors, token count) to the yielded dict: memory -> list of terms, in call order."""
    terms: dict = {}
    token = _terms.set(terms)
    try:
        yield terms
    finally:
        _terms.reset(token)


def reconstruction_sink() -> dict | None:
    """The dict of the innermost ``reconstruction`` (None outside one)."""
    return _terms.get()


def reconstruction_loss(terms: dict) -> torch.Tensor:
    """The mean over memories of each one's mean squared reconstruction error per token:
    mean_memory (Σ errors / Σ tokens) over the terms gathered by ``reconstruction``."""
    if not terms:
        raise ValueError(
            "no block was absorbed while reconstructing, so there is no reconstruction loss "
            "(sequences must be longer than window + block)"
        )
    per = [
        torch.stack([t for t, _ in ts]).sum() / max(sum(c for _, c in ts), 1)
        for ts in terms.values()
    ]
    return torch.stack(per).mean()


@contextlib.contextmanager
def recording():
    """Inside, every memory of evicted tokens stores its diagnostics of the last call in the
    yielded dict: memory -> {"alpha", "virtual_mass", "read", ...}."""
    stats: dict = {}
    token = _stats.set(stats)
    try:
        yield stats
    finally:
        _stats.reset(token)


def recorder() -> dict | None:
    """The dict of the innermost ``recording`` (None outside one)."""
    return _stats.get()
