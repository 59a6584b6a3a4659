"""Checkpoints of a patched Moshi (safetensors): the added weights alone, or everything together.

Both files carry the ``AdapterConfig`` (JSON in the safetensors metadata); loading checks it
against the model's, then loads strictly (every expected key present, nothing else).
``load_stock`` reads a stock Moshi checkpoint from local files through Moshi's own loader.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .adapter import adapter_config, added_keys, added_state_dict
from .config import AdapterConfig

ADDED_FORMAT = "moshi_ttt.moshi.added/1"
FULL_FORMAT = "moshi_ttt.moshi.full/1"


def _unshared(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, one storage per tensor (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for k, v in sd.items():
        v = v.detach()
        ptr = v.untyped_storage().data_ptr() if v.numel() else None
        shared = ptr is not None and ptr in seen
        seen.add(ptr)
        out[k] = v.to("cpu", copy=shared or v.is_cuda).contiguous()
    return out


def _write(tensors: dict, path, fmt: str, cfg: AdapterConfig) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(_unshared(tensors), str(tmp), metadata={"format": fmt, "adapter": cfg.to_json()})
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written file


def _read(path, fmt: str, what: str) -> tuple[dict[str, torch.Tensor], AdapterConfig]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no {what} at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors {what}: {e}") from e
    if meta.get("format") != fmt:
        raise ValueError(
            f"{path} is not a {what} (format {meta.get('format')!r}, expected {fmt!r})"
        )
    return tensors, AdapterConfig.from_json(meta["adapter"])


def _same_config(lm, saved: AdapterConfig, path) -> None:
    cfg = adapter_config(lm)
    if saved != cfg:
        raise ValueError(f"{path} was saved from a model patched with {saved}, this one has {cfg}")


def save_added(lm, path, state: dict | None = None) -> None:
    """Only the parameters the adapter added (a few MB next to a 15 GB stock checkpoint), from
    ``state`` (a whole state dict of ``lm``, e.g. gathered from shards) or ``lm.state_dict()``."""
    _write(added_state_dict(lm, state), path, ADDED_FORMAT, adapter_config(lm))


def load_added(lm, path) -> None:
    """Copy saved added weights into a patched ``lm`` (stock weights untouched), strictly."""
    tensors, saved = _read(path, ADDED_FORMAT, "file of added Moshi weights")
    _same_config(lm, saved, path)
    expected = set(added_keys(lm))
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(f"{path}: missing keys {missing}, unexpected keys {unexpected}")
    sd = lm.state_dict()
    bad = [k for k in expected if sd[k].shape != tensors[k].shape]
    if bad:
        raise ValueError(f"{path}: shape mismatch for {bad}")
    with torch.no_grad():
        for k in expected:
            sd[k].copy_(tensors[k])


def save_full(lm, path, state: dict | None = None) -> None:
    """Every weight of the patched model, stock and added, in one file (from ``state`` as in
    ``save_added``)."""
    _write(lm.state_dict() if state is None else state, path, FULL_FORMAT, adapter_config(lm))


def load_full(lm, path) -> None:
    """Load a ``save_full`` file into a model patched with the same config, strictly."""
    tensors, saved = _read(path, FULL_FORMAT, "full patched Moshi checkpoint")
    _same_config(lm, saved, path)
    try:
        lm.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not match the model: {e}") from e


def load_stock(config_path, moshi_weights, device="cpu", dtype=torch.bfloat16):
    """A stock Moshi ``LMModel`` from local files (a ``config.json`` and its safetensors weights),
    through ``CheckpointInfo`` and ``get_moshi_lm`` (strict loading); nothing is downloaded."""
    from moshi.models.loaders import CheckpointInfo

    for p in (config_path, moshi_weights):
        if not Path(p).is_file():
            raise ValueError(f"no file at {p}")
    info = CheckpointInfo.from_hf_repo(
        "local/none",
        moshi_weights=Path(moshi_weights),
        mimi_weights=Path("mimi-not-used"),
        tokenizer=Path("tokenizer-not-used"),
        config_path=Path(config_path),
    )
    return info.get_moshi(device=device, dtype=dtype)
