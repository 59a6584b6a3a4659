"""Training a patched Moshi on whole conversations, stage by stage.

Each step trains on ``batch`` conversations: each one's segments run in order through Moshi's
streaming path with the memory carried from one to the next (``train.conversation_losses``), each
segment's loss backpropagated before the next runs (truncated BPTT: the carried state is detached
between segments), then one optimizer step. Stages choose what trains and on which loss:

    memory     the adapter's new parameters only (the backbone frozen: no optimizer state), on the
               TTT cache's reconstruction loss (``loss="reconstruction"``; the depformer not run)
    attention  those and the self-attention of the main transformer's layers >= frozen_layers_below
    all        every parameter

The optimizer holds the trainable parameters of the current stage alone and is rebuilt when a
stage starts. Under torch.distributed the model is sharded with FSDP2 (``shard``): every rank
holds 1/world of each sharded parameter, its gradient and AdamW moments, trains its own
conversations of the step, and the gradients are summed across ranks; rank 0 alone writes files.
The learning rate warms up linearly, then follows a cosine to 10% of its peak over all stages.
Checkpoints are written atomically and resume bit-exactly (weights, optimizer, data
order and random state).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from moshi.models.lm import LMModel
from torch import nn
from tqdm.auto import tqdm

from ..io import load_checked, save_atomic
from ..trainer import ADDED, log_scalars, tensorboard_writer
from ..trainer import stage_parameters as _stage_parameters
from ..training import Stage, lr_at
from .adapter import added_keys
from .checkpoint import save_added, save_full
from .train import absorbing_segments, conversation_losses

TRAIN_STATE_FORMAT = "moshi_ttt.moshi_train/1"


@dataclass(frozen=True)
class MoshiTrainConfig:
    """What ``MoshiTrainer`` does: ``stages`` in order (patterns on parameter names, ``@added``
    for the adapter's parameters), ``segment`` steps per segment, AdamW (``lr``, ``betas``,
    ``weight_decay`` on matrices), gradient clipping, bf16 autocast on CUDA (states stay fp32),
    a checkpoint every ``checkpoint_every`` steps (0: at the end only), a log row every
    ``log_every`` steps."""

    stages: tuple[Stage, ...]
    segment: int = 250
    batch: int = 1  # conversations per step, over all processes
    lr: float = 1e-4
    warmup: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    bf16: bool = True
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 0

    def __post_init__(self):
        object.__setattr__(
            self, "stages", tuple(Stage(**s) if isinstance(s, dict) else s for s in self.stages)
        )
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if not self.stages:
            raise ValueError("MoshiTrainConfig.stages must hold at least one stage")
        if self.batch < 1:
            raise ValueError(f"MoshiTrainConfig.batch must be >= 1, got {self.batch}")
        if self.segment < 1 or self.warmup < 0 or self.log_every < 1 or self.checkpoint_every < 0:
            raise ValueError(
                f"MoshiTrainConfig: segment and log_every must be >= 1, warmup and "
                f"checkpoint_every >= 0, got {self.segment}, {self.log_every}, "
                f"{self.warmup}, {self.checkpoint_every}"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)) or self.grad_clip <= 0:
            raise ValueError(
                f"MoshiTrainConfig: lr and grad_clip must be positive, got {self.lr}, "
                f"{self.grad_clip}"
            )

    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def stage_at(self, step: int) -> tuple[int, Stage]:
        """(index, stage) of the stage that step ``step`` belongs to."""
        end = 0
        for i, s in enumerate(self.stages):
            end += s.steps
            if step < end:
                return i, s
        return len(self.stages) - 1, self.stages[-1]

    @classmethod
    def preset(cls, name: str, num_layers: int = 32, **overrides) -> "MoshiTrainConfig":
        """``staged``: the memory alone on the reconstruction loss (1000 steps), then attention
        above the lower half of the layers on Moshi's loss (5000), then everything (10000).
        ``tiny``: the same three stages of 1 step each, for smoke runs. (``spec``, the staged
        preset's former name, is ``staged``.)"""
        half = num_layers // 2
        staged = (
            Stage("memory", 1000, (ADDED,), "reconstruction"),
            Stage(
                "attention",
                5000,
                (ADDED, "transformer.layers.*.self_attn.*"),
                frozen_layers_below=half,
            ),
            Stage("all", 10000),
        )
        if name in ("staged", "spec"):
            return cls(stages=staged, **overrides)
        if name == "tiny":
            return cls(
                stages=tuple(dataclasses.replace(s, steps=1) for s in staged),
                segment=8,
                lr=1e-3,
                warmup=1,
                bf16=False,
                **overrides,
            )
        raise ValueError(f"unknown Moshi training preset {name!r}: expected 'staged' or 'tiny'")


def stage_parameters(lm: LMModel, stage: Stage) -> list[str]:
    """Names of the parameters ``stage`` trains in a patched Moshi (``@added``: the adapter's
    parameters; layers counted in the main transformer)."""
    return _stage_parameters(lm, stage, "transformer.layers.", frozenset(added_keys(lm)))


def shard_units(lm: LMModel) -> list[nn.Module]:
    """The modules ``shard`` gives to FSDP2: Moshi's feed-forward blocks (``ActivationGating``),
    and every ``nn.Linear`` / ``nn.Embedding`` outside them; none inside a module that reads its
    children's weights outside their ``forward`` (the In-Place TTT MLP, a memory). Moshi's own
    ``StreamingModule`` classes cannot be units: FSDP2 swaps a unit's class, which CPython refuses
    for classes deriving from ``abc.ABC`` and ``nn.Module``, so their direct parameters (norms,
    the memories' parameters) stay replicated."""
    from moshi.modules.gating import ActivationGating

    from ..layers.evicting import EvictingMemory
    from .gating import TTTGating

    units, skip = [], set()
    for name, mod in lm.named_modules():
        if any(name.startswith(p + ".") for p in skip):
            continue
        if isinstance(mod, (TTTGating, EvictingMemory)):
            skip.add(name)
        elif type(mod) is ActivationGating or isinstance(mod, (nn.Linear, nn.Embedding)):
            units.append(mod)
            skip.add(name)
    return units


def shard(lm: LMModel) -> LMModel:
    """FSDP2 (``fully_shard``) over the default process group on each of ``shard_units(lm)``:
    their weights, gradients and AdamW moments are split across ranks, gathered for their forward
    and backward, and their gradients reduce-scattered as sums (the trainer's loss scales make
    that sum the global mean). Returns ``lm`` (changed in place; a sharded model is unchanged)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    for unit in shard_units(lm):
        if isinstance(unit, FSDPModule):
            continue
        # every unit is a root: without this it would stay gathered after a forward that no
        # backward follows (a frozen or unused output), its whole weights left as the parameter
        unit = fully_shard(unit, reshard_after_forward=True)
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # a plain sum (Gloo has no pre-scaled sum)
    return lm


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> float:
    """Scale the gradients so that their global 2-norm is at most ``max_norm``; returns the norm
    before. Sharded gradients (DTensors) add their shards' squares across ranks; the others are
    whole (replicated) on every rank. Single process: ``torch.nn.utils.clip_grad_norm_``."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    dev = grads[0].device

    def sq(gs):
        return sum((g.float().pow(2).sum() for g in gs), torch.zeros((), device=dev))

    shard_sq = sq([g.to_local() for g in grads if isinstance(g, DTensor)])
    torch.distributed.all_reduce(shard_sq)
    norm = (shard_sq + sq([g for g in grads if not isinstance(g, DTensor)])).sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        (g.to_local() if isinstance(g, DTensor) else g).mul_(coef.to(g.dtype))
    return float(norm)


def full_state(lm: LMModel) -> dict:
    """Every weight as a whole tensor on the CPU (gathered from the shards: every rank calls this;
    rank 0 gets the tensors, the others an empty dict when the model is sharded)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(lm, options=whole)


class MoshiTrainer:
    """Trains ``lm`` (patched) on ``conversations`` (callables or arrays giving codes [K, T]),
    writing ``out/train_state.pt``, ``out/train_log.csv``, TensorBoard events in
    ``out/tensorboard`` and, at the end,
    ``out/added.safetensors`` (and ``out/model.safetensors`` when a stage trains everything).

    Each step takes the next ``cfg.batch`` conversations of a shuffled order (a new order every
    epoch); the loss is the mean over them of each conversation's mean over its segments. With
    torch.distributed initialised, rank r trains conversations r, r + world, ... of those, the
    gradients are summed across ranks, and rank 0 alone writes files: N processes compute what
    one does (FSDP2: ``shard``)."""

    def __init__(
        self, lm: LMModel, cfg: MoshiTrainConfig, conversations, out: Path, progress: bool = True
    ):
        if not getattr(lm, "moshi_ttt_config", None):
            raise ValueError("MoshiTrainer needs a patched LMModel (moshi_ttt.moshi.patch_lm)")
        if not len(conversations):
            raise ValueError("MoshiTrainer: no conversations to train on")
        self.lm, self.cfg, self.convs, self.out, self.progress = (
            lm,
            cfg,
            conversations,
            Path(out),
            progress,
        )
        dist = torch.distributed
        self.rank, self.world = (
            (dist.get_rank(), dist.get_world_size())
            if dist.is_available() and dist.is_initialized()
            else (0, 1)
        )
        if cfg.batch % self.world:
            raise ValueError(
                f"MoshiTrainConfig.batch={cfg.batch} is not divisible by the {self.world} processes"
            )
        self.sharded = self.world > 1
        if self.sharded:
            shard(lm)
        self.step, self.log, self.opt, self.opt_stage, self.tb = 0, [], None, None, None
        self.rng = np.random.default_rng(cfg.seed)
        self.order: list[int] = []
        torch.manual_seed(cfg.seed)

    # ---- stages and optimizer ------------------------------------------------------------
    def _enter_stage(self, index: int, stage: Stage) -> None:
        """Freeze all but the stage's parameters and build AdamW over those alone."""
        names = set(stage_parameters(self.lm, stage))
        if not names:
            raise ValueError(
                f"stage {stage.name!r} trains no parameter of this model (patterns {stage.train})"
            )
        params = dict(self.lm.named_parameters())
        for n, p in params.items():
            p.requires_grad_(n in names)
        decay = [params[n] for n in sorted(names) if params[n].dim() >= 2]
        rest = [params[n] for n in sorted(names) if params[n].dim() < 2]
        self.opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.cfg.weight_decay},
                {"params": rest, "weight_decay": 0.0},
            ],
            lr=self.cfg.lr,
            betas=self.cfg.betas,
            foreach=False if self.sharded else None,
        )
        self.opt_stage = index

    # ---- data ---------------------------------------------------------------------------------
    def _next_batch(self) -> list[torch.Tensor]:
        """This rank's conversations of the next step (a fresh shuffled order every epoch)."""
        while len(self.order) < self.cfg.batch:
            self.order += list(self.rng.permutation(len(self.convs)))
        step, self.order = self.order[: self.cfg.batch], self.order[self.cfg.batch :]
        out = []
        for i in step[self.rank :: self.world]:
            c = self.convs[int(i)]
            c = c() if callable(c) else c  # a tensor, or an array (a memory map) copied in
            out.append(
                c.long().clone()
                if isinstance(c, torch.Tensor)
                else torch.from_numpy(np.array(c, dtype=np.int64))
            )
        return out

    # ---- one step ----------------------------------------------------------------------------
    def train_step(self) -> dict:
        index, stage = self.cfg.stage_at(self.step)
        if self.opt_stage != index:
            self._enter_stage(index, stage)
        lr = lr_at(self.step, self.cfg)
        for g in self.opt.param_groups:
            g["lr"] = lr
        batch = self._next_batch()
        self.opt.zero_grad(set_to_none=True)
        self.lm.train()
        keys = ("loss", "text", "audio") if stage.loss == "lm" else ("loss", "text")
        sums = torch.zeros(len(keys), dtype=torch.float64)  # sums of conversation means
        segments = sum(-(-c.shape[1] // self.cfg.segment) for c in batch)
        most = segments
        if self.sharded:  # agreed before any segment runs: every collective lines up
            most = int(self._all_reduce(torch.tensor([segments]), torch.distributed.ReduceOp.MAX))
        frames = 0
        for codes in batch:
            if stage.loss == "lm":
                n = -(-codes.shape[1] // self.cfg.segment)  # segments of this conversation
            else:
                n = sum(absorbing_segments(self.lm, codes.shape[1], self.cfg.segment))
                if not n:
                    raise ValueError(
                        f"stage {stage.name!r}: a conversation of {codes.shape[1]} steps "
                        "evicts no whole block from the TTT cache, so it has no "
                        "reconstruction loss; train on longer conversations"
                    )
            with self._autocast():
                segs = conversation_losses(
                    self.lm,
                    codes,
                    self.cfg.segment,
                    carry=True,
                    backward=True,
                    loss_scale=1.0 / (n * self.cfg.batch),
                    loss=stage.loss,
                )
            sums += torch.tensor(
                [[float(s[k]) for k in keys] for s in segs], dtype=torch.float64
            ).mean(0)
            frames += int(codes.shape[1])
        if most > segments:
            self._blank_segments(most - segments, stage)
        params = [p for p in self.lm.parameters() if p.requires_grad]
        if self.sharded:
            self._sum_replicated(params)
            sums = self._all_reduce(sums)
        losses = {"audio": None, **dict(zip(keys, (sums / self.cfg.batch).tolist()))}
        if not all(math.isfinite(v) for v in losses.values() if v is not None):
            path = self.out / "train_state.pt"
            last = (
                f"the last good checkpoint is {path}"
                if path.is_file()
                else "no checkpoint was written"
            )
            raise FloatingPointError(
                f"non-finite training loss {losses['loss']} at step {self.step} "
                f"(stage {stage.name}, learning rate {lr:.3g}); {last}"
            )
        clip_gradients(params, self.cfg.grad_clip)
        self.opt.step()
        self.step += 1
        return {
            "step": self.step,
            "stage": stage.name,
            "objective": stage.loss,
            **losses,
            "lr": lr,
            "frames": frames,
        }

    def _all_reduce(self, x: torch.Tensor, op=None) -> torch.Tensor:
        """``x`` reduced over the ranks (through the model's device: NCCL reduces CUDA tensors)."""
        y = x.to(self.lm.device)
        torch.distributed.all_reduce(y, op=op or torch.distributed.ReduceOp.SUM)
        return y.to(x.device)

    def _sum_replicated(self, params: list[torch.Tensor]) -> None:
        """Sum across ranks the gradients of the parameters FSDP2 does not shard."""
        from torch.distributed.tensor import DTensor

        for p in params:
            if not isinstance(p, DTensor):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)

    def _autocast(self):
        """bf16 autocast on CUDA when the config asks for it (the states stay fp32)."""
        on = self.cfg.bf16 and self.lm.device.type == "cuda"
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=on)

    def _blank_segments(self, n: int, stage: Stage) -> None:
        """Every segment runs the same FSDP collectives (gathers in forward and backward, one
        reduce-scatter per unit): a rank with fewer segments than another this step runs ``n``
        more on a blank conversation with a zero loss, which changes no gradient."""
        blank = torch.zeros(self.lm.num_codebooks, n * self.cfg.segment, dtype=torch.long)
        with self._autocast():
            conversation_losses(
                self.lm,
                blank,
                self.cfg.segment,
                carry=True,
                backward=True,
                loss_scale=0.0,
                loss=stage.loss,
            )

    # ---- checkpoints ---------------------------------------------------------------------------
    def state(self) -> dict:
        """The whole training state, weights and AdamW moments gathered whole (every rank calls
        this; under FSDP2 rank 0 alone receives the tensors)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        opt = None
        if self.opt is not None:
            opt = get_optimizer_state_dict(
                self.lm, self.opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        return {
            "format": TRAIN_STATE_FORMAT,
            "step": self.step,
            "model": full_state(self.lm),
            "opt": opt,
            "opt_stage": self.opt_stage,
            "rng": self.rng.bit_generator.state,
            "order": list(map(int, self.order)),
            "torch_rng": torch.get_rng_state(),
            "log": self.log,
            "config": dataclasses.asdict(self.cfg),
        }

    def save(self) -> None:
        st = self.state()
        if self.rank == 0:
            save_atomic(st, self.out / "train_state.pt")

    def load(self, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        st = load_checked(path, TRAIN_STATE_FORMAT, "Moshi training checkpoint")
        if st["config"] != dataclasses.asdict(self.cfg):
            raise ValueError(
                f"{path} was written with another training configuration; resume it "
                "with the same options or start in a new folder"
            )
        whole = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.lm, st["model"], options=whole)
        self.step, self.log, self.order = st["step"], st["log"], list(st["order"])
        self.rng.bit_generator.state = st["rng"]
        torch.set_rng_state(st["torch_rng"])
        if st["opt"] is not None:
            self._enter_stage(st["opt_stage"], self.cfg.stages[st["opt_stage"]])
            # a parameter that has had no gradient yet has no AdamW state (as in the saved run)
            set_optimizer_state_dict(
                self.lm,
                self.opt,
                st["opt"],
                options=StateDictOptions(full_state_dict=True, strict=False),
            )

    # ---- the loop --------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> list[dict]:
        path = self.out / "train_state.pt"
        if resume and path.is_file():
            self.load(path)
            if self.rank == 0:
                print(f"resuming from {path} at step {self.step}", file=sys.stderr)
        total = self.cfg.total_steps()
        t0 = time.perf_counter()
        with tqdm(
            total=total,
            initial=self.step,
            desc="moshi train",
            dynamic_ncols=True,
            disable=not self.progress or self.rank != 0,
        ) as bar:
            while self.step < total:
                row = self.train_step()
                row["frames_per_s"] = row["frames"] / max(time.perf_counter() - t0, 1e-9)
                t0 = time.perf_counter()
                if self.step % self.cfg.log_every == 0 or self.step == total:
                    self.log.append(row)
                    if self.rank == 0:
                        if self.tb is None:
                            self.tb = tensorboard_writer(self.out / "tensorboard")
                        log_scalars(self.tb, row, ("loss", "text", "audio", "lr", "frames_per_s"))
                bar.update()
                bar.set_postfix(stage=row["stage"], loss=f"{row['loss']:.3f}")
                if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                    self.save()
        self.save()
        self.write_outputs()
        return self.log

    def write_outputs(self) -> None:
        """The CSV log, ``added.safetensors`` and, when a stage trains everything,
        ``model.safetensors`` (every rank gathers the weights; rank 0 writes)."""
        sd = full_state(self.lm)
        if self.rank != 0:
            return
        with open(self.out / "train_log.csv", "w", newline="") as f:
            cols = [
                "step",
                "stage",
                "objective",
                "loss",
                "text",
                "audio",
                "lr",
                "frames",
                "frames_per_s",
            ]
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows({k: r[k] for k in cols} for r in self.log)
        save_added(self.lm, self.out / "added.safetensors", sd)
        if any(
            set(stage_parameters(self.lm, s)) == {n for n, _ in self.lm.named_parameters()}
            for s in self.cfg.stages
        ):
            save_full(self.lm, self.out / "model.safetensors", sd)
