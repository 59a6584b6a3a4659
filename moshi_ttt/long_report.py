"""The long-stream report: loss per length and fast-weight norms far past the training length,
every memory against the plain window (``EvalConfig.long_stream``, evaluation.long_stream)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _measured(metrics: dict) -> dict:
    return {n: m for n, m in metrics["models"].items() if m.get("long_stream")}


def _is_window(m: dict) -> bool:
    return m["config"]["memory"]["kind"] == "window" and not m["config"].get("inplace_ttt")


def summary(metrics: dict) -> dict:
    """{train_len, models: {name: {kind, inplace_ttt, loss_by_length, max_norm_by_length,
    norm_growth}}}; ``norm_growth``: the largest fast-weight norm at the last multiple over the
    same at the first (None without fast weights)."""
    models, train_len = {}, None
    for n, m in _measured(metrics).items():
        ls = m["long_stream"]
        train_len = ls["train_len"]
        top = {
            str(r["multiple"]): max((v for k, v in r.items() if "." in k), default=None)
            for r in ls["norms"]
        }
        first, last = top[str(ls["norms"][0]["multiple"])], top[str(ls["norms"][-1]["multiple"])]
        models[n] = {
            "kind": m["config"]["memory"]["kind"],
            "inplace_ttt": bool(m["config"].get("inplace_ttt")),
            "loss_by_length": ls["loss_by_length"],
            "max_norm_by_length": top,
            "norm_growth": last / first if first else None,
        }
    return {"train_len": train_len, "models": models}


def plot(metrics: dict, path: Path) -> None:
    """Loss per length bucket (left) and the largest fast-weight norm (right) against the
    multiple of the training length; plain windows dashed."""
    s = summary(metrics)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for n, m in s["models"].items():
        style = "--" if _is_window(metrics["models"][n]) else "-"
        xs = [int(k) for k in m["loss_by_length"]]
        (line,) = a.plot(xs, list(m["loss_by_length"].values()), style, marker="o", label=n)
        norms = [(int(k), v) for k, v in m["max_norm_by_length"].items() if v is not None]
        if norms:  # the same colour as the model's loss line
            b.plot(*zip(*norms), style, marker="o", label=n, color=line.get_color())
    a.set(
        xscale="log",
        xlabel=f"tokens streamed / training length ({s['train_len']})",
        ylabel="held-out loss in the bucket (nats/token)",
        title="Loss far past training",
    )
    b.set(
        xscale="log",
        xlabel=f"tokens streamed / training length ({s['train_len']})",
        ylabel="largest fast-weight norm (max over layers, heads)",
        title="Fast-weight norms: flat is stationary",
    )
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(metrics: dict) -> list[str]:
    """Report lines: loss per length, each memory against the plain window, and norm growth."""
    s = summary(metrics)
    if not s["models"]:
        return []
    names = list(s["models"])
    mults = list(next(iter(s["models"].values()))["loss_by_length"])
    windows = [n for n in names if _is_window(metrics["models"][n])]
    lines = [
        "",
        "## Long stream",
        "",
        f"One held-out stream (the test split joined) from an empty state to "
        f"{mults[-1]} x the training length ({s['train_len']} tokens). Loss of the "
        f"predictions in each bucket (m/2 L, m L]; largest fast-weight norm at m L over "
        f"the first bucket's.",
        "",
        "![long stream](long_stream.png)",
        "",
        "| memory | " + " | ".join(f"{m} x" for m in mults) + " | norm growth |",
        "|---|" + "---|" * (len(mults) + 1),
    ]
    for n in names:
        m = s["models"][n]
        g = "-" if m["norm_growth"] is None else f"{m['norm_growth']:.2f}"
        lines.append(
            f"| {n} | " + " | ".join(f"{v:.3f}" for v in m["loss_by_length"].values()) + f" | {g} |"
        )
    if windows:
        w = s["models"][windows[0]]["loss_by_length"]
        lines += [
            "",
            f"Against the plain window ({windows[0]}): buckets where a memory's loss is "
            "higher (worse).",
        ]
        for n in names:
            if n in windows:
                continue
            worse = [k for k, v in s["models"][n]["loss_by_length"].items() if v > w[k]]
            lines.append(f"- {n}: " + (", ".join(f"{k} x" for k in worse) if worse else "none"))
    return lines
