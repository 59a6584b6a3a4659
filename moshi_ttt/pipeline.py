"""Runs that write folders: train one model, evaluate several together into one report."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import report
from .checkpoint import load_checkpoint, save_checkpoint
from .config import ModelConfig
from .data.tasks import TASKS
from .diagnostics import (evicted_token_probe, evicting_memories, memory_diagnostics, state_bytes_curve,
                          stream_ms_per_token)
from .evaluation import BUCKETS, loss_by_position, task_accuracy
from .models.lm import StreamingLM
from .training import TrainConfig, config_dict, train


@dataclass(frozen=True)
class EvalConfig:
    """What ``evaluate`` measures: held-out loss by position (documents cut at ``max_len``, or
    concatenated into ``docs`` streams of ``max_len`` tokens when ``concat``), recall accuracy at
    ``distances`` x the window, memory diagnostics, the evicted-token probe and the cost."""

    max_len: int = 5000
    docs: int = 4
    concat: bool = False
    buckets: tuple[int, ...] = BUCKETS
    tasks: tuple[str, ...] = ("passkey",)
    distances: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    num: int = 16
    seed: int = 0
    diagnostics: bool = True
    cost_lengths: tuple[int, ...] = (1000, 2000, 5000, 10000)
    cross_session: tuple[str, ...] = ("passkey",)  # tasks told in session 1, asked after a restart (sessions/recall.py)
    cross_session_distance: int = 1  # fact to end of session 1, x the window

    def __post_init__(self):
        for name in ("buckets", "tasks", "distances", "cost_lengths", "cross_session"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name, low in (("max_len", 2), ("docs", 1), ("num", 1), ("cross_session_distance", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"EvalConfig.{name} must be >= {low}, got {getattr(self, name)}")
        for name in ("buckets", "cost_lengths"):
            edges = getattr(self, name)
            if not edges or edges[0] < 1 or any(b <= a for a, b in zip(edges, edges[1:])):
                raise ValueError(f"EvalConfig.{name} must be positive and increasing (tokens), "
                                 f"got {list(edges)}")
        if any(d < 1 for d in self.distances):
            raise ValueError(f"EvalConfig.distances are multiples of the window and must be >= 1, "
                             f"got {list(self.distances)}")
        bad = [t for t in self.tasks + self.cross_session if t not in TASKS]
        if bad:
            raise ValueError(f"EvalConfig: unknown tasks {bad}: expected some of {sorted(TASKS)}")


def run_training(cfg: ModelConfig, tcfg: TrainConfig, data: Path, out: Path, name: str, device: str) -> Path:
    """Train from scratch on the corpus's train split; writes model.pt, train_log.csv, config.json."""
    from .data.prepare import load_split

    stream, bounds, manifest = load_split(data, "train")
    if manifest["vocab_size"] > cfg.vocab_size:
        raise ValueError(f"corpus vocabulary {manifest['vocab_size']} exceeds the model's {cfg.vocab_size}")
    torch.manual_seed(tcfg.seed)
    model = StreamingLM(cfg)
    out.mkdir(parents=True, exist_ok=True)
    print(f"training {name}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{tcfg.steps} steps of {tcfg.batch_size}x{tcfg.seq_len} tokens on {device}", file=sys.stderr)
    rows = train(model, stream, bounds, tcfg, log_path=out / "train_log.csv", device=device)
    meta = {"name": name, "train": config_dict(tcfg), "train_log": rows, "commit": report.git_commit(),
            "data": {"dir": str(data), "splits": {s: e["sha256"] for s, e in manifest["splits"].items()}}}
    save_checkpoint(out / "model.pt", model, meta)
    report.write_json(out / "config.json", {"model": cfg.to_dict(), "train": config_dict(tcfg)})
    return out / "model.pt"


def held_out_streams(stream: np.ndarray, bounds: np.ndarray, ec: EvalConfig) -> list[np.ndarray]:
    """The longest held-out documents, or (``concat``) documents joined into streams of max_len."""
    order = np.argsort(-(bounds[:, 1] - bounds[:, 0]), kind="stable")
    docs = [np.asarray(stream[bounds[i, 0]:bounds[i, 1]]) for i in order]
    if not ec.concat:
        return docs[:ec.docs]
    joined = np.concatenate(docs)
    if len(joined) < ec.docs * ec.max_len:
        raise ValueError(f"held-out split has {len(joined)} tokens, fewer than {ec.docs} x {ec.max_len}")
    return [joined[i * ec.max_len:(i + 1) * ec.max_len] for i in range(ec.docs)]


def evaluate_model(model: StreamingLM, docs: list[np.ndarray], ec: EvalConfig, device: str) -> dict:
    """Every measurement of one model (streaming semantics throughout)."""
    W = model.cfg.memory.window
    res = {"loss_by_position": loss_by_position(model, docs, ec.max_len, buckets=ec.buckets, device=device),
           "recall": {t: task_accuracy(model, t, [m * W for m in ec.distances], ec.num, ec.seed, device=device)
                      for t in ec.tasks}}
    long_docs = [np.asarray(d[:2048], dtype=np.int64) for d in docs if len(d) >= 2048][:2]
    probe_tokens = torch.as_tensor(np.stack(long_docs), device=device) if long_docs else None
    if ec.diagnostics and evicting_memories(model) and probe_tokens is not None:
        res["diagnostics"] = memory_diagnostics(model, probe_tokens)
        res["probe"] = evicted_token_probe(model, probe_tokens, layer=0, lag=0)
    lengths = [n for n in ec.cost_lengths if n <= ec.max_len or model.cfg.memory.kind != "full"]
    res["cost"] = {"state_bytes": state_bytes_curve(model, lengths),
                   "stream_ms_per_token": stream_ms_per_token(model), "device": device,
                   "parameters": sum(p.numel() for p in model.parameters())}
    return res


def unique_names(names: list[str], ckpts: list[Path]) -> list[str]:
    """Names made unique for the report: a repeated name gets its checkpoint's folder (with as
    many parent folders as tell the checkpoints apart), then a counter; renamings are printed."""
    out = list(names)
    for name in dict.fromkeys(names):
        idx = [i for i, n in enumerate(names) if n == name]
        if len(idx) < 2:
            continue
        parents = [Path(ckpts[i]).resolve().parent.parts for i in idx]
        k = 1
        while k < max(map(len, parents)) and len({p[-k:] for p in parents}) < len(idx):
            k += 1
        if len({p[-k:] for p in parents}) < len(idx):
            k = 1  # the same folder more than once: the counter tells them apart
        for i, p in zip(idx, parents):
            out[i] = f"{name} ({'/'.join(p[-k:])})"
    taken: set[str] = set()
    for i, name in enumerate(out):
        k = 2
        while out[i] in taken:
            out[i], k = f"{name} #{k}", k + 1
        taken.add(out[i])
    for ck, old, new in zip(ckpts, names, out):
        if new != old:
            print(f"eval: {ck} is named {old!r} like another model: reported as {new!r}",
                  file=sys.stderr)
    return out


def evaluate(ckpts: list[Path], data: Path, out: Path, ec: EvalConfig, device: str, train_len: int | None = None) -> dict:
    """Evaluate checkpoints together; writes metrics.json, report.md and the plots to ``out``."""
    from .data.prepare import load_split

    missing = [str(ck) for ck in ckpts if not Path(ck).is_file()]
    if missing:
        raise ValueError(f"no checkpoint at {', '.join(missing)}")
    stream, bounds, manifest = load_split(data, "test")
    docs = held_out_streams(stream, bounds, ec)
    out.mkdir(parents=True, exist_ok=True)
    results, window, names = {}, None, []
    for ck in ckpts:  # every checkpoint is checked before the long evaluation starts
        meta = load_checkpoint(ck)[1]
        names.append(str(meta.get("name") or Path(ck).parent.name))
    names = unique_names(names, ckpts)
    for ck, name in zip(ckpts, names):
        model, meta = load_checkpoint(ck, device)
        model.eval()
        window = window or model.cfg.memory.window
        torch.manual_seed(ec.seed)
        results[name] = {"checkpoint": str(ck), "config": model.cfg.to_dict(), "train": meta.get("train"),
                         "train_log": meta.get("train_log", []), "commit_trained": meta.get("commit"),
                         **evaluate_model(model, docs, ec, device)}
    if ec.cross_session:
        from .sessions.recall import cross_session_recall

        rows = cross_session_recall(ckpts, ec.cross_session, ec.cross_session_distance, ec.num, ec.seed, device=device)
        for name, row in zip(list(results), rows):
            results[name]["cross_session"] = row
    metrics = {"commit": report.git_commit(), "seed": ec.seed, "eval": dataclasses.asdict(ec),
               "data": {"dir": str(data), "test_docs": len(docs), "test_sha256": manifest["splits"]["test"]["sha256"]},
               "models": results}
    # timings vary from run to run: they go to timing.json, so metrics.json is reproducible to the byte
    timing = {n: {"stream_ms_per_token": m["cost"].pop("stream_ms_per_token"), "device": m["cost"].pop("device")}
              for n, m in results.items()}
    report.write_json(out / "metrics.json", metrics)
    report.write_json(out / "timing.json", timing)
    metrics["timing"] = timing
    report.write_plots(metrics, out, window, train_len)
    (out / "report.md").write_text(report.markdown(metrics))
    return metrics


@dataclass(frozen=True)
class StudyPreset:
    """Memories trained at the same budget, then evaluated together."""

    model: str
    memories: tuple[str, ...]
    window: int
    block: int
    train: TrainConfig
    eval: EvalConfig = field(default_factory=EvalConfig)
    ttt_chunk: int = 64


STUDY_PRESETS = {
    # tiny models on 2 CPU cores, a few minutes per memory
    "cpu": StudyPreset(model="tiny", memories=("window", "pooled", "infini", "ttt_cache"), window=32, block=16,
                       train=TrainConfig(steps=400, batch_size=16, seq_len=256, lr=3e-3, warmup=30,
                                         task_frac=0.25, tasks=("passkey", "mqar"), task_distances=(32, 64, 128),
                                         answer_weight=5.0),
                       eval=EvalConfig(max_len=5000, docs=4, buckets=(256, 1000, 2000, 5000), num=16,
                                       tasks=("passkey", "mqar"))),
    # the GPU study (bench/study_small.py runs it a few memories per device call): window 64 so the
    # evaluation reaches 64 x W = 4096 tokens; trained at 1024 = 16 x W
    "small": StudyPreset(model="small", memories=("window", "window@256", "sink", "pooled", "infini", "ttt_cache",
                                                  "window+ttt4", "ttt_cache+ttt4", "full"), window=64, block=64,
                         train=TrainConfig(steps=200, batch_size=16, seq_len=1024, lr=1e-3, warmup=20, bf16=True,
                                           task_frac=0.25, tasks=("passkey", "mqar"), task_distances=(64, 256, 768),
                                           answer_weight=5.0),
                         eval=EvalConfig(max_len=4096, docs=4, buckets=(64, 256, 1024, 2048, 4096), num=16,
                                         tasks=("passkey", "mqar"))),
}


def run_study(preset: str, data: Path, out: Path, device: str) -> dict:
    from .config import variant

    if preset not in STUDY_PRESETS:
        raise ValueError(f"unknown study preset {preset!r}: expected one of {sorted(STUDY_PRESETS)}")
    sp = STUDY_PRESETS[preset]
    base = ModelConfig.preset(sp.model)
    ckpts = []
    for spec in sp.memories:
        spec, _, w = spec.partition("@")  # kind@W: another window
        window = int(w) if w else sp.window
        cfg = variant(base, spec, sp.ttt_chunk, window)
        cfg = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, block=sp.block))
        name = spec if spec.startswith("full") else f"{spec}-{window}"
        ckpts.append(run_training(cfg, sp.train, data, out / name.replace("/", "-"), name, device))
    return evaluate(ckpts, data, out, sp.eval, device, sp.train.seq_len)
