"""The main job's recipe (``moshi-ttt study --preset cpu``) across backbone seeds: does the TTT
cache learn to keep the fact whatever seed trains the backbone, and does a variant of the memory
stage make that robust? Every backbone and every (variant, seed) trains as its own process.

    python bench/cpu_recipe_sweep.py --device cuda --seeds 0 1 2 3 --out runs/sweep   # one GPU
    python bench/cpu_recipe_sweep.py --device cpu --seeds 0 --variants preset --steps 20 \\
        --backbone-steps 20 --out /tmp/sweep                                           # smoke run

Variants of the memory stage (``CPU_MEMORY_TRAIN`` with fields replaced):
    preset   the preset itself
    far      the fact always beyond the window after the near phase (distances 48 to 256)
    far-lr   ``far`` with the learning rate 2 x
    dense    ``far`` with three quarters of each batch on the fact
    dense-lr ``dense`` with the learning rate 2 x
    denser   ``far`` with seven eighths of each batch on the fact
    dense-aw96  ``dense`` with each answer weighing 96 instead of 48
    dense-900   ``dense`` trained 900 steps instead of 600
    dense-b12   ``dense`` with 12 rows of 512 tokens instead of 8 of 768 (the same tokens)
    dense-gate0 ``dense`` with the memory's gate starting half open (gate_init 0, not 3)
Writes ``sweep.json`` (per variant and seed: recall by distance, perplexity per bucket, the
backbone's) and ``sweep.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

FAR = (48, 64, 96, 128, 256)
VARIANTS = {
    "preset": {},
    "far": dict(task_distances=FAR),
    "far-lr": dict(task_distances=FAR, lr=2e-2),
    "dense": dict(task_distances=FAR, task_frac=0.75),
    "dense-lr": dict(task_distances=FAR, task_frac=0.75, lr=2e-2),
    "denser": dict(task_distances=FAR, task_frac=0.875),
    "dense-aw96": dict(task_distances=FAR, task_frac=0.75, answer_weight=96.0),
    "dense-900": dict(task_distances=FAR, task_frac=0.75, steps_factor=1.5),
    "dense-b12": dict(task_distances=FAR, task_frac=0.75, batch_size=12, seq_len=512),
    "dense-gate0": dict(task_distances=FAR, task_frac=0.75, memory=dict(gate_init=0.0)),
}


def _preset(seed: int, steps: int | None, backbone_steps: int | None):
    from moshi_ttt import pipeline

    sp = pipeline.STUDY_PRESETS["cpu"]
    bb = dataclasses.replace(sp.backbone.train, seed=seed)
    if backbone_steps:
        bb = pipeline.scale_steps(bb, backbone_steps)
    return dataclasses.replace(
        sp, backbone=dataclasses.replace(sp.backbone, train=bb, check_every=bb.total_steps())
    )


def train_backbone(seed: int, a) -> None:
    import torch

    from moshi_ttt import pipeline

    torch.set_num_threads(1)
    sp = _preset(seed, a.steps, a.backbone_steps)
    folder = a.out / f"backbone-{seed}"
    ckpt = pipeline.train_backbone(sp, folder, a.device, progress=False, data=a.data)
    model, meta = pipeline.load_checkpoint(ckpt, a.device)
    docs, _ = pipeline.held_out_data(a.data, pipeline.study_eval(sp))
    res = pipeline.model_results(model.eval(), meta, ckpt, docs, pipeline.study_eval(sp), a.device)
    (folder / "eval.json").write_text(json.dumps(summary(res)))


def train_memory(variant: str, seed: int, a) -> None:
    import torch

    from moshi_ttt import pipeline

    torch.set_num_threads(1)
    sp = _preset(seed, a.steps, a.backbone_steps)
    ((name, cfg, tcfg, _),) = pipeline.study_jobs(
        sp, a.data, a.out, a.steps, (sp.memories[-1],), seed=seed
    )
    over = dict(VARIANTS[variant])
    factor = over.pop("steps_factor", 1.0)
    if "memory" in over:  # fields of the memory's config
        cfg = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, **over.pop("memory")))
    if "seq_len" in over:  # the schedule's full-length rows at the new length
        over["seq_schedule"] = tuple(
            (st, over["seq_len"] if n == tcfg.seq_len else n) for st, n in tcfg.seq_schedule
        )
    tcfg = dataclasses.replace(tcfg, **over)
    if factor != 1.0:  # longer: the one memory stage with it, the schedule as it was
        steps = round(tcfg.steps * factor)
        tcfg = dataclasses.replace(
            tcfg,
            steps=steps,
            stages=tuple(dataclasses.replace(st, steps=steps) for st in tcfg.stages),
        )
    folder = a.out / f"{variant}-{seed}"
    res = pipeline.train_and_evaluate(
        name,
        cfg,
        tcfg,
        folder,
        a.data,
        pipeline.study_eval(sp),
        a.device,
        progress=False,
        init=a.out / f"backbone-{seed}" / "model.pt",
    )
    (folder / "summary.json").write_text(json.dumps(summary(res)))


def summary(res: dict) -> dict:
    return {
        "recall": {str(b["distance_w"]): b["accuracy"] for b in res["binding"]["one"]["1"]},
        "ppl": [round(b["ppl"], 3) for b in res["loss_by_position"]],
    }


def run_all(fn, jobs: list[tuple], a) -> None:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=fn, args=(*j, a)) for j in jobs]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    bad = [j for j, p in zip(jobs, procs) if p.exitcode]
    if bad:
        print(f"failed: {bad}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--data", type=Path, default=Path("data/corpus"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument(
        "--variants",
        nargs="+",
        default=["preset", "far", "far-lr", "dense"],
        choices=list(VARIANTS),
    )
    ap.add_argument("--steps", type=int, default=None, help="memory steps (default: the preset's)")
    ap.add_argument("--backbone-steps", type=int, default=None)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    run_all(train_backbone, [(s,) for s in a.seeds], a)
    t1 = time.time()
    run_all(train_memory, [(v, s) for v in a.variants for s in a.seeds], a)
    rows = {"backbone": {s: _read(a.out / f"backbone-{s}" / "eval.json") for s in a.seeds}}
    for v in a.variants:
        rows[v] = {s: _read(a.out / f"{v}-{s}" / "summary.json") for s in a.seeds}
    rows["wall_s"] = {"backbones": t1 - t0, "memories": time.time() - t1}
    (a.out / "sweep.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "| variant | seed | 2 x W | 4 x W | 16 x W | 64 x W | perplexity by bucket |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in ["backbone", *a.variants]:
        for s in a.seeds:
            r = rows[v][s]
            if r is None:
                lines.append(f"| {v} | {s} | failed | | | | |")
                continue
            rec = r["recall"]
            lines.append(
                f"| {v} | {s} | "
                + " | ".join(str(rec.get(d, "-")) for d in ("2.0", "4.0", "16.0", "64.0"))
                + " | "
                + " / ".join(f"{p:.2f}" for p in r["ppl"])
                + " |"
            )
    (a.out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _read(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


if __name__ == "__main__":
    main()
