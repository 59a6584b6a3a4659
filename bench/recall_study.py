"""The recall study in one GPU call: time every model's training step with all models running at
once, give every model the same number of steps so that the slowest finishes within ``--budget``
seconds, then ``run_study("recall")``: the backbone first (until it binds), then every memory from
it, as parallel processes.

    python bench/recall_study.py --out runs/recall --budget 330 --jobs 16
    python bench/recall_study.py --out /tmp/r --budget 20 --jobs 2 --device cpu --batch 4 \\
        --backbone-steps 20 --memories window ttt_cache --binding-num 4     # a smoke test on CPU
    python bench/recall_study.py --out runs/recall2 --backbone runs/recall/backbone/model.pt \\
        --memories window@16 window@64        # more memories from the same backbone
    python bench/recall_study.py --out runs/mix --preset recall-corpus --data data/corpus \\
        --backbone runs/recall/backbone/model.pt     # the same mixed with corpus text
    python bench/recall_study.py --merge runs/recall --out docs/results/recall-study
        # the report of the models a run finished (each model's eval.json)
    python bench/recall_study.py --evaluate runs/recall/window-128 --device cpu
        # measure finished models again (rewrites their eval.json)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from moshi_ttt import pipeline, report
from moshi_ttt.checkpoint import load_checkpoint
from moshi_ttt.config import ModelConfig, memory_variant
from moshi_ttt.models.lm import StreamingLM
from moshi_ttt.trainer import Trainer


def time_steps(spec: str, tcfg, sp, device: str, reps: int, threads: int) -> dict:
    """Seconds per training step of one memory in the near phase (short rows) and the far phase,
    and its peak GPU memory."""
    torch.set_num_threads(threads)
    name, cfg = memory_variant(
        ModelConfig.preset(sp.model), spec, sp.ttt_chunk, sp.window, sp.block
    )
    trainer = Trainer(StreamingLM(cfg), tcfg, None, device=device, progress=False)
    out = {"name": name}
    for phase, step in (("near", 0), ("far", tcfg.near_steps)):
        trainer.step = step
        trainer.train_step()  # warm-up (kernel compilation)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            trainer.step = step
            trainer.train_step()
        if device == "cuda":
            torch.cuda.synchronize()
        out[f"{phase}_s"] = (time.perf_counter() - t0) / reps
    out["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=None, help="the study's folder (all but --evaluate)")
    p.add_argument(
        "--budget", type=float, default=330.0, help="seconds of training for the slowest model"
    )
    p.add_argument("--jobs", type=int, default=16)
    p.add_argument("--memories", nargs="+", default=None)
    p.add_argument(
        "--preset",
        default="recall",
        choices=("recall", "recall-corpus"),
        help="recall-corpus: half of each batch corpus text (needs --data)",
    )
    p.add_argument("--data", type=Path, default=None, help="the corpus folder (recall-corpus)")
    p.add_argument("--batch", type=int, default=None, help="override the preset's batch size")
    p.add_argument("--lr", type=float, default=None, help="override the preset's learning rate")
    p.add_argument("--seed", type=int, default=None, help="override the preset's seed")
    p.add_argument("--steps", type=int, default=None, help="skip the timing: train this many steps")
    p.add_argument("--max-steps", type=int, default=20000)
    p.add_argument(
        "--binding-num", type=int, default=None, help="override the samples per (N, distance)"
    )
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--backbone-steps",
        type=int,
        default=None,
        help="override the most steps the backbone trains before it binds",
    )
    p.add_argument(
        "--backbone",
        type=Path,
        default=None,
        help="start every memory from this backbone checkpoint (of an earlier run) "
        "instead of training one",
    )
    p.add_argument(
        "--merge",
        type=Path,
        default=None,
        help="write the report of the models finished under this folder (no training)",
    )
    p.add_argument(
        "--evaluate",
        type=Path,
        nargs="+",
        default=None,
        help="measure the models in these folders again at the study's distances, "
        "rewriting their eval.json (no training)",
    )
    a = p.parse_args()
    if a.evaluate:
        evaluate(a.evaluate, a.device)
        return
    if a.out is None:
        p.error("--out is required (but with --evaluate)")
    if a.merge:
        merge(a.merge, a.out)
        return

    sp = pipeline.STUDY_PRESETS[a.preset]
    if sp.corpus and (a.data is None or not (a.data / "manifest.json").is_file()):
        p.error(
            f"--preset {a.preset} mixes corpus text: --data must name a prepared corpus folder "
            f"(moshi-ttt prepare), got {a.data}"
        )
    over = {
        k: v for k, v in (("batch_size", a.batch), ("lr", a.lr), ("seed", a.seed)) if v is not None
    }
    sp = dataclasses.replace(sp, train=dataclasses.replace(sp.train, **over))
    if sp.backbone:  # the same overrides, and at most --backbone-steps steps
        bb_over = over if a.backbone_steps is None else {**over, "steps": a.backbone_steps}
        sp = dataclasses.replace(
            sp,
            backbone=dataclasses.replace(
                sp.backbone, train=dataclasses.replace(sp.backbone.train, **bb_over)
            ),
        )
    if a.binding_num:
        sp = dataclasses.replace(sp, eval=dataclasses.replace(sp.eval, binding_num=a.binding_num))
    pipeline.STUDY_PRESETS["recall-run"] = sp
    specs = tuple(a.memories or sp.memories)
    a.out.mkdir(parents=True, exist_ok=True)
    steps = a.steps
    if steps is None:
        t0 = time.perf_counter()
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=len(specs), mp_context=ctx) as pool:
            futs = [pool.submit(time_steps, s, sp.train, sp, a.device, a.reps, 1) for s in specs]
            timing = [f.result() for f in futs]
        frac = sp.train.near_steps / sp.train.total_steps()
        per_step = max(frac * t["near_s"] + (1 - frac) * t["far_s"] for t in timing)
        steps = int(min(a.max_steps, max(50, a.budget / per_step)) // 50 * 50)
        calib = {
            "timing": timing,
            "slowest_s_per_step": per_step,
            "budget_s": a.budget,
            "steps": steps,
            "calibration_s": time.perf_counter() - t0,
            "jobs": a.jobs,
            "batch": sp.train.batch_size,
            "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
        }
        (a.out / "calibration.json").write_text(json.dumps(calib, indent=2) + "\n")
        print(json.dumps(calib, indent=1), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    pipeline.run_study(
        "recall-run",
        a.data if sp.corpus else None,
        a.out,
        a.device,
        jobs=a.jobs,
        steps=steps,
        memories=specs,
        backbone=a.backbone,
    )
    print(f"study: {steps} steps per model, {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def evaluate(folders: list[Path], device: str) -> None:
    """Each folder's ``model.pt`` measured again with the study's evaluation into its eval.json
    (models evaluated at the distances of an older evaluation)."""
    missing = [str(f) for f in folders if not (f / "model.pt").is_file()]
    if missing:
        raise SystemExit(f"no model.pt in {', '.join(missing)}")
    ec = pipeline.study_eval(pipeline.STUDY_PRESETS["recall"])
    for folder in folders:
        model, meta = load_checkpoint(folder / "model.pt", device)
        t0 = time.perf_counter()
        res = pipeline.model_results(model.eval(), meta, folder / "model.pt", [], ec, device)
        report.write_json(folder / "eval.json", res)
        print(
            f"{folder.name}: evaluated in {time.perf_counter() - t0:.0f} s on {device}",
            file=sys.stderr,
        )


def merge(src: Path, out: Path) -> None:
    """metrics.json, summary.json, report.md and plots from the ``eval.json`` of each finished model
    (a run cut short, or models evaluated after their device call)."""
    evals = sorted(src.glob("*/eval.json"))
    if not evals:
        raise SystemExit(f"no */eval.json under {src}")
    results = {}
    for f in evals:
        r = json.loads(f.read_text())
        r.pop("wall", None)
        results[f.parent.name] = r
    train = next(iter(results.values()))["train"]
    train_len = max([train["seq_len"]] + [n for _, n in train["seq_schedule"]])
    ec = pipeline.study_eval(pipeline.STUDY_PRESETS["recall"])
    _, provenance = pipeline.held_out_data(None, ec)
    ec = dataclasses.replace(
        ec, binding_num=next(iter(results.values()))["binding"]["one"]["1"][0]["n"]
    )
    pipeline.write_results(results, [], provenance, out, ec, "merged", train_len)
    print(f"report: {out / 'report.md'} ({len(results)} models)")


if __name__ == "__main__":
    main()
