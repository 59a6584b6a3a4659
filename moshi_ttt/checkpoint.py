"""Model checkpoints: config + weights (+ optional training metadata), written atomically."""

from __future__ import annotations

import os
import sys

from .config import ModelConfig
from .io import load_checked, save_atomic
from .models.lm import StreamingLM

CKPT_FORMAT = "moshi_ttt.ckpt/1"


def save_checkpoint(path: str | os.PathLike, model: StreamingLM, meta: dict | None = None) -> None:
    save_atomic(
        {
            "format": CKPT_FORMAT,
            "config": model.cfg.to_dict(),
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "meta": meta or {},
        },
        path,
    )


def load_checkpoint(path: str | os.PathLike, device="cpu") -> tuple[StreamingLM, dict]:
    """Load a model strictly; a missing, corrupt or mismatched file raises ValueError."""
    blob = load_checked(path, CKPT_FORMAT, "checkpoint")
    missing = [k for k in ("config", "model", "meta") if k not in blob]
    if missing:
        raise ValueError(f"{path} is an incomplete checkpoint: no {', '.join(missing)}")
    try:
        cfg = ModelConfig.from_dict(blob["config"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        detail = f"no {e}" if isinstance(e, KeyError) else str(e)
        raise ValueError(f"{path}: its model config is invalid ({detail})") from e
    model = StreamingLM(cfg)
    try:
        model.load_state_dict(blob["model"], strict=True)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: weights do not match the config: {e}") from e
    return model.to(device), blob["meta"] if isinstance(blob["meta"], dict) else {}


def load_meta(path: str | os.PathLike) -> dict:
    """A checkpoint's training metadata alone (the weights are not built into a model)."""
    meta = load_checked(path, CKPT_FORMAT, "checkpoint").get("meta")
    return meta if isinstance(meta, dict) else {}


def init_from(model: StreamingLM, path: str | os.PathLike) -> list[str]:
    """Start from a trained backbone: every weight it has is loaded (shapes must match); the new
    memory or In-Place TTT parameters keep their initialisation. Returns the names of those."""
    backbone, _ = load_checkpoint(path)
    own = model.state_dict()
    theirs = backbone.state_dict()
    bad = [k for k, v in theirs.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise ValueError(f"--init {path}: shapes differ for {bad[:5]}")
    shared = {k: v for k, v in theirs.items() if k in own}
    missing = model.load_state_dict(shared, strict=False).missing_keys
    print(f"initialised from {path}; new parameters: {len(missing)} tensors", file=sys.stderr)
    return missing
