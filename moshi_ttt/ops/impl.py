"""Which implementation runs: a context, not flags on modules.

Every op with a fast path keeps its PyTorch reference beside it. By default the fast paths run,
and Triton kernels run on CUDA tensors where their shapes allow. ``implementation`` changes that
for the code inside it:

    with implementation(reference={"update"}):   # compressor and fast-weight updates by autograd
        logits = model(tokens)
    with implementation(kernels="interpret"):    # Triton kernels on CPU tensors (tests)
        ...

Parts that can run their reference (``PARTS``):
    update   TTT-cache compressor and In-Place TTT updates by per-token autograd, key normalisation
             in PyTorch, and TTT-cache steps of any length through the general block layout
    window   the gate-mixed window attention of memories of evicted tokens by explicit banded
             scores (instead of ``window_attention``)
    read     the TTT cache's training read through per-query copies of the virtual tokens
    step     a one-token TTT-cache step in PyTorch (instead of its Triton kernels)
``kernels``: "cuda" (Triton kernels on CUDA tensors), "interpret" (CPU tensors too, under
Triton's interpreter: TRITON_INTERPRET=1 must be set before Triton is imported) or "off".
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the references run
    triton, tl = None, None

PARTS = ("update", "window", "read", "step")
KERNELS = ("cuda", "interpret", "off")


@dataclasses.dataclass(frozen=True)
class Impl:
    kernels: str = "cuda"
    reference: frozenset = frozenset()

    def __post_init__(self):
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels={self.kernels!r}: expected one of {KERNELS}")
        unknown = set(self.reference) - set(PARTS)
        if unknown:
            raise ValueError(f"unknown parts {sorted(unknown)}: expected a subset of {PARTS}")


_current = contextvars.ContextVar("moshi_ttt_impl", default=Impl())  # noqa: B039 (frozen)


def current() -> Impl:
    return _current.get()


def reference(part: str) -> bool:
    """Whether ``part`` runs its PyTorch reference here."""
    return part in _current.get().reference


@contextlib.contextmanager
def implementation(kernels: str | None = None, reference=()):
    """Inside: Triton kernels where ``kernels`` says (default: unchanged) and the ``reference``
    parts (added to those already chosen) through their PyTorch references."""
    now = _current.get()
    token = _current.set(
        Impl(kernels if kernels is not None else now.kernels, now.reference | frozenset(reference))
    )
    try:
        yield
    finally:
        _current.reset(token)


def kernel_runs(x: torch.Tensor) -> bool:
    """Whether a Triton kernel may take ``x``: Triton is installed and ``x`` is a CUDA tensor
    (kernels "cuda" or "interpret") or a CPU one under the interpreter (kernels "interpret")."""
    if triton is None:
        return False
    kernels = _current.get().kernels
    if x.is_cuda:
        return kernels != "off"
    return kernels == "interpret" and os.environ.get("TRITON_INTERPRET") == "1"


def powers_of_two(*sizes: int, least: int = 16) -> bool:
    """Every size a power of two of at least ``least`` (the kernels' block shapes)."""
    return all(n >= least and n & (n - 1) == 0 for n in sizes)
