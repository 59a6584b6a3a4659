"""Training configuration (stages, schedules), the learning-rate schedule, losses and batches of
synthetic tasks; ``train`` runs the Trainer (trainer.py) on a token stream."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from .data.binding import binding_rows, clean_filler
from .data.tasks import TASKS, TaskMixer
from .models.lm import StreamingLM


@dataclass(frozen=True)
class Stage:
    """One stage of the curriculum (the staged recipe): which parameters train
    (fnmatch patterns on parameter names; the rest stay frozen), layers below
    ``frozen_layers_below`` stay frozen whatever the patterns, and the loss: ``"lm"`` (next
    token) or ``"reconstruction"`` (the TTT cache recovers evicted keys' values from its virtual
    tokens)."""

    name: str
    steps: int
    train: tuple[str, ...] = ("*",)
    loss: str = "lm"
    frozen_layers_below: int = 0

    def __post_init__(self):
        object.__setattr__(self, "train", tuple(self.train))
        if self.steps < 1:
            raise ValueError(f"Stage {self.name!r}: steps must be >= 1, got {self.steps}")
        if self.loss not in ("lm", "reconstruction"):
            raise ValueError(
                f"Stage {self.name!r}: loss must be 'lm' or 'reconstruction', got {self.loss!r}"
            )


# the staged recipe on a pretrained backbone: memory alone, then attention above the lower half,
# then all
def recipe_name(text: str) -> str:
    """A training recipe's name; ``spec``, the staged recipe's former name, is ``staged``."""
    return "staged" if text == "spec" else text


STAGED_RECIPE = (
    Stage("memory", 1000, ("*.memory.*",), "reconstruction"),
    Stage("attention", 5000, ("*.memory.*", "*.self_attn.*"), "lm", frozen_layers_below=4),
    Stage("all", 10000),
)


def scale_stages(stages: tuple[Stage, ...], steps: int) -> tuple[Stage, ...]:
    """``stages`` with ``steps`` in all, each in proportion and >= 1, the last one taking what
    rounding left."""
    if steps < len(stages):
        raise ValueError(f"steps must be >= {len(stages)} (one per stage), got {steps}")
    total = sum(st.steps for st in stages)
    n = [max(1, round(st.steps * steps / total)) for st in stages[:-1]]
    if steps - sum(n) < 1:  # rounding left nothing for the last stage
        n = [1] * (len(stages) - 1)
    n.append(steps - sum(n))
    return tuple(dataclasses.replace(st, steps=k) for st, k in zip(stages, n))


def step_schedule(name: str, pairs, convert, what: str) -> tuple:
    """``pairs`` as ((step, convert(value)), ...), steps >= 0 and increasing; a ValueError names
    ``TrainConfig.<name>`` otherwise."""
    try:
        out = tuple((int(a), convert(b)) for a, b in pairs)
    except (TypeError, ValueError):
        raise ValueError(
            f"TrainConfig.{name} must be (step, {what}) pairs, got {pairs!r}"
        ) from None
    starts = [a for a, _ in out]
    if any(a < 0 for a in starts) or starts != sorted(set(starts)):
        raise ValueError(f"TrainConfig.{name} steps must be >= 0 and increasing, got {starts}")
    return out


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
    stages: tuple[Stage, ...] = ()  # empty: one stage training everything for ``steps``
    seq_schedule: tuple[tuple[int, int], ...] = ()  # (from step, sequence length); empty: seq_len
    grad_accum: int = 1
    bf16: bool = False  # autocast on CUDA (fast weights and memory states stay fp32)
    checkpoint_every: int = 0
    eval_every: int = 0
    eval_batches: int = 4
    # key-value binding rows (task "binding", data/binding.py) and the recall curriculum
    binding_keys: tuple[int, ...] = (4,)  # N of each binding row, drawn uniformly
    # (from step, N choices): binding rows draw N from the last entry started (before the first
    # and when empty: binding_keys); few facts first let binding form before many facts
    keys_schedule: tuple[tuple[int, tuple[int, ...]], ...] = ()
    binding_queries: int = 0  # keys asked per binding row (0: every key in turn)
    # keys asked with replacement: ruling out values already answered (a bag's shortcut) fails
    binding_repeat: bool = False
    binding_filler: str = "random"  # "random" printable tokens or "corpus" text around the facts
    # the binding sample at a random offset of its row (filler on both sides; facts may open the
    # stream), else it ends the row
    binding_anywhere: bool = False
    near_steps: int = 0  # the first near_steps steps draw task distances from near_distances
    near_distances: tuple[int, ...] = (0,)  # (binding forms inside the window before far samples)
    context_weight: float = 1.0  # loss weight of the other tokens of task rows (0: answers only)

    def all_stages(self) -> tuple[Stage, ...]:
        return self.stages or (Stage("all", self.steps),)

    def total_steps(self) -> int:
        return sum(s.steps for s in self.all_stages())

    def keys_at(self, step: int) -> tuple[int, ...]:
        """The N choices of binding rows at ``step`` (``keys_schedule``, else ``binding_keys``)."""
        return at_step(self.keys_schedule, step, self.binding_keys)

    def max_seq_len(self) -> int:
        """The longest training sequence (the length schedule included)."""
        return max([self.seq_len] + [n for _, n in self.seq_schedule])

    def __post_init__(self):
        object.__setattr__(
            self, "stages", tuple(Stage(**s) if isinstance(s, dict) else s for s in self.stages)
        )
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "task_distances", tuple(int(d) for d in self.task_distances))
        object.__setattr__(self, "near_distances", tuple(int(d) for d in self.near_distances))
        object.__setattr__(self, "binding_keys", tuple(int(n) for n in self.binding_keys))
        bad = [t for t in self.tasks if t not in TASKS and t != "binding"]
        if bad or not self.tasks:
            raise ValueError(
                f"TrainConfig.tasks: unknown or none {bad}: expected a subset of "
                f"{sorted(TASKS) + ['binding']}"
            )
        if not self.binding_keys or not all(1 <= n <= 64 for n in self.binding_keys):
            raise ValueError(f"TrainConfig.binding_keys must be in 1..64, got {self.binding_keys}")
        keys_sched = step_schedule(
            "keys_schedule", self.keys_schedule, lambda ns: tuple(int(n) for n in ns), "(N, ...)"
        )
        object.__setattr__(self, "keys_schedule", keys_sched)
        if not all(ns and all(1 <= n <= 64 for n in ns) for _, ns in keys_sched):
            raise ValueError(
                f"TrainConfig.keys_schedule N choices must be non-empty and in "
                f"1..64, got {keys_sched}"
            )
        fewest = min(self.binding_keys + tuple(n for _, ns in keys_sched for n in ns))
        if not 0 <= self.binding_queries <= fewest:
            raise ValueError(
                f"TrainConfig.binding_queries must be in 0..{fewest} (the fewest keys "
                f"of binding_keys and keys_schedule), got {self.binding_queries}"
            )
        if self.binding_filler not in ("random", "corpus"):
            raise ValueError(
                f"TrainConfig.binding_filler must be 'random' or 'corpus', "
                f"got {self.binding_filler!r}"
            )
        for name in ("task_distances", "near_distances"):
            if not getattr(self, name) or min(getattr(self, name)) < 0:
                raise ValueError(
                    f"TrainConfig.{name} must be non-negative ints, got {getattr(self, name)}"
                )
        if self.near_steps < 0 or self.context_weight < 0:
            raise ValueError(
                f"TrainConfig.near_steps and context_weight must be >= 0, "
                f"got {self.near_steps}, {self.context_weight}"
            )
        schedule = step_schedule("seq_schedule", self.seq_schedule, int, "length")
        object.__setattr__(self, "seq_schedule", schedule)
        lengths = [n for _, n in schedule]
        if any(n < 1 for n in lengths):
            raise ValueError(f"TrainConfig.seq_schedule lengths must be >= 1, got {lengths}")
        for name, low in (
            ("steps", 1),
            ("batch_size", 1),
            ("seq_len", 1),
            ("grad_accum", 1),
            ("log_every", 1),
            ("eval_batches", 1),
            ("warmup", 0),
            ("seed", 0),
            ("checkpoint_every", 0),
            ("eval_every", 0),
        ):
            if getattr(self, name) < low:
                raise ValueError(f"TrainConfig.{name} must be >= {low}, got {getattr(self, name)}")
        for name in ("lr", "grad_clip", "answer_weight"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"TrainConfig.{name} must be a finite number > 0, got {v}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(
                f"TrainConfig.weight_decay must be a finite number >= 0, got {self.weight_decay}"
            )
        if not 0.0 <= self.task_frac <= 1.0:
            raise ValueError(f"TrainConfig.task_frac must be in [0, 1], got {self.task_frac}")
        if any(d < 0 for d in self.task_distances):
            raise ValueError(f"TrainConfig.task_distances must be >= 0, got {self.task_distances}")


TRAIN_PRESETS = {
    "tiny": TrainConfig(steps=300, batch_size=16, seq_len=256, lr=3e-3, warmup=30),
    "small": TrainConfig(steps=2000, batch_size=16, seq_len=2048, lr=1e-3, warmup=200),
    # key-value binding from scratch (data/binding.py) at window 32, answers only in the loss, every
    # key asked in turn: 2 or 4 facts inside the window in 48-token rows (binding forms), then 2-16
    # facts in 96-token rows, then near and far samples up to 4 x W in 208-token rows
    "recall": TrainConfig(
        steps=4500,
        batch_size=256,
        seq_len=48,
        lr=1e-3,
        warmup=100,
        bf16=True,
        task_frac=1.0,
        tasks=("binding",),
        binding_keys=(2, 4, 8, 16),
        binding_queries=0,
        keys_schedule=((0, (2, 4)), (2000, (2, 4, 8, 16))),
        near_steps=3000,
        near_distances=(0, 2, 4, 8, 16),
        task_distances=(0, 8, 16, 32, 64, 128),
        seq_schedule=((0, 48), (2000, 96), (3000, 208)),
        answer_weight=1.0,
        context_weight=0.0,
        log_every=50,
    ),
}


# the recall recipe in two parts, for a study whose memories all start from one backbone that binds:
# its first phase alone (trained until binding forms, at most ``steps``), then the rest
TRAIN_PRESETS["recall-backbone"] = dataclasses.replace(
    TRAIN_PRESETS["recall"],
    steps=4000,
    binding_keys=(2, 4),
    keys_schedule=(),
    seq_schedule=(),
    near_steps=4000,
    near_distances=(0, 2, 4),
)
# (samples anywhere in their rows: rows that all end with the sample left the TTT cache unable
# to answer facts that open a stream, at 0.00 where the window scored 1.00)
TRAIN_PRESETS["recall-memory"] = dataclasses.replace(
    TRAIN_PRESETS["recall"],
    steps=2500,
    seq_len=96,
    keys_schedule=(),
    near_steps=1000,
    seq_schedule=((0, 96), (1000, 208)),
    binding_anywhere=True,
)
# the same mixed with corpus text: half of each batch corpus rows, half binding rows, whose answers
# (2-16 per row) weigh 24 each, about as much as a corpus row's tokens
TRAIN_PRESETS["recall-corpus"] = dataclasses.replace(
    TRAIN_PRESETS["recall-memory"], task_frac=0.5, answer_weight=24.0
)


def at_step(schedule: tuple, step: int, default):
    """The value of the last ``(start, value)`` entry of ``schedule`` started by ``step``
    (``default`` before the first)."""
    value = default
    for start, v in schedule:
        if step >= start:
            value = v
    return value


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.total_steps() - cfg.warmup)
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


def task_rows(
    mixer,
    n: int,
    seq_len: int,
    answer_weight: float,
    rng,
    context_weight: float = 1.0,
    distances=None,
):
    """``n`` synthetic task rows of exactly seq_len + 1 tokens: (inputs, targets, resets, weights);
    answer tokens weigh ``answer_weight``, the others ``context_weight``."""
    try:
        toks, mask = mixer.batch(n, length=seq_len + 1, rng=rng, distances=distances)
    except ValueError as e:
        raise ValueError(
            f"task rows do not fit seq_len {seq_len}: {e} (use shorter task_distances)"
        ) from e
    return _rows(torch.from_numpy(toks), torch.from_numpy(mask), answer_weight, context_weight)


def _rows(toks: torch.Tensor, mask: torch.Tensor, answer_weight: float, context_weight: float):
    """tokens, answer_mask [n, T + 1] -> (inputs, targets, resets, weights) [n, T]."""
    weights = torch.where(mask[:, 1:], answer_weight, context_weight).float()
    return (
        toks[:, :-1],
        toks[:, 1:],
        torch.zeros(toks.shape[0], toks.shape[1] - 1, dtype=torch.bool),
        weights,
    )


class TaskRows:
    """The synthetic rows of a training batch: each row's task uniform over ``cfg.tasks`` (text
    tasks through ``TaskMixer``, ``"binding"`` through ``data.binding.binding_rows``); task
    distances from ``cfg.near_distances`` for the first ``cfg.near_steps`` steps, then from
    ``cfg.task_distances``; binding rows' N from ``cfg.keys_at(step)``; answers weigh
    ``answer_weight``, other tokens ``context_weight``.
    ``corpus`` supplies the binding filler when ``cfg.binding_filler == "corpus"``."""

    def __init__(self, cfg: TrainConfig, corpus: np.ndarray | None = None):
        self.cfg = cfg
        text = tuple(t for t in cfg.tasks if t != "binding")
        self.mixer = TaskMixer(text, cfg.task_distances, cfg.seed) if text else None
        self.filler = None
        if "binding" in cfg.tasks and cfg.binding_filler == "corpus":
            if corpus is None:
                raise ValueError("binding_filler='corpus' needs a corpus")
            self.filler = clean_filler(np.asarray(corpus[:1_000_000]))

    def distances(self, step: int) -> tuple[int, ...]:
        cfg = self.cfg
        return cfg.near_distances if step < cfg.near_steps else cfg.task_distances

    def __call__(self, n: int, seq_len: int, step: int, rng: np.random.Generator):
        cfg, dist = self.cfg, self.distances(step)
        nb = (
            int((rng.random(n) * len(cfg.tasks) < cfg.tasks.count("binding")).sum())
            if self.mixer
            else n
        )
        parts = []
        if n - nb:
            parts.append(
                task_rows(
                    self.mixer, n - nb, seq_len, cfg.answer_weight, rng, cfg.context_weight, dist
                )
            )
        if nb:
            toks, mask = binding_rows(
                rng,
                nb,
                seq_len + 1,
                cfg.keys_at(step),
                dist,
                cfg.binding_queries,
                self.filler,
                cfg.binding_repeat,
                cfg.binding_anywhere,
            )
            parts.append(
                _rows(
                    torch.from_numpy(toks),
                    torch.from_numpy(mask),
                    cfg.answer_weight,
                    cfg.context_weight,
                )
            )
        return tuple(torch.cat(p) for p in zip(*parts))


def write_csv(path: str | Path, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cell = lambda v: "" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)
    lines = [",".join(keys)] + [",".join(cell(r.get(k)) for k in keys) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def config_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
