"""Recipe sweep for the recall study's positive control: does a model learn to bind keys to values
inside its window, and after how many steps? Every variant (a memory and ``TrainConfig`` fields
over the ``recall`` recipe) trains as its own process on the near phase only (facts inside the
window; the preset's key schedule and near row lengths unless FIELDS set them) for ``--budget``
seconds; every ``--every`` steps it scores binding with one question per
sample (N keys, d filler tokens, held-out seeds), against chance 1/N.

    python bench/recall_recipe.py --out runs/recipe --budget 240 \\
        --variant 'full' '{"batch_size": 128}' --variant 'full' '{"lr": 3e-3}'
    python bench/recall_recipe.py --out /tmp/r --budget 20 --device cpu \\
        --variant full '{"batch_size": 8}' --every 5          # a smoke test on CPU

Writes ``recipe.json`` (per variant: its fields, and step, seconds, loss and accuracy per check)
and ``recipe.png`` (binding accuracy against training step, chance drawn).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from moshi_ttt.config import ModelConfig, memory_variant
from moshi_ttt.data.binding import chance
from moshi_ttt.evaluation import binding_accuracy
from moshi_ttt.models.lm import StreamingLM
from moshi_ttt.trainer import Trainer
from moshi_ttt.training import TRAIN_PRESETS

CHECKS = ((4, 8), (8, 8))  # (N keys, distance d) scored at every check: inside W = 32


def train_variant(
    spec: str, fields: dict, budget: float, every: int, num: int, device: str, threads: int
) -> dict:
    """Near-phase training of one variant for ``budget`` seconds, binding checked every
    ``every`` steps. The schedule is stretched (``steps`` = 10^6) so that lr stays at its peak."""
    torch.set_num_threads(threads)
    given = dict(fields)  # reported as given (seed included)
    torch.manual_seed(int(fields.get("seed", 0)))
    fields = {k: v for k, v in fields.items() if k != "seed"}
    base = TRAIN_PRESETS["recall"]
    near = tuple(x for x in base.seq_schedule if x[0] < base.near_steps)  # the preset's near rows
    sched = tuple(map(tuple, fields.pop("seq_schedule", () if "seq_len" in fields else near)))
    seq = int(fields.pop("seq_len", base.seq_len))
    for k in ("binding_keys", "near_distances"):
        if k in fields:
            fields[k] = tuple(fields[k])
    tcfg = dataclasses.replace(
        base, steps=10**6, near_steps=10**6, seq_len=seq, seq_schedule=sched, **fields
    )
    _, cfg = memory_variant(ModelConfig.preset("recall"), spec, 32, 32, 16)
    model = StreamingLM(cfg)
    trainer = Trainer(model, tcfg, None, device=device, progress=False)
    t0, rows = time.perf_counter(), []
    while True:
        loss = trainer.train_step()
        elapsed = time.perf_counter() - t0
        if trainer.step % every == 0 or elapsed > budget:
            acc = {
                f"N{n}_d{d}": binding_accuracy(
                    model, n, [d], num, seed=7, device=device, progress=False
                )[0]["accuracy"]
                for n, d in CHECKS
            }
            model.train()
            rows.append({"step": trainer.step, "s": round(elapsed, 1), "loss": float(loss), **acc})
            print(f"{spec} {json.dumps(given)} {rows[-1]}", flush=True)
        if elapsed > budget:
            break
    return {
        "memory": spec,
        "fields": given,
        "batch_size": tcfg.batch_size,
        "lr": tcfg.lr,
        "seq_len": seq,
        "checks": rows,
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CHECKS), figsize=(6 * len(CHECKS), 4), squeeze=False)
    for ax, (n, d) in zip(axes[0], CHECKS):
        for i, r in enumerate(results):
            label = f"{i}: {r['memory']} {json.dumps(r['fields'])}"
            ax.plot(
                [c["step"] for c in r["checks"]],
                [c[f"N{n}_d{d}"] for c in r["checks"]],
                marker=".",
                label=label,
            )
        ax.axhline(chance(n), color="k", ls="--", lw=1, label=f"chance 1/{n}")
        ax.set(
            title=f"binding, N = {n}, d = {d} (inside the window)",
            xlabel="training step",
            ylabel="exact-answer accuracy",
            ylim=(0, 1.02),
        )
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--variant",
        nargs=2,
        action="append",
        metavar=("MEMORY", "FIELDS"),
        required=True,
        help="a memory spec and a JSON object of TrainConfig fields",
    )
    p.add_argument("--budget", type=float, default=240.0, help="training seconds per variant")
    p.add_argument("--every", type=int, default=250, help="steps between binding checks")
    p.add_argument("--num", type=int, default=128, help="held-out samples per check")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    variants = []
    for spec, fields in a.variant:
        f = json.loads(fields)
        if not isinstance(f, dict):
            raise SystemExit(f"FIELDS must be a JSON object, got {fields!r}")
        variants.append((spec, f))
    a.out.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(len(variants), mp_context=ctx) as pool:
        futures = [
            pool.submit(train_variant, s, f, a.budget, a.every, a.num, a.device, a.threads)
            for s, f in variants
        ]
        results = [f.result() for f in futures]
    (a.out / "recipe.json").write_text(
        json.dumps(
            {"device": a.device, "budget_s": a.budget, "checks": CHECKS, "variants": results},
            indent=1,
        )
    )
    plot(results, a.out / "recipe.png")
    print(f"wrote {a.out / 'recipe.json'} and {a.out / 'recipe.png'}")


if __name__ == "__main__":
    main()
