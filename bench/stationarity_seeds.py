"""The stationarity study over seeds: the long-stream results of several ``moshi-ttt study --preset
stationarity`` runs (any seeds, any memories), grouped by model and seed, each memory's mean loss
per length bucket against the mean of the plain window over the same seeds.

    python bench/stationarity_seeds.py runs/stationarity runs/stationarity-seed1 \\
        runs/stationarity-seed2 --out docs/results/stationarity

Writes ``summary.json`` ({train_len, window, seeds, models: {name: {kind, inplace_ttt,
settings, loss_by_length (mean over seeds), loss_by_seed, norm_growth_by_seed, above_window}}})
(settings: the TTT cache's decay, gate_init, forget_gate, gate_per_token and In-Place TTT's decay as
trained) and
``loss_over_seeds.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from moshi_ttt import long_report


def collect(runs: list[Path]) -> tuple[int, dict]:
    """(train_len, {name: {seed: long_report.summary entry}}) of every model of every run."""
    out, train_len = {}, None
    for run in runs:
        path = run / "metrics.json"
        if not path.is_file():
            raise SystemExit(f"no metrics.json in {run}")
        metrics = json.loads(path.read_text())
        summ = long_report.summary(metrics)
        if not summ["models"]:
            raise SystemExit(f"{run}: no model measured the long stream")
        if train_len not in (None, summ["train_len"]):
            raise SystemExit(f"{run}: training length {summ['train_len']}, the others {train_len}")
        train_len = summ["train_len"]
        for name, entry in summ["models"].items():
            seed = metrics["models"][name]["train"]["seed"]
            seen = out.setdefault(name, {}).get(seed)
            if seen is not None and seen["loss_by_length"] != entry["loss_by_length"]:
                raise SystemExit(f"{name} seed {seed} is in two runs with different results")
            cfg = metrics["models"][name]["config"]
            mem, ttt = cfg["memory"], cfg.get("inplace_ttt") or {}
            entry = {
                **entry,
                "settings": {
                    "decay": mem.get("decay"),
                    "gate_init": mem.get("gate_init"),
                    "forget_gate": mem.get("forget_gate", False),
                    "gate_per_token": mem.get("gate_per_token"),
                    "ttt_decay": ttt.get("decay", 0.0) if ttt else None,
                },
            }
            out[name][seed] = entry  # a model trained again in another run measures the same
    return train_len, out


def summarise(train_len: int, models: dict, window: str) -> dict:
    """Means over the seeds each memory shares with the window."""
    if window not in models:
        raise SystemExit(f"no {window} among the runs: {sorted(models)}")
    res = {"train_len": train_len, "window": window, "models": {}}
    for name, by_seed in models.items():
        seeds = sorted(s for s in by_seed if s in models[window])
        if not seeds:
            continue
        keys = sorted(by_seed[seeds[0]]["loss_by_length"], key=int)
        mean = {k: statistics.mean(by_seed[s]["loss_by_length"][k] for s in seeds) for k in keys}
        ref = {
            k: statistics.mean(models[window][s]["loss_by_length"][k] for s in seeds) for k in keys
        }
        first = by_seed[seeds[0]]
        res["models"][name] = {
            "kind": first["kind"],
            "inplace_ttt": first["inplace_ttt"],
            "settings": first["settings"],
            "seeds": seeds,
            "loss_by_length": mean,
            "window_loss_by_length": ref,
            "above_window": {k: mean[k] - ref[k] for k in keys if mean[k] > ref[k]},
            "loss_by_seed": {str(s): by_seed[s]["loss_by_length"] for s in seeds},
            "norm_growth_by_seed": {str(s): by_seed[s]["norm_growth"] for s in seeds},
        }
    return res


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (name, m) in enumerate(res["models"].items()):
        keys = sorted(m["loss_by_length"], key=int)
        x = [int(k) for k in keys]
        color = f"C{i}"
        ax.plot(
            x,
            [m["loss_by_length"][k] for k in keys],
            marker="o",
            color=color,
            lw=2.5 if name == res["window"] else 1.5,
            label=f"{name} (mean of seeds {', '.join(map(str, m['seeds']))})",
        )
        for seed_loss in m["loss_by_seed"].values():
            ax.plot(x, [seed_loss[k] for k in keys], color=color, alpha=0.2, lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"multiple of the training length ({res['train_len']} tokens)")
    ax.set_ylabel("held-out loss in the bucket (nats/token)")
    ax.set_title("One held-out stream per model: mean over seeds (thick), each seed (faint)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--window", default="window-32", help="the plain window's run name")
    p.add_argument(
        "--only", nargs="*", default=None, help="report only these models (and the window)"
    )
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    train_len, models = collect(a.runs)
    if a.only is not None:
        missing = sorted(set(a.only) - set(models))
        if missing:
            raise SystemExit(f"not among the runs: {missing}")
        models = {n: m for n, m in models.items() if n in a.only or n == a.window}
    res = summarise(train_len, models, a.window)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "summary.json").write_text(json.dumps(res, indent=1) + "\n")
    plot(res, a.out / "loss_over_seeds.png")
    for name, m in res["models"].items():
        worse = ", ".join(f"{k} x: +{v:.3f}" for k, v in m["above_window"].items()) or "none"
        print(f"{name} (seeds {m['seeds']}): above the window at {worse}")


if __name__ == "__main__":
    main()
