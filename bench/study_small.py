"""The GPU study, one device call at a time: train memories of the ``small`` study at one token
budget, evaluate each right after training (so a call cut short keeps what it finished), then
merge the per-model results of several calls into one report.

    python bench/study_small.py train --memories window sink --out runs/study-small/a
    python bench/study_small.py train --recipe --out runs/study-small/b      # window backbone + the
    staged recipe
    python bench/study_small.py merge runs/study-small/a runs/study-small/b --out
    docs/results/study-small
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from moshi_ttt import report
from moshi_ttt.checkpoint import init_from, save_checkpoint
from moshi_ttt.config import ModelConfig, variant
from moshi_ttt.data.prepare import load_split
from moshi_ttt.models.lm import StreamingLM
from moshi_ttt.pipeline import STUDY_PRESETS, evaluate, run_training
from moshi_ttt.trainer import train
from moshi_ttt.training import STAGED_RECIPE, config_dict

SP = STUDY_PRESETS["small"]


def set_preset(name: str, steps: int | None) -> None:
    """Another study preset (smoke tests on CPU), optionally with fewer steps."""
    global SP
    SP = STUDY_PRESETS[name]
    if steps:
        SP = dataclasses.replace(
            SP,
            train=dataclasses.replace(SP.train, steps=steps),
            eval=dataclasses.replace(SP.eval, num=2, docs=1, distances=(1, 2)),
        )


def model_config(spec: str) -> tuple[str, ModelConfig]:
    """``kind[+tttN][@W][:key=value,...]`` -> (name, config); ``@W`` overrides the window and
    ``:key=value`` memory fields (ablations, e.g. ``ttt_cache:num_virtual=16``)."""
    spec, _, extra = spec.partition(":")
    spec, _, w = spec.partition("@")
    window = int(w) if w else SP.window
    cfg = variant(ModelConfig.preset(SP.model), spec, SP.ttt_chunk, window)
    fields = {"block": SP.block}
    for kv in filter(None, extra.split(",")):
        k, _, v = kv.partition("=")
        fields[k] = (
            type(getattr(cfg.memory, k))(v)
            if not isinstance(getattr(cfg.memory, k), bool)
            else v == "true"
        )
    cfg = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, **fields))
    name = spec if spec.startswith("full") else f"{spec}-{window}"
    return name + (f"-{extra.replace('=', '').replace(',', '-')}" if extra else ""), cfg


def run_recipe(data: Path, out: Path, device: str) -> Path:
    """Spec 003's recipe on a pretrained backbone at the study's total token budget: the ``window``
    model trained for half the steps, the TTT cache added, stages 1-3 for the other half."""
    steps = SP.train.total_steps()
    half = steps // 2
    _, wcfg = model_config("window")
    backbone = run_training(
        wcfg,
        dataclasses.replace(SP.train, steps=half, seq_schedule=()),
        data,
        out / "backbone",
        "window-backbone",
        device,
    )
    name, cfg = model_config("ttt_cache")
    name = f"{name}-recipe"
    split = (half // 5, 2 * half // 5, half - half // 5 - 2 * half // 5)
    stages = tuple(
        dataclasses.replace(
            s, steps=n, frozen_layers_below=cfg.num_layers // 2 if s.frozen_layers_below else 0
        )
        for s, n in zip(STAGED_RECIPE, split)
    )
    tcfg = dataclasses.replace(SP.train, stages=stages, seq_schedule=())
    stream, bounds, manifest = load_split(data, "train")
    torch.manual_seed(tcfg.seed)
    model = StreamingLM(cfg)
    init_from(model, backbone)
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    rows = train(model, stream, bounds, tcfg, log_path=d / "train_log.csv", device=device)
    meta = {
        "name": name,
        "train": config_dict(tcfg),
        "train_log": rows,
        "commit": report.git_commit(),
        "backbone": {"steps": half, "checkpoint": str(backbone)},
    }
    save_checkpoint(d / "model.pt", model, meta)
    return d / "model.pt"


def cmd_train(a) -> None:
    set_preset(a.preset, a.steps)
    a.out.mkdir(parents=True, exist_ok=True)
    for spec in list(a.memories) + (["recipe"] if a.recipe else []):
        t0 = time.perf_counter()
        if spec == "recipe":
            ckpt = run_recipe(a.data, a.out / "recipe", a.device)
        else:
            name, cfg = model_config(spec)
            ckpt = run_training(
                cfg, SP.train, a.data, a.out / name.replace("/", "-"), name, a.device
            )
        t1 = time.perf_counter()
        # shallow: the device brings back folders a few levels deep
        ev = a.out / f"eval-{ckpt.parent.name}"
        evaluate([ckpt], a.data, ev, SP.eval, a.device, SP.train.seq_len)
        timing = {
            "train_s": t1 - t0,
            "eval_s": time.perf_counter() - t1,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        }
        (ev / "wall.json").write_text(json.dumps(timing))
        ckpt.unlink()  # too large to bring back; the metrics are what the study keeps
        print(
            f"{spec}: train {timing['train_s']:.0f} s, eval {timing['eval_s']:.0f} s",
            file=sys.stderr,
            flush=True,
        )


def cmd_merge(a) -> None:
    """Join the per-model metrics of several calls into one metrics.json, report and plots."""
    merged, timing = None, {}
    for d in a.dirs:
        for m in sorted(Path(d).glob("eval-*/metrics.json")):
            met = json.loads(m.read_text())
            timing.update(json.loads((m.parent / "timing.json").read_text()))
            for n in met["models"]:
                met["models"][n]["wall"] = json.loads((m.parent / "wall.json").read_text())
            if merged is None:
                merged = met
            else:
                merged["models"].update(met["models"])
    if merged is None:
        raise ValueError(f"no eval-*/metrics.json under {a.dirs}")
    merged["commit"] = a.commit or sorted({m["commit_trained"] for m in merged["models"].values()})
    a.out.mkdir(parents=True, exist_ok=True)
    report.write_json(a.out / "metrics.json", merged)
    report.write_json(a.out / "timing.json", timing)
    merged["timing"] = timing
    report.write_plots(merged, a.out, SP.window, SP.train.seq_len)
    (a.out / "report.md").write_text(report.markdown(merged))
    print(f"report: {a.out / 'report.md'} ({len(merged['models'])} models)")


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--memories", nargs="*", default=[])
    t.add_argument("--recipe", action="store_true")
    t.add_argument("--preset", default="small", help="study preset (another one for smoke tests)")
    t.add_argument(
        "--steps", type=int, default=None, help="override the training steps (smoke tests)"
    )
    t.add_argument("--data", type=Path, default=Path("data/corpus"))
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.set_defaults(func=cmd_train)
    m = sub.add_parser("merge")
    m.add_argument("dirs", nargs="+", type=Path)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument(
        "--commit",
        default=None,
        help="the commit the runs used (when the device's copy cannot tell)",
    )
    m.set_defaults(func=cmd_merge)
    a = p.parse_args()
    a.func(a)


if __name__ == "__main__":
    main()
