"""Model checkpoints: config + weights (+ optional training metadata), written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import ModelConfig
from .models.lm import StreamingLM

CKPT_FORMAT = "moshi_ttt.ckpt/1"


def save_checkpoint(path: str | os.PathLike, model: StreamingLM, meta: dict | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": CKPT_FORMAT, "config": model.cfg.to_dict(),
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "meta": meta or {}}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, device="cpu") -> tuple[StreamingLM, dict]:
    """Load a model strictly; a missing, corrupt or mismatched file raises ValueError."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no checkpoint at {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable checkpoint: {e}") from e
    if not isinstance(blob, dict) or blob.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint of format {CKPT_FORMAT}")
    model = StreamingLM(ModelConfig.from_dict(blob["config"]))
    try:
        model.load_state_dict(blob["model"], strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not match the config: {e}") from e
    return model.to(device), blob["meta"]
