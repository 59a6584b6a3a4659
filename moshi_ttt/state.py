"""The streaming state: named tensors (batch first), per-row reset, save and load."""

from __future__ import annotations

import os

import torch

from .io import load_checked, save_atomic

STATE_FORMAT = "moshi_ttt.state/1"


class StreamingState:
    """Every tensor has the batch as dim 0; ``fills[name]`` is its value after a reset.

    ``meta`` names the model config the state belongs to (``fingerprint``) and the batch size.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], fills: dict[str, float], meta: dict):
        self.tensors = tensors
        self.fills = fills
        self.meta = meta
        self.layout_checked: tuple | None = None  # set by the model that last checked its layout

    @property
    def batch_size(self) -> int:
        return int(self.meta["batch_size"])

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self.tensors[name] = value

    def scope(self, prefix: str) -> "ScopedState":
        return ScopedState(self, prefix)

    def add(self, name: str, tensor: torch.Tensor, fill: float) -> None:
        if tensor.shape[0] != self.batch_size:
            raise ValueError(
                f"state tensor {name} has batch {tensor.shape[0]}, expected {self.batch_size}"
            )
        self.tensors[name] = tensor
        self.fills[name] = fill

    def reset(self, mask) -> "StreamingState":
        """Return rows where ``mask`` [B] (bool, or integer: non-zero) is True to the empty state,
        in place."""
        try:
            mask = torch.as_tensor(mask)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(
                f"reset mask must be a bool tensor of shape ({self.batch_size},): {e}"
            ) from None
        if mask.is_floating_point() or mask.is_complex():
            raise ValueError(f"reset mask must be a bool (or integer) tensor, got {mask.dtype}")
        mask = mask.to(torch.bool)
        if mask.shape != (self.batch_size,):
            raise ValueError(
                f"reset mask must have shape ({self.batch_size},), got {tuple(mask.shape)}"
            )
        for name, t in self.tensors.items():
            m = mask.to(t.device).view(-1, *([1] * (t.dim() - 1)))
            t.masked_fill_(m, self.fills[name])
        return self

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to(self, device) -> "StreamingState":
        return StreamingState(
            {k: v.to(device) for k, v in self.tensors.items()}, dict(self.fills), dict(self.meta)
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the state to ``path`` atomically (temporary file, then rename)."""
        save_atomic(
            {
                "format": STATE_FORMAT,
                "meta": self.meta,
                "fills": self.fills,
                "tensors": {k: v.detach().cpu() for k, v in self.tensors.items()},
            },
            path,
        )

    @classmethod
    def load(cls, path: str | os.PathLike, device=None) -> "StreamingState":
        """Read a state written by ``save``; a missing, corrupt or malformed file raises ValueError.
        Whether it fits a model (config, tensor names and shapes) is checked by ``model.step``."""
        blob = load_checked(path, STATE_FORMAT, "saved state")
        tensors, fills, meta = blob.get("tensors"), blob.get("fills"), blob.get("meta")
        if not (isinstance(tensors, dict) and isinstance(fills, dict) and isinstance(meta, dict)):
            raise ValueError(f"{path} is not a complete saved state (tensors, fills and meta)")
        batch = meta.get("batch_size")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"{path}: the state's batch size is {batch!r}, not a positive int")
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor) or t.dim() < 1 or t.shape[0] != batch:
                raise ValueError(f"{path}: state tensor {name} is not a tensor of batch {batch}")
        if set(fills) != set(tensors):
            odd = sorted(set(fills) ^ set(tensors))
            raise ValueError(
                f"{path}: state tensors and fills differ: {odd[:5]} (an incomplete file)"
            )
        tensors = {k: v.to(device) if device is not None else v for k, v in tensors.items()}
        return cls(tensors, fills, meta)


class ScopedState:
    """A view of the state under a name prefix (one layer's tensors); ``.state`` is the whole."""

    def __init__(self, state: StreamingState, prefix: str):
        self.state, self.prefix = state, prefix

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.state[self.prefix + name]

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self.state[self.prefix + name] = value

    def add(self, name: str, tensor: torch.Tensor, fill: float) -> None:
        self.state.add(self.prefix + name, tensor, fill)

    def scope(self, prefix: str) -> "ScopedState":
        return ScopedState(self.state, self.prefix + prefix)
