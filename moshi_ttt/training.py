"""A minimal training loop: AdamW, warmup + cosine, gradient clipping, progress bar, CSV log."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from .data.batches import doc_starts, sample_windows
from .data.tasks import TaskMixer
from .models.lm import StreamingLM


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    task_frac: float = 0.0  # fraction of each batch's rows replaced by synthetic recall tasks
    tasks: tuple[str, ...] = ("passkey", "needle", "mqar", "conversation")
    task_distances: tuple[int, ...] = (32, 64, 128)
    answer_weight: float = 1.0  # loss weight of answer tokens in task rows (others weigh 1)

    def __post_init__(self):
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "task_distances", tuple(int(d) for d in self.task_distances))
        if not 0.0 <= self.task_frac <= 1.0:
            raise ValueError(f"TrainConfig.task_frac must be in [0, 1], got {self.task_frac}")
        if self.answer_weight <= 0:
            raise ValueError(f"TrainConfig.answer_weight must be > 0, got {self.answer_weight}")
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")


TRAIN_PRESETS = {
    "tiny": TrainConfig(steps=300, batch_size=16, seq_len=256, lr=3e-3, warmup=30),
    "small": TrainConfig(steps=2000, batch_size=16, seq_len=2048, lr=1e-3, warmup=200),
}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def lm_loss(model: StreamingLM, inputs, targets, resets=None, weights=None) -> torch.Tensor:
    """Mean next-token cross-entropy, weighted per target. inputs/targets [B, T]."""
    logits = model(inputs, resets=resets)  # [B, T, V]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    if weights is None:
        return nll.mean()
    w = weights.flatten()
    return (nll * w).sum() / w.sum().clamp_min(1.0)


def task_rows(mixer, n: int, seq_len: int, answer_weight: float, rng):
    """``n`` synthetic task rows of exactly seq_len + 1 tokens: (inputs, targets, resets, weights)."""
    try:
        toks, mask = mixer.batch(n, length=seq_len + 1, rng=rng)
    except ValueError as e:
        raise ValueError(f"task rows do not fit seq_len {seq_len}: {e} (use shorter task_distances)") from e
    toks, mask = torch.from_numpy(toks), torch.from_numpy(mask)
    weights = 1.0 + (answer_weight - 1.0) * mask[:, 1:].float()
    return toks[:, :-1], toks[:, 1:], torch.zeros(n, seq_len, dtype=torch.bool), weights


def train(model: StreamingLM, stream: np.ndarray, doc_bounds: np.ndarray, cfg: TrainConfig,
          log_path: str | Path | None = None, device="cpu", progress=True) -> list[dict]:
    """Train on random windows of ``stream``; returns the log rows (step, loss, lr, tokens/s)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    starts = doc_starts(len(stream), doc_bounds)
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    rows, t0 = [], time.perf_counter()
    n_task = round(cfg.batch_size * cfg.task_frac)
    mixer = TaskMixer(cfg.tasks, cfg.task_distances, cfg.seed) if n_task else None
    bar = tqdm(range(cfg.steps), desc="train", disable=not progress, dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        batch = sample_windows(stream, starts, cfg.batch_size - n_task, cfg.seq_len, rng)
        if n_task:
            batch = [torch.cat(pair) for pair in zip(batch, task_rows(mixer, n_task, cfg.seq_len, cfg.answer_weight, rng))]
        x, y, resets, w = (t.to(device) for t in batch)
        loss = lm_loss(model, x, y, resets, w)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss at step {step}: {loss.item()}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            tps = (step + 1) * cfg.batch_size * cfg.seq_len / (time.perf_counter() - t0)
            rows.append({"step": step, "loss": loss.item(), "lr": lr_at(step, cfg), "tokens_per_s": tps})
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tps:,.0f}")
    if log_path is not None:
        write_csv(log_path, rows)
    return rows


def write_csv(path: str | Path, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0]) if rows else []
    lines = [",".join(keys)] + [",".join(f"{r[k]:.6g}" if isinstance(r[k], float) else str(r[k]) for k in keys)
                                for r in rows]
    path.write_text("\n".join(lines) + "\n")


def config_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
