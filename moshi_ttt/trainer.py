"""The trainer: curriculum stages, a sequence-length schedule, gradient accumulation, bf16 autocast,
resumable checkpoints (bit-exact), CSV logging, periodic held-out loss, DDP through torchrun."""

from __future__ import annotations

import contextlib
import fnmatch
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from .data.batches import doc_starts, sample_windows
from .io import load_checked, save_atomic
from .layers import records
from .layers.ttt_cache import TTTCacheMemory
from .models.lm import StreamingLM
from .training import Stage, TaskRows, TrainConfig, at_step, lr_at, write_csv

TRAIN_STATE_FORMAT = "moshi_ttt.train/1"


def world() -> tuple[int, int]:
    """(rank, world size): from torch.distributed when initialised, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


ADDED = "@added"  # a stage pattern: every name in ``stage_parameters``' ``added``


def reconstruction_memories(model: nn.Module) -> list[nn.Module]:
    """The memories of ``model`` that have a reconstruction loss (the TTT cache)."""
    return [m for m in model.modules() if isinstance(m, TTTCacheMemory)]


@contextlib.contextmanager
def reconstructing(model: nn.Module, stage: Stage):
    """The reconstruction terms of ``model``'s TTT caches while the block runs
    (``records.reconstruction``: memory -> terms; ``records.reconstruction_loss`` averages them);
    a clear error when the model has no TTT cache."""
    if not reconstruction_memories(model):
        raise ValueError(
            f"stage {stage.name!r} uses the reconstruction loss, but no memory of this "
            "model has one (use a ttt_cache memory)"
        )
    with records.reconstruction() as terms:
        yield terms


def stage_parameters(
    model: torch.nn.Module,
    stage: Stage,
    layers: str = "layers.",
    added: frozenset[str] = frozenset(),
) -> list[str]:
    """The names of the parameters ``stage`` trains: those matching one of its patterns (``@added``:
    the names in ``added``), outside the layers (``<layers>N.``) below ``frozen_layers_below``."""
    out = []
    for name, _ in model.named_parameters():
        layer = int(name[len(layers) :].split(".")[0]) if name.startswith(layers) else None
        if layer is not None and layer < stage.frozen_layers_below:
            continue
        if any(
            name in added if pat == ADDED else fnmatch.fnmatch(name, pat) for pat in stage.train
        ):
            out.append(name)
    return out


class Trainer:
    def __init__(
        self,
        model: StreamingLM,
        cfg: TrainConfig,
        train_data,
        val_data=None,
        out: Path | None = None,
        device="cpu",
        progress: bool = True,
    ):
        self.cfg, self.out, self.device, self.progress = cfg, out, torch.device(device), progress
        self.rank, self.world = world()
        if cfg.batch_size % self.world:
            raise ValueError(
                f"batch size {cfg.batch_size} is not divisible by {self.world} processes"
            )
        self.model = model.to(self.device)
        # stages freeze parameters and some memory options leave parameters unused: tell DDP
        self.net = (
            torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
            if self.world > 1
            else model
        )
        decay = [p for p in model.parameters() if p.dim() >= 2]
        rest = [p for p in model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": rest, "weight_decay": 0.0},
            ],
            lr=cfg.lr,
            betas=(0.9, 0.95),
        )
        self.stream, self.bounds = train_data if train_data is not None else (None, None)
        if self.stream is None and round(cfg.batch_size * cfg.task_frac) < cfg.batch_size:
            raise ValueError("training without a corpus needs task_frac = 1 (synthetic rows only)")
        self.starts = doc_starts(len(self.stream), self.bounds) if self.stream is not None else None
        self.val = val_data
        self.step, self.rng, self.log, self.tb = 0, np.random.default_rng(cfg.seed), [], None
        self.saved_step: int | None = None  # the step of the checkpoint last written or loaded
        n_task = round(cfg.batch_size * cfg.task_frac)
        self.n_task = n_task
        self.task_rows = TaskRows(cfg, self.stream) if n_task else None
        torch.manual_seed(cfg.seed)

    # ---- curriculum -------------------------------------------------------------------------
    def stage_at(self, step: int) -> Stage:
        end = 0
        for stage in self.cfg.all_stages():
            end += stage.steps
            if step < end:
                return stage
        return self.cfg.all_stages()[-1]

    def seq_len_at(self, step: int) -> int:
        return at_step(self.cfg.seq_schedule, step, self.cfg.seq_len)

    def apply_stage(self, stage: Stage) -> None:
        """Train exactly the parameters matching the stage's patterns, outside its frozen layers."""
        names = set(stage_parameters(self.model, stage))
        for name, p in self.model.named_parameters():
            p.requires_grad_(name in names)

    # ---- one step -------------------------------------------------------------------------
    def global_batch(self, seq_len: int):
        """Micro-batches of the global batch (the same draw on every rank), this rank's rows."""
        cfg, out = self.cfg, []
        for _ in range(cfg.grad_accum):
            rows = None  # corpus windows, then synthetic task rows
            if self.n_task < cfg.batch_size:
                rows = sample_windows(
                    self.stream, self.starts, cfg.batch_size - self.n_task, seq_len, self.rng
                )
            if self.n_task:
                extra = self.task_rows(self.n_task, seq_len, self.step, self.rng)
                rows = extra if rows is None else [torch.cat(pair) for pair in zip(rows, extra)]
            per = cfg.batch_size // self.world
            out.append([t[self.rank * per : (self.rank + 1) * per].to(self.device) for t in rows])
        return out

    def autocast(self):
        if self.cfg.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def micro_loss(self, x, y, resets, w, stage: Stage, norm: float) -> torch.Tensor:
        """This micro-batch's share of the global loss (so DDP's mean of gradients is exact)."""
        with self.autocast():
            if stage.loss == "reconstruction":
                with reconstructing(self.model, stage) as terms:
                    self.net(x, resets=resets)
                    loss = records.reconstruction_loss(terms)
                return loss * self.world / self.cfg.grad_accum
            logits = self.net(x, resets=resets)
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        return (nll * w.flatten()).sum() * self.world / norm

    def train_step(self) -> float:
        cfg, stage = self.cfg, self.stage_at(self.step)
        self.apply_stage(stage)
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, cfg)
        micro = self.global_batch(self.seq_len_at(self.step))
        norm = torch.tensor(float(sum(m[3].sum() for m in micro)), device=self.device)
        if self.world > 1:
            dist.all_reduce(norm)
        self.opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for i, (x, y, resets, w) in enumerate(micro):
            sync = self.world > 1 and i < len(micro) - 1
            with self.net.no_sync() if sync else contextlib.nullcontext():
                loss = self.micro_loss(x, y, resets, w, stage, norm.clamp_min(1.0).item())
                loss.backward()
            total += loss.detach() / self.world  # this rank's share of the global loss
        if self.world > 1:
            dist.all_reduce(total)  # the loss of the whole global batch, on every rank
        total = total.item()
        if not np.isfinite(total):
            path = self.checkpoint_path()
            last = (
                "no checkpoint was written"
                if self.saved_step is None or path is None
                else f"the last good checkpoint is {path} (step {self.saved_step})"
            )
            lr = lr_at(self.step, cfg)
            raise FloatingPointError(
                f"non-finite training loss {total} at step {self.step} "
                f"(stage {stage.name}, learning rate {lr:.3g}); {last}"
            )
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        self.opt.step()
        self.step += 1
        return total

    @torch.no_grad()
    def val_loss(self) -> float | None:
        if self.val is None:
            return None
        stream, bounds = self.val
        rng = np.random.default_rng(12345)  # the same held-out windows every time
        x, y, resets, w = (
            t.to(self.device)
            for t in sample_windows(
                stream,
                doc_starts(len(stream), bounds),
                self.cfg.eval_batches,
                self.seq_len_at(self.step),
                rng,
            )
        )
        self.model.eval()
        with self.autocast():
            logits = self.model(x, resets=resets)
        self.model.train()
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        return ((nll * w.flatten()).sum() / w.sum()).item()

    # ---- checkpoints ----------------------------------------------------------------------
    def checkpoint_path(self) -> Path | None:
        return self.out / "train_state.pt" if self.out else None

    def state_dict(self) -> dict:
        return {
            "format": TRAIN_STATE_FORMAT,
            "config": self.model.cfg.to_dict(),
            "train": asdict(self.cfg),
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "step": self.step,
            "numpy_rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "log": self.log,
        }

    def save(self) -> None:
        if self.out is None:
            return
        if self.rank == 0:
            save_atomic(self.state_dict(), self.checkpoint_path())
        self.saved_step = self.step

    def load(self, path: Path) -> None:
        """Resume exactly: a checkpoint of another model or training config raises ValueError."""
        blob = load_checked(path, TRAIN_STATE_FORMAT, "training checkpoint")
        keys = ("config", "train", "model", "optimizer", "step", "numpy_rng", "torch_rng", "log")
        missing = [k for k in keys if k not in blob]
        if missing:
            raise ValueError(
                f"{path} is an incomplete training checkpoint: no {', '.join(missing)}"
            )
        if blob["config"] != self.model.cfg.to_dict():
            raise ValueError(f"{path} belongs to another model config")
        if blob["train"] != asdict(self.cfg):
            raise ValueError(f"{path} was written with another training config")
        try:
            self.model.load_state_dict(blob["model"], strict=True)
            self.opt.load_state_dict(blob["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ValueError(
                f"{path}: weights or optimizer state do not match the model: {e}"
            ) from e
        self.step, self.log = blob["step"], blob["log"]
        self.rng.bit_generator.state = blob["numpy_rng"]
        torch.set_rng_state(blob["torch_rng"])
        self.saved_step = self.step

    # ---- the loop -------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> list[dict]:
        """Train to the end of the curriculum, writing checkpoints, the CSV log and held-out loss.

        ``resume``: continue from ``OUT/train_state.pt``; without one, training starts from step 0
        and says so on stderr."""
        if resume:
            path = self.checkpoint_path()
            if path is None:
                raise ValueError("resume needs the trainer's output folder (out)")
            if path.is_file():
                self.load(path)
                if self.rank == 0:
                    print(f"resuming from {path} at step {self.step}", file=sys.stderr)
            elif self.rank == 0:
                print(f"no checkpoint at {path}: starting from step 0", file=sys.stderr)
        self.model.train()
        total = self.cfg.total_steps()
        with tqdm(
            range(self.step, total),
            initial=self.step,
            total=total,
            desc="train",
            disable=not self.progress or self.rank != 0,
            dynamic_ncols=True,
        ) as bar:
            self._loop(bar, total)
        self.save()
        self.write_log()
        return self.log

    def _loop(self, bar, total: int) -> None:
        """The steps from ``self.step`` to ``total`` (``bar`` iterates over them)."""
        t0, tokens = time.perf_counter(), 0
        for _ in bar:
            seq = self.seq_len_at(self.step)
            try:
                loss = self.train_step()
            except FloatingPointError:
                # a failed run still leaves its log beside its last good checkpoint
                self.write_log()
                raise
            tokens += self.cfg.batch_size * self.cfg.grad_accum * seq
            step = self.step - 1
            if step % self.cfg.log_every == 0 or self.step == total:
                row = {
                    "step": step,
                    "stage": self.stage_at(step).name,
                    "seq_len": seq,
                    "loss": loss,
                    "lr": lr_at(step, self.cfg),
                    "tokens_per_s": tokens / (time.perf_counter() - t0),
                }
                if self.cfg.eval_every and (step % self.cfg.eval_every == 0 or self.step == total):
                    row["val_loss"] = self.val_loss()
                self.log.append(row)
                self.tensorboard(row)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{row['tokens_per_s']:,.0f}")
            if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                self.save()
                self.write_log()

    def tensorboard(self, row: dict) -> None:
        """TensorBoard event files under OUT/tensorboard (rank 0)."""
        if self.rank or self.out is None or self.tb is False:
            return
        if self.tb is None:
            self.tb = tensorboard_writer(self.out / "tensorboard")
        log_scalars(self.tb, row, ("loss", "val_loss", "lr", "tokens_per_s", "seq_len"))

    def write_log(self) -> None:
        if self.rank == 0 and self.out is not None and self.log:
            write_csv(self.out / "train_log.csv", self.log)


def tensorboard_writer(folder: Path):
    """A TensorBoard SummaryWriter on ``folder`` (tensorboardX, else torch's), or False (said on
    stderr) when neither is installed."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("no tensorboardX or tensorboard: TensorBoard logging is off", file=sys.stderr)
            return False
    return SummaryWriter(str(folder))


def log_scalars(writer, row: dict, keys) -> None:
    """``row[key]`` as ``train/<key>`` at ``row["step"]`` for each key present (no writer: none)."""
    if not writer:
        return
    for key in keys:
        if row.get(key) is not None:
            writer.add_scalar(f"train/{key}", row[key], row["step"])
    writer.flush()


def init_distributed() -> None:
    """Join the torchrun process group (gloo on CPU, nccl on GPU) when WORLD_SIZE is set."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def train(
    model: StreamingLM,
    stream: np.ndarray,
    doc_bounds: np.ndarray,
    cfg: TrainConfig,
    log_path: str | Path | None = None,
    device="cpu",
    progress=True,
) -> list[dict]:
    """Train on random windows of ``stream``; returns the log rows (step, loss, lr, tokens/s)."""
    data = (stream, doc_bounds) if stream is not None else None
    rows = Trainer(model, cfg, data, device=device, progress=progress).fit()
    if log_path is not None:
        write_csv(log_path, rows)
    return rows
