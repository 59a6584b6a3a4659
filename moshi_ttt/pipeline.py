"""Runs that write folders: train one model, evaluate several together into one report."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import long_report, recall_report, report
from .checkpoint import init_from, load_checkpoint, load_meta, save_checkpoint
from .config import GATED_KINDS, ModelConfig, memory_variant
from .data.binding import binding_batch
from .data.tasks import TASKS
from .diagnostics import (
    evicted_token_probe,
    evicting_memories,
    memory_diagnostics,
    state_bytes_curve,
    stream_ms_per_token,
)
from .evaluation import BUCKETS, binding_accuracy, long_stream, loss_by_position, task_accuracy
from .models.lm import StreamingLM
from .trainer import train
from .training import TRAIN_PRESETS, Stage, TrainConfig, config_dict, scale_stages


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
    # tasks told in session 1, asked after a restart (sessions/recall.py)
    cross_session: tuple[str, ...] = ("passkey",)
    cross_session_distance: int = 1  # fact to end of session 1, x the window
    # key-value binding (data/binding.py) with N keys, one question
    binding_keys: tuple[int, ...] = ()
    binding_distances: tuple[float, ...] = (0.5, 1, 2, 4, 16, 64)  # x the window
    binding_num: int = 200  # samples per (N, distance)
    binding_all_questions: bool = False  # also every key asked in turn (drawn with its bag line)
    perplexity: bool = True  # held-out loss by position (needs the corpus's test split)
    long_stream: tuple[int, ...] = ()  # one held-out stream to these multiples of the train length
    # the W of recall and binding distances (x W), in tokens; 0: each model's own window. A study
    # sets its window, so that models of other windows are measured at the same distances
    window: int = 0

    def __post_init__(self):
        object.__setattr__(self, "binding_keys", tuple(int(n) for n in self.binding_keys))
        object.__setattr__(
            self, "binding_distances", tuple(float(x) for x in self.binding_distances)
        )
        if not all(1 <= n <= 64 for n in self.binding_keys):
            raise ValueError(f"EvalConfig.binding_keys must be in 1..64, got {self.binding_keys}")
        if self.binding_keys and (not self.binding_distances or min(self.binding_distances) <= 0):
            raise ValueError(
                f"EvalConfig.binding_distances must be > 0 (x the window), "
                f"got {self.binding_distances}"
            )
        if self.binding_num < 1:
            raise ValueError(f"EvalConfig.binding_num must be >= 1, got {self.binding_num}")
        if self.window < 0:
            raise ValueError(
                f"EvalConfig.window must be >= 0 (0: each model's own), got {self.window}"
            )
        object.__setattr__(self, "long_stream", tuple(int(m) for m in self.long_stream))
        ls = self.long_stream
        if ls and (ls[0] < 1 or any(b <= a for a, b in zip(ls, ls[1:]))):
            raise ValueError(
                f"EvalConfig.long_stream must be increasing multiples >= 1 of the "
                f"training length, got {list(ls)}"
            )
        for name in ("buckets", "tasks", "distances", "cost_lengths", "cross_session"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name, low in (("max_len", 2), ("docs", 1), ("num", 1), ("cross_session_distance", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"EvalConfig.{name} must be >= {low}, got {getattr(self, name)}")
        for name in ("buckets", "cost_lengths"):
            edges = getattr(self, name)
            if not edges or edges[0] < 1 or any(b <= a for a, b in zip(edges, edges[1:])):
                raise ValueError(
                    f"EvalConfig.{name} must be positive and increasing (tokens), got {list(edges)}"
                )
        if any(d < 1 for d in self.distances):
            raise ValueError(
                f"EvalConfig.distances are multiples of the window and must be >= 1, "
                f"got {list(self.distances)}"
            )
        bad = [t for t in self.tasks + self.cross_session if t not in TASKS]
        if bad:
            raise ValueError(f"EvalConfig: unknown tasks {bad}: expected some of {sorted(TASKS)}")


def run_training(
    cfg: ModelConfig,
    tcfg: TrainConfig,
    data: Path | None,
    out: Path,
    name: str,
    device: str,
    progress: bool = True,
    init: Path | None = None,
) -> Path:
    """Train on the corpus's train split (``data`` None: synthetic rows only, which needs
    ``task_frac = 1``), from scratch or from the weights of checkpoint ``init`` (``init_from``);
    writes model.pt, train_log.csv, config.json."""
    from .data.prepare import load_split
    from .trainer import stage_parameters

    stream = bounds = manifest = None
    if data is not None:
        stream, bounds, manifest = load_split(data, "train")
        if manifest["vocab_size"] > cfg.vocab_size:
            raise ValueError(
                f"corpus vocabulary {manifest['vocab_size']} exceeds the model's {cfg.vocab_size}"
            )
    torch.manual_seed(tcfg.seed)
    model = StreamingLM(cfg)
    if init is not None:
        init_from(model, init)
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"training {name}: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{tcfg.total_steps()} steps of {tcfg.batch_size}x{tcfg.seq_len} tokens on {device}",
        file=sys.stderr,
    )
    trained = {n for st in tcfg.all_stages() for n in stage_parameters(model, st)}
    if trained:
        rows = train(
            model,
            stream,
            bounds,
            tcfg,
            log_path=out / "train_log.csv",
            device=device,
            progress=progress,
        )
    else:  # e.g. a window after a memory-only recipe: the model it started from, unchanged
        print(
            f"{name}: no parameter to train in any stage: it keeps the weights it started from",
            file=sys.stderr,
        )
        rows = []
    meta = {
        "name": name,
        "train": config_dict(tcfg),
        "train_log": rows,
        "commit": report.git_commit(),
        "trained_parameters": sum(p.numel() for n, p in model.named_parameters() if n in trained),
        "init": None if init is None else backbone_record(init),
        "data": None
        if data is None
        else {"dir": str(data), "splits": {s: e["sha256"] for s, e in manifest["splits"].items()}},
    }
    save_checkpoint(out / "model.pt", model, meta)
    report.write_json(out / "config.json", {"model": cfg.to_dict(), "train": config_dict(tcfg)})
    return out / "model.pt"


def backbone_record(path: Path) -> dict:
    """What a model started from: the checkpoint and, for a study's backbone, its steps and
    checks."""
    meta = load_meta(path)
    return {
        "checkpoint": str(path),
        "name": meta.get("name"),
        "steps": meta.get("steps"),
        "formed": meta.get("formed"),
        "checks": meta.get("checks"),
    }


def longest_first(stream: np.ndarray, bounds: np.ndarray) -> list[np.ndarray]:
    """The documents of a split, longest first (ties in corpus order)."""
    order = np.argsort(-(bounds[:, 1] - bounds[:, 0]), kind="stable")
    return [np.asarray(stream[bounds[i, 0] : bounds[i, 1]]) for i in order]


def held_out_streams(stream: np.ndarray, bounds: np.ndarray, ec: EvalConfig) -> list[np.ndarray]:
    """The longest held-out documents, or (``concat``) documents joined into streams of max_len."""
    docs = longest_first(stream, bounds)
    if not ec.concat:
        return docs[: ec.docs]
    joined = np.concatenate(docs)
    if len(joined) < ec.docs * ec.max_len:
        raise ValueError(
            f"held-out split has {len(joined)} tokens, fewer than {ec.docs} x {ec.max_len}"
        )
    return [joined[i * ec.max_len : (i + 1) * ec.max_len] for i in range(ec.docs)]


def long_stream_tokens(data: Path, n: int) -> np.ndarray:
    """The first ``n`` tokens of the held-out split with its documents joined, longest first."""
    from .data.prepare import load_split

    stream, bounds, _ = load_split(data, "test")
    joined = np.concatenate(longest_first(stream, bounds))
    if len(joined) < n:
        raise ValueError(
            f"the held-out split of {data} has {len(joined)} tokens: the long stream needs {n}"
        )
    return joined[:n]


def distance_unit(model: StreamingLM, ec: EvalConfig) -> int:
    """The W of recall and binding distances (x W): ``ec.window``, else the model's window."""
    return ec.window or model.cfg.memory.window


def evaluate_model(
    model: StreamingLM,
    docs: list[np.ndarray],
    ec: EvalConfig,
    device: str,
    long_tokens: np.ndarray | None = None,
    train_len: int | None = None,
) -> dict:
    """Every measurement of one model (streaming semantics throughout); with ``long_tokens``
    (``ec.long_stream`` set) the long stream to multiples of ``train_len``."""
    W = distance_unit(model, ec)
    res = {
        "loss_by_position": loss_by_position(
            model, docs, ec.max_len, buckets=ec.buckets, device=device
        )
        if ec.perplexity
        else [],
        "recall": {
            t: task_accuracy(
                model, t, [m * W for m in ec.distances], ec.num, ec.seed, device=device
            )
            for t in ec.tasks
        },
    }
    if ec.binding_keys:
        res["binding"] = binding_results(model, ec, W, device)
    if ec.long_stream:
        res["long_stream"] = long_stream(
            model, long_tokens, train_len, ec.long_stream, device=device
        )
    long_docs = [np.asarray(d[:2048], dtype=np.int64) for d in docs if len(d) >= 2048][:2]
    probe_tokens = torch.as_tensor(np.stack(long_docs), device=device) if long_docs else None
    # no corpus: diagnose the memory on binding samples
    if probe_tokens is None and ec.binding_keys:
        toks, _ = binding_batch(
            [10**9 + i for i in range(2)], 16 * W, min(16, max(ec.binding_keys))
        )
        probe_tokens = torch.as_tensor(toks, device=device)
    if ec.diagnostics and evicting_memories(model) and probe_tokens is not None:
        res["diagnostics"] = memory_diagnostics(model, probe_tokens)
        res["probe"] = evicted_token_probe(model, probe_tokens, layer=0, lag=0)
    lengths = [n for n in ec.cost_lengths if n <= ec.max_len or model.cfg.memory.kind != "full"]
    res["cost"] = {
        "state_bytes": state_bytes_curve(model, lengths),
        "stream_ms_per_token": stream_ms_per_token(model),
        "device": device,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
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
            print(
                f"eval: {ck} is named {old!r} like another model: reported as {new!r}",
                file=sys.stderr,
            )
    return out


def binding_results(model: StreamingLM, ec: EvalConfig, window: int, device: str) -> dict:
    """Binding accuracy per N (str) and distance, with the distance as a multiple of ``window``
    (``distance_w``); with ``binding_all_questions`` the every-key variant under ``"all"``."""
    dists = [max(1, round(m * window)) for m in ec.binding_distances]
    out = {}
    for variant, all_q in (
        (("one", False), ("all", True)) if ec.binding_all_questions else (("one", False),)
    ):
        for n in ec.binding_keys:
            rows = binding_accuracy(
                model,
                n,
                dists,
                ec.binding_num,
                ec.seed,
                num_queries=n if all_q else 1,
                device=device,
            )
            for r, m in zip(rows, ec.binding_distances):
                r["distance_w"] = m
            out.setdefault(variant, {})[str(n)] = rows
    return out


def held_out_data(data: Path | None, ec: EvalConfig) -> tuple[list[np.ndarray], dict]:
    """The held-out streams of ``evaluate_model`` and their provenance (none without perplexity)."""
    from .data.prepare import load_split

    if not ec.perplexity:
        return [], {"dir": None if data is None else str(data), "test_docs": 0, "test_sha256": None}
    if data is None:
        raise ValueError("perplexity by position needs a corpus (--data)")
    stream, bounds, manifest = load_split(data, "test")
    docs = held_out_streams(stream, bounds, ec)
    return docs, {
        "dir": str(data),
        "test_docs": len(docs),
        "test_sha256": manifest["splits"]["test"]["sha256"],
    }


def model_results(
    model: StreamingLM,
    meta: dict,
    ckpt: Path,
    docs,
    ec: EvalConfig,
    device: str,
    long_tokens: np.ndarray | None = None,
    train_len: int | None = None,
) -> dict:
    """One model's entry of ``metrics.json``: its config, training and every measurement."""
    torch.manual_seed(ec.seed)
    return {
        "checkpoint": str(ckpt),
        "config": model.cfg.to_dict(),
        "train": meta.get("train"),
        "init": meta.get("init"),
        "trained_parameters": meta.get("trained_parameters"),
        "train_log": meta.get("train_log", []),
        "commit_trained": meta.get("commit"),
        **evaluate_model(model, docs, ec, device, long_tokens, train_len),
    }


def training_length(meta: dict) -> int | None:
    """The longest training sequence recorded in a checkpoint's meta (None if it has none)."""
    t = meta.get("train")
    if not t:
        return None
    return max([t["seq_len"]] + [n for _, n in t.get("seq_schedule", ())])


def evaluate(
    ckpts: list[Path],
    data: Path,
    out: Path,
    ec: EvalConfig,
    device: str,
    train_len: int | None = None,
) -> dict:
    """Evaluate checkpoints together; writes metrics.json, report.md and the plots to ``out``."""
    missing = [str(ck) for ck in ckpts if not Path(ck).is_file()]
    if missing:
        raise ValueError(f"no checkpoint at {', '.join(missing)}")
    docs, provenance = held_out_data(data, ec)
    names, lengths = [], []
    for ck in ckpts:  # every checkpoint is checked before the long evaluation starts
        meta = load_checkpoint(ck)[1]
        names.append(str(meta.get("name") or Path(ck).parent.name))
        lengths.append(training_length(meta))
    if train_len is None:  # the longest training sequence of the first model that records one
        train_len = next((n for n in lengths if n), None)
    long_tokens = None
    if ec.long_stream:
        if train_len is None:
            raise ValueError(
                "the long stream needs the training length: the checkpoints record "
                "none, give it (--train-len)"
            )
        if data is None:
            raise ValueError("the long stream needs a corpus (--data)")
        long_tokens = long_stream_tokens(data, ec.long_stream[-1] * train_len + 1)
    results = {}
    for ck, name in zip(ckpts, unique_names(names, ckpts)):
        model, meta = load_checkpoint(ck, device)
        results[name] = model_results(
            model.eval(), meta, ck, docs, ec, device, long_tokens, train_len
        )
    return write_results(results, ckpts, provenance, out, ec, device, train_len)


def write_results(
    results: dict,
    ckpts: list[Path],
    provenance: dict,
    out: Path,
    ec: EvalConfig,
    device: str,
    train_len: int | None,
) -> dict:
    """Cross-session recall (it reloads the checkpoints), then metrics.json, timing.json, the plots,
    report.md and, with binding measured, summary.json; with the long stream, long_stream.json
    and long_stream.png."""
    out.mkdir(parents=True, exist_ok=True)
    if ec.cross_session:
        from .sessions.recall import cross_session_recall

        rows = cross_session_recall(
            ckpts, ec.cross_session, ec.cross_session_distance, ec.num, ec.seed, device=device
        )
        for name, row in zip(list(results), rows):
            results[name]["cross_session"] = row
    metrics = {
        "commit": report.git_commit(),
        "seed": ec.seed,
        "eval": dataclasses.asdict(ec),
        "data": provenance,
        "models": results,
    }
    # timings vary from run to run: they go to timing.json, so metrics.json is reproducible to the
    # byte
    timing = {
        n: {
            "stream_ms_per_token": m["cost"].pop("stream_ms_per_token"),
            "device": m["cost"].pop("device"),
        }
        for n, m in results.items()
    }
    report.write_json(out / "metrics.json", metrics)
    report.write_json(out / "timing.json", timing)
    metrics["timing"] = timing
    window = next(iter(results.values()))["config"]["memory"]["window"] if results else None
    report.write_plots(metrics, out, window, train_len)
    if ec.binding_keys:
        summ = recall_report.summary(metrics, train_len)
        if summ["models"]:  # the main table's N measured
            report.write_json(out / "summary.json", summ)
        recall_report.write_plots(metrics, out, train_len)
    if ec.long_stream:
        report.write_json(out / "long_stream.json", long_report.summary(metrics))
        long_report.plot(metrics, out / "long_stream.png")
    (out / "report.md").write_text(report.markdown(metrics, train_len))
    return metrics


@dataclass(frozen=True)
class Backbone:
    """One model trained before a study's memories, which all start from its weights: memory
    ``spec`` trained with ``train`` until binding (``keys`` facts, ``distance`` filler, ``num``
    held-out samples, checked every ``check_every`` steps) reaches ``min_binding``, or ``train``'s
    steps run out. Binding forms in an abrupt jump whose step varies from run to run; a shared
    backbone that has made it lets every memory learn what lies beyond the window from the same
    start, at an equal budget. Gated memories start with their gate at ``gate_init``
    (0: window and memory mixed equally)."""

    train: TrainConfig
    spec: str = "window"
    check_every: int = 250
    min_binding: float = 0.95
    keys: int = 4
    distance: int = 8
    num: int = 128
    gate_init: float = 0.0

    def __post_init__(self):
        if self.check_every < 1 or self.num < 1 or self.keys < 1 or self.distance < 0:
            raise ValueError(
                f"Backbone: check_every, num and keys must be >= 1 and distance >= 0, "
                f"got {self.check_every}, {self.num}, {self.keys}, {self.distance}"
            )
        if not 0.0 <= self.min_binding <= 1.0:
            raise ValueError(f"Backbone.min_binding must be in [0, 1], got {self.min_binding}")


@dataclass(frozen=True)
class StudyPreset:
    """Memories trained at the same budget, then evaluated together. ``memories``: specs of
    ``config.memory_variant`` (``kind[+tttN][@W][:field=value,...]``); ``corpus`` False trains on
    synthetic rows only (``train.task_frac`` 1) and needs no corpus."""

    model: str
    memories: tuple[str, ...]
    window: int
    block: int
    train: TrainConfig
    eval: EvalConfig = field(default_factory=EvalConfig)
    ttt_chunk: int = 64
    corpus: bool = True
    backbone: Backbone | None = None  # trained first; every memory starts from its weights


# the recall study's memories: the controls (full, window), the baselines, the TTT cache with each
# reader and all of them, In-Place TTT; then more sizes for the memory/recall frontier
RECALL_READERS = "read_query=true,gate_per_token=true,compressor_proj=true"
RECALL_MEMORIES = (
    "full",
    "window",
    "window@128",
    "sink",
    "pooled",
    "infini",
    "ttt_cache",
    "ttt_cache:read_query=true",
    "ttt_cache:gate_per_token=true",
    "ttt_cache:compressor_proj=true",
    f"ttt_cache:{RECALL_READERS}",
    "window+ttt2",
    "window@16",
    "window@64",
    "pooled:num_virtual=16",
    f"ttt_cache:{RECALL_READERS},compressor_hidden=128",
    # infini's state bytes (131,752 against 132,616): a narrow compressor and a short eviction block
    f"ttt_cache:{RECALL_READERS},compressor_hidden=8,block=4",
)

CPU_TRAIN = TrainConfig(
    steps=400,
    batch_size=16,
    seq_len=256,
    lr=3e-3,
    warmup=30,
    task_frac=0.25,
    tasks=("passkey", "mqar"),
    task_distances=(32, 64, 128),
    answer_weight=5.0,
)

# the main job on 2 CPU cores, in two parts. First a window model (the backbone): half of each
# batch corpus text, half one fact (a key and its value) stated, random filler, the key asked;
# first within the window, then up to 4 x W back. The answer weighs as much as a corpus row, so
# both are learned at once.
CPU_RECALL_TRAIN = TrainConfig(
    steps=1200,
    batch_size=32,
    seq_len=192,
    lr=3e-3,
    warmup=50,
    task_frac=0.5,
    tasks=("binding",),
    binding_keys=(1,),
    binding_queries=1,
    binding_anywhere=True,
    near_steps=400,
    near_distances=(0, 4, 8, 16),
    task_distances=(0, 16, 32, 64, 128),
    seq_schedule=((0, 64), (400, 192)),
    answer_weight=192.0,
    context_weight=0.0,
)

# Then each memory from the backbone's weights, its memory parameters alone: the language model
# stays the window model's, so the memory can only add to it. Rows of 768 tokens, so that the
# memory learns to read states as long as the evaluation's. Three quarters of each batch hold the
# fact: within the window for the first 100 steps, then 1.5 to 8 x W back, where only a memory can
# answer; each answer weighs 48. With half the rows and distances from 0, the TTT cache learnt to
# keep the fact with fewer backbone seeds (bench/cpu_recipe_sweep.py, docs/results/study-cpu).
# The TTT cache forgets 0.03 per block of 16 evicted tokens: its state settles within about
# 1 / 0.03 blocks (530 tokens), inside a training row, so the states it reads at 5000 tokens are
# of the kind it trained on (with the default 0.01 they settle after 1,600 tokens, and it reads
# 2000-5000 worse than the window).
CPU_MEMORY_TRAIN = dataclasses.replace(
    CPU_RECALL_TRAIN,
    steps=600,
    batch_size=8,
    seq_len=768,
    lr=1e-2,
    warmup=30,
    near_steps=100,
    seq_schedule=((0, 64), (100, 768)),
    answer_weight=48.0,
    task_frac=0.75,
    task_distances=(48, 64, 96, 128, 256),
    stages=(Stage("memory", 600, ("*.memory.*",)),),
)

SMALL_TRAIN = TrainConfig(
    steps=200,
    batch_size=16,
    seq_len=1024,
    lr=1e-3,
    warmup=20,
    bf16=True,
    task_frac=0.25,
    tasks=("passkey", "mqar"),
    task_distances=(64, 256, 768),
    answer_weight=5.0,
)
LONG_STREAM = EvalConfig(
    max_len=2048,
    docs=2,
    buckets=(256, 2048),
    tasks=(),
    cross_session=(),
    diagnostics=False,
    perplexity=False,
    long_stream=(1, 2, 4, 8, 16, 32, 64),
    cost_lengths=(256,),
)

STUDY_PRESETS = {
    # tiny models on 2 CPU cores, a few minutes per memory
    # (the window is the backbone itself: it has no memory parameters to train)
    "cpu": StudyPreset(
        model="tiny",
        memories=("window", "infini", f"ttt_cache:{RECALL_READERS},decay=0.03"),
        window=32,
        block=16,
        train=CPU_MEMORY_TRAIN,
        backbone=Backbone(
            CPU_RECALL_TRAIN,
            check_every=CPU_RECALL_TRAIN.steps,
            min_binding=0.0,
            keys=1,
            gate_init=3.0,
        ),
        eval=EvalConfig(
            max_len=5000,
            docs=4,
            buckets=(256, 1000, 2000, 5000),
            tasks=(),
            cross_session=(),
            binding_keys=(1,),
            binding_num=100,
            binding_distances=(0.5, 1, 2, 4, 16, 64),
        ),
    ),
    # stationarity on 2 CPU cores: the cpu preset's training, then one held-out stream to 64 x the
    # training length (loss per length, fast-weight norms) for the window and each forgetting
    "stationarity": StudyPreset(
        model="tiny",
        window=32,
        block=16,
        train=CPU_TRAIN,
        memories=(
            "window",
            "ttt_cache",
            "window+ttt2",
            "ttt_cache+ttt2",
            "ttt_cache:decay=0.0,gate_init=0.0",
            "window+ttt2:ttt.decay=0.0",
        ),
        eval=LONG_STREAM,
    ),
    # the same on the GPU: the small study's training, streamed to 64 x 1024 tokens (--jobs 4)
    "stationarity-small": StudyPreset(
        model="small",
        window=64,
        block=64,
        train=SMALL_TRAIN,
        memories=("window", "ttt_cache", "window+ttt4", "ttt_cache+ttt4"),
        eval=LONG_STREAM,
    ),
    # the GPU study (bench/study_small.py runs it a few memories per device call): window 64 so the
    # evaluation reaches 64 x W = 4096 tokens; trained at 1024 = 16 x W
    "small": StudyPreset(
        model="small",
        memories=(
            "window",
            "window@256",
            "sink",
            "pooled",
            "infini",
            "ttt_cache",
            "window+ttt4",
            "ttt_cache+ttt4",
            "full",
        ),
        window=64,
        block=64,
        train=SMALL_TRAIN,
        eval=EvalConfig(
            max_len=4096,
            docs=4,
            buckets=(64, 256, 1024, 2048, 4096),
            num=16,
            tasks=("passkey", "mqar"),
        ),
    ),
    # key-value binding (GPU, ``--jobs``: the models train as parallel processes); window 32, block
    # 16; a backbone learns to bind 2 or 4 facts inside the window, then every memory trains from it
    # on 2-16 facts, inside the window, then up to 4 x W
    "recall": StudyPreset(
        model="recall",
        memories=RECALL_MEMORIES,
        window=32,
        block=16,
        ttt_chunk=32,
        corpus=False,
        train=TRAIN_PRESETS["recall-memory"],
        backbone=Backbone(TRAIN_PRESETS["recall-backbone"]),
        eval=EvalConfig(
            perplexity=False,
            tasks=(),
            cross_session=(),
            num=1,
            binding_keys=(1, 2, 4, 8, 16, 32),
            binding_all_questions=True,
            cost_lengths=(512, 2048, 8192),
        ),
    ),
}
# the recall study mixed with corpus text (``--data``): the controls, infini and the TTT cache with
# its readers, from the same backbone, trained on half corpus rows, also measured by perplexity
STUDY_PRESETS["recall-corpus"] = dataclasses.replace(
    STUDY_PRESETS["recall"],
    memories=("full", "window", "infini", f"ttt_cache:{RECALL_READERS}"),
    corpus=True,
    train=TRAIN_PRESETS["recall-corpus"],
    eval=dataclasses.replace(
        STUDY_PRESETS["recall"].eval, perplexity=True, max_len=2048, buckets=(256, 1024, 2048)
    ),
)


def study_jobs(
    sp: StudyPreset,
    data: Path | None,
    out: Path,
    steps: int | None = None,
    memories: tuple[str, ...] | None = None,
    seed: int | None = None,
) -> list[tuple]:
    """(name, model config, train config, folder) of every memory of a study preset; ``steps``
    rescales the training (the curriculum's stages and near steps in proportion), ``seed``
    replaces the training seed; with a backbone, gated memories start at its ``gate_init``."""
    tcfg = sp.train if seed is None else dataclasses.replace(sp.train, seed=seed)
    if steps is not None:
        tcfg = scale_steps(tcfg, steps)
    base = ModelConfig.preset(sp.model)
    jobs = []
    for spec in memories or sp.memories:
        name, cfg = memory_variant(base, spec, sp.ttt_chunk, sp.window, sp.block)
        if sp.backbone and cfg.memory.kind in GATED_KINDS:
            cfg = dataclasses.replace(
                cfg, memory=dataclasses.replace(cfg.memory, gate_init=sp.backbone.gate_init)
            )
        jobs.append((name, cfg, tcfg, out / name))
    names = [j[0] for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"two memories of the study have one name: {names}")
    return jobs


def scale_steps(tcfg: TrainConfig, steps: int) -> TrainConfig:
    """``tcfg`` trained for ``steps`` steps; warm-up, near steps and the length and key schedules in
    proportion."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    f = steps / tcfg.total_steps()
    stages = scale_stages(tcfg.stages, steps) if tcfg.stages else ()
    return dataclasses.replace(
        tcfg,
        steps=steps,
        stages=stages,
        warmup=max(1, round(tcfg.warmup * f)),
        near_steps=round(tcfg.near_steps * f),
        seq_schedule=tuple((round(s * f), n) for s, n in tcfg.seq_schedule),
        keys_schedule=tuple((round(s * f), n) for s, n in tcfg.keys_schedule),
    )


def train_backbone(
    sp: StudyPreset, out: Path, device: str, progress: bool = True, data: Path | None = None
) -> Path:
    """Train ``sp.backbone`` (on the train split of corpus ``data`` where given) until its binding
    check passes or its steps run out; writes ``out/model.pt`` whose meta holds the steps taken,
    every check and whether binding formed."""
    from .data.prepare import load_split
    from .trainer import Trainer

    bb = sp.backbone
    base = ModelConfig.preset(sp.model)
    name, cfg = memory_variant(base, bb.spec, sp.ttt_chunk, sp.window, sp.block)
    torch.manual_seed(bb.train.seed)
    model = StreamingLM(cfg)
    train_data = None if data is None else load_split(data, "train")[:2]
    trainer = Trainer(model, bb.train, train_data, device=device, progress=False)
    total, checks, formed = bb.train.total_steps(), [], False
    with tqdm(total=total, desc="backbone", disable=not progress, dynamic_ncols=True) as bar:
        while trainer.step < total and not formed:
            for _ in range(min(bb.check_every, total - trainer.step)):
                loss = trainer.train_step()
                bar.update()
            acc = binding_accuracy(
                model, bb.keys, [bb.distance], bb.num, seed=7, device=device, progress=False
            )[0]["accuracy"]
            model.train()
            checks.append({"step": trainer.step, "loss": loss, "binding": acc})
            formed = acc >= bb.min_binding
            bar.set_postfix(loss=f"{loss:.3f}", binding=f"{acc:.2f}")
    if not formed:
        print(
            f"backbone: binding {acc:.2f} < {bb.min_binding} after {total} steps: the memories "
            "start from a backbone that does not bind",
            file=sys.stderr,
        )
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "name": f"backbone-{name}",
        "train": config_dict(bb.train),
        "steps": trainer.step,
        "formed": formed,
        "checks": checks,
        "commit": report.git_commit(),
    }
    save_checkpoint(out / "model.pt", model, meta)
    return out / "model.pt"


def train_and_evaluate(
    name: str,
    cfg: ModelConfig,
    tcfg: TrainConfig,
    folder: Path,
    data: Path | None,
    ec: EvalConfig,
    device: str,
    progress: bool = True,
    threads: int = 0,
    init: Path | None = None,
) -> dict:
    """Train one model (from checkpoint ``init`` if given), then measure it (its ``metrics.json``
    entry, also kept as ``folder/eval.json``, so a study cut short keeps every model it
    finished)."""
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    ckpt = run_training(cfg, tcfg, data, folder, name, device, progress=progress, init=init)
    t1 = time.perf_counter()
    model, meta = load_checkpoint(ckpt, device)
    docs, _ = held_out_data(data, ec)
    train_len = tcfg.max_seq_len()
    long_tokens = None
    if ec.long_stream:
        long_tokens = long_stream_tokens(data, ec.long_stream[-1] * train_len + 1)
    res = model_results(model.eval(), meta, ckpt, docs, ec, device, long_tokens, train_len)
    res["wall"] = {"train_s": t1 - t0, "eval_s": time.perf_counter() - t1}
    report.write_json(folder / "eval.json", res)
    print(
        f"{name}: trained in {t1 - t0:.0f} s, evaluated in {res['wall']['eval_s']:.0f} s",
        file=sys.stderr,
    )
    return res


def study_eval(sp: StudyPreset) -> EvalConfig:
    """A study's evaluation: distances in multiples of the study's window for every model (its
    own ``eval.window`` if set)."""
    return sp.eval if sp.eval.window else dataclasses.replace(sp.eval, window=sp.window)


def run_study(
    preset: str,
    data: Path | None,
    out: Path,
    device: str,
    jobs: int = 1,
    steps: int | None = None,
    memories: tuple[str, ...] | None = None,
    backbone: Path | None = None,
    seed: int | None = None,
) -> dict:
    """Train every memory of a study preset at the same budget (from the preset's backbone, trained
    first, if it has one; ``backbone``: a checkpoint of it trained before, so that memories trained
    in separate runs share it) and evaluate them together; with ``jobs`` > 1 the models train as
    parallel processes (several small models share one GPU). ``seed`` replaces the training seed
    of every model and of the backbone."""
    if preset not in STUDY_PRESETS:
        raise ValueError(
            f"unknown study preset {preset!r}: expected one of {sorted(STUDY_PRESETS)}"
        )
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    sp = STUDY_PRESETS[preset]
    if seed is not None and sp.backbone:  # the seed of the whole study, its backbone included
        sp = dataclasses.replace(
            sp,
            backbone=dataclasses.replace(
                sp.backbone, train=dataclasses.replace(sp.backbone.train, seed=seed)
            ),
        )
    if sp.corpus and sp.train.task_frac < 1 and data is None:
        raise ValueError(
            f"study preset {preset!r} trains on corpus text (task_frac "
            f"{sp.train.task_frac}): give a prepared corpus folder"
        )
    data = data if sp.corpus else None
    ec = study_eval(sp)
    work = study_jobs(sp, data, out, steps, memories, seed)
    if backbone is not None and not sp.backbone:
        raise ValueError(
            f"study preset {preset!r} has no backbone: it trains every memory from scratch"
        )
    if backbone is not None and not Path(backbone).is_file():
        raise ValueError(f"backbone {backbone}: no such checkpoint")
    init = backbone or (
        train_backbone(sp, out / "backbone", device, data=data) if sp.backbone else None
    )
    results = {}
    if jobs == 1:
        for name, cfg, tcfg, folder in work:
            results[name] = train_and_evaluate(name, cfg, tcfg, folder, data, ec, device, init=init)
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = {
                pool.submit(
                    train_and_evaluate,
                    name,
                    cfg,
                    tcfg,
                    folder,
                    data,
                    ec,
                    device,
                    False,
                    threads,
                    init,
                ): name
                for name, cfg, tcfg, folder in work
            }
            for fut in tqdm(
                as_completed(futures), total=len(futures), desc="study", dynamic_ncols=True
            ):
                results[futures[fut]] = fut.result()
        results = {name: results[name] for name, *_ in work}  # the preset's order
    for r in results.values():
        r.pop("wall", None)
    ckpts = [folder / "model.pt" for *_, folder in work]
    _, provenance = held_out_data(data, ec)
    return write_results(results, ckpts, provenance, out, ec, device, work[0][2].max_seq_len())
