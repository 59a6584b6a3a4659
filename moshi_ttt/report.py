"""Run reports: metrics JSON, a markdown summary and PNG plots."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def git_commit(path: Path | None = None) -> str:
    """Short commit of the source tree (``+dirty`` when it has uncommitted changes)."""
    cwd = path or Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True)
    except OSError:
        return "unknown"
    if head.returncode:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def plot_loss_by_position(models: dict[str, list[dict]], path: Path, marks: dict[str, int] | None = None) -> None:
    """One line per model: bits/token per position bucket (log-scale x); ``marks`` draws labelled
    vertical lines (e.g. the attention window, the training length)."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, rows in models.items():
        mid = [(r["lo"] + r["hi"]) / 2 for r in rows]
        ax.plot(mid, [r["bits_per_token"] for r in rows], marker="o", label=name)
    for (label, x), style in zip((marks or {}).items(), ("--", ":", "-.")):
        ax.axvline(x, color="grey", ls=style, lw=1, label=f"{label} ({x})")
    ax.set_xscale("log")
    ax.set_xlabel("position in document (tokens, bucket centre)")
    ax.set_ylabel("loss (bits per token, lower is better)")
    ax.set_title("Held-out loss by position (streaming)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_train_loss(models: dict[str, list[dict]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, rows in models.items():
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (nats per token)")
    ax.set_title("Training loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_recall(models: dict[str, dict[str, list[dict]]], path: Path, window: int | None = None) -> None:
    """Accuracy vs distance, one panel per task, one line per model."""
    tasks = sorted({t for per in models.values() for t in per})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for name, per in models.items():
            rows = per.get(task, [])
            ax.plot([r["distance"] for r in rows], [r["token_accuracy"] for r in rows], marker="o", label=name)
        if window:
            ax.axvline(window, color="grey", ls="--", lw=1, label="attention window")
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("distance from fact to question (tokens)")
        ax.set_ylabel("answer-token accuracy")
        ax.set_title(task)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
