"""Run reports: metrics JSON, a markdown summary and PNG plots."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from . import long_report, recall_report  # noqa: E402


def git_commit(path: Path | None = None) -> str:
    """Short commit of the source tree (``+dirty`` when it has uncommitted changes)."""
    cwd = path or Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
        )
    except OSError:
        return "unknown"
    if head.returncode:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def line_plot(
    series: dict[str, tuple[list, list]],
    path: Path,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = False,
    logy: bool = False,
    marks: dict[str, int] | None = None,
    marker: str = "o",
) -> None:
    """One line per name (x, y); ``marks`` draws labelled vertical lines."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, (x, y) in series.items():
        ax.plot(x, y, marker=marker, label=name)
    for (label, x), style in zip((marks or {}).items(), ("--", ":", "-.")):
        ax.axvline(x, color="grey", ls=style, lw=1, label=f"{label} ({x})")
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_loss_by_position(
    models: dict[str, list[dict]], path: Path, marks: dict[str, int] | None = None
) -> None:
    """Perplexity per position bucket, one line per model (log-scale x)."""
    line_plot(
        {
            n: ([(r["lo"] + r["hi"]) / 2 for r in rows], [r["ppl"] for r in rows])
            for n, rows in models.items()
        },
        path,
        "position in the held-out stream (tokens, bucket centre)",
        "perplexity (lower is better)",
        "Held-out perplexity by position (streaming)",
        logx=True,
        marks=marks,
    )


def plot_state_bytes(models: dict[str, list[dict]], path: Path) -> None:
    """Streaming state bytes of one conversation vs tokens streamed (log-log)."""
    line_plot(
        {
            n: ([r["tokens"] for r in rows], [r["state_bytes"] for r in rows])
            for n, rows in models.items()
        },
        path,
        "tokens streamed",
        "state bytes per conversation",
        "Memory cost: flat lines stay constant for ever",
        logx=True,
        logy=True,
    )


def plot_train_loss(models: dict[str, list[dict]], path: Path) -> None:
    line_plot(
        {n: ([r["step"] for r in rows], [r["loss"] for r in rows]) for n, rows in models.items()},
        path,
        "training step",
        "training loss (nats per token, weighted)",
        "Training loss",
        marker="",
    )


def plot_recall(
    models: dict[str, dict[str, list[dict]]], path: Path, window: int | None = None
) -> None:
    """Exact-answer accuracy vs distance, one panel per task, one line per model, with the line of
    a model that knows only which values were stated (1/N; the bag line when every key is asked)."""
    tasks = sorted({t for per in models.values() for t in per})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        chance = []
        for name, per in models.items():
            rows = per.get(task, [])
            ax.plot(
                [r["distance"] for r in rows], [r["accuracy"] for r in rows], marker="o", label=name
            )
            chance += [r["chance"] for r in rows if "chance" in r]
        if chance:
            ax.axhline(
                float(np.mean(chance)), color="black", ls="--", lw=1.2, label="values only (chance)"
            )
        if window:
            ax.axvline(window, color="grey", ls="-.", lw=1, label="attention window")
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("distance from fact to question (tokens)")
        ax.set_ylabel("exact-answer accuracy")
        ax.set_title(task)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_plots(metrics: dict, out: Path, window: int | None, train_len: int | None) -> None:
    models = metrics["models"]
    marks = {"attention window": window} if window else {}
    if train_len:
        marks["training length"] = train_len
    if any(m["loss_by_position"] for m in models.values()):
        plot_loss_by_position(
            {n: m["loss_by_position"] for n, m in models.items()},
            out / "loss_by_position.png",
            marks,
        )
    plot_state_bytes(
        {n: m["cost"]["state_bytes"] for n, m in models.items()}, out / "state_bytes.png"
    )
    if any(m["train_log"] for m in models.values()):
        plot_train_loss(
            {n: m["train_log"] for n, m in models.items() if m["train_log"]}, out / "train_loss.png"
        )
    if any(m["recall"] for m in models.values()):
        plot_recall({n: m["recall"] for n, m in models.items()}, out / "recall.png", window)


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def cross_session_table(models: dict) -> list[str]:
    """Markdown lines: recall of facts told before a process restart (empty if not measured)."""
    names = [n for n in models if models[n].get("cross_session")]
    if not names:
        return []
    lines = [
        "",
        "## Cross-session recall",
        "",
        "Facts told in session 1; the state saved to a session store; a new process loads it and "
        "is asked in session 2. Exact-answer accuracy (answer-token accuracy in brackets); fresh: "
        "session 2 from an empty memory; identical: the resumed logits equal the one-process ones "
        "bit "
        "for bit.",
        "",
        "| memory | task | distance | n | one process | resumed (new process) | fresh memory | "
        "identical |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        for task, r in models[n]["cross_session"].items():
            lines.append(
                f"| {n} | {task} | {r['distance']} | {r['n']} | "
                + " | ".join(
                    f"{r[k]:.2f} ({r[k + '_token']:.2f})"
                    for k in ("one_process", "resumed", "fresh")
                )
                + f" | {r['identical_logits']} |"
            )
    return lines


VERDICT_MULTIPLE = 4  # "beyond the window": distances of at least this many windows


def _recall_rows(m: dict) -> list[tuple[str, dict]]:
    """(task, row) of a model's recall tasks and one-question binding rows, each row's chance the
    line it is read against (``recall_report.chance_line`` for binding)."""
    rows = [(task, r) for task, rs in m.get("recall", {}).items() for r in rs]
    for n, rs in m.get("binding", {}).get("one", {}).items():
        task = "one fact (binding N = 1)" if n == "1" else f"binding N = {n}"
        rows += [(task, {**r, "chance": recall_report.chance_line(int(n))}) for r in rs]
    return rows


def _beyond(m: dict, window: int) -> tuple[float, str, float, int] | None:
    """The best exact-answer accuracy of a model at distances >= VERDICT_MULTIPLE x ``window``
    (ties: the farthest): (accuracy, task, chance, distance), or None."""
    far = [
        (r["accuracy"], task, r.get("chance", 0.0), r["distance"])
        for task, r in _recall_rows(m)
        if r["distance"] >= VERDICT_MULTIPLE * window
    ]
    return max(far, key=lambda c: (c[0], c[3])) if far else None


def _last_ppl(m: dict) -> float | None:
    """Perplexity in the last position bucket (None without the corpus)."""
    return m["loss_by_position"][-1]["ppl"] if m["loss_by_position"] else None


def _provenance(m: dict) -> str:
    """How a model was trained: from which checkpoint, which of its parameters, with what."""
    init = m.get("init")
    start = (
        ""
        if not init
        else (
            f"started from `{init['checkpoint']}`"
            + (f" ({init['steps']} steps)" if init.get("steps") else "")
            + ", then "
        )
    )
    if m.get("trained_parameters") == 0:
        return (start.removesuffix(", then ") or "untrained") + (
            "; none of its parameters trains in this recipe, so it is that model"
        )
    n = m.get("trained_parameters")
    what = "" if n is None or not init else f"{n:,} of its parameters "
    return f"{start}{what}trained at commit `{m['commit_trained']}` with `{json.dumps(m['train'])}`"


def verdict(metrics: dict) -> list[str]:
    """Markdown lines: one row per memory (state bytes, best recall beyond the window, perplexity
    at the longest bucket) and one sentence on what the TTT cache recalls that the window does
    not. Empty without a plain window among the models."""
    models = metrics["models"]
    plain = [
        n
        for n, m in models.items()
        if m["config"]["memory"]["kind"] == "window" and not m["config"].get("inplace_ttt")
    ]
    if not plain:
        return []
    wname = plain[0]
    window = metrics["eval"].get("window") or models[wname]["config"]["memory"]["window"]
    lines = [
        "",
        "## Verdict",
        "",
        f"Recall beyond the window: the best exact-answer accuracy at >= {VERDICT_MULTIPLE} x W "
        f"(W = {window} tokens) over the recall tasks, with the task, distance and chance line "
        "(binding N = 1, one fact: a guess among the 64 values; N >= 2: 1/N, a model that knows "
        "only which values were stated).",
        "",
        "| memory | state bytes | recall beyond the window | perplexity, last bucket |",
        "|---|---|---|---|",
    ]
    for n, m in models.items():
        sb = m["cost"]["state_bytes"][-1] if m["cost"]["state_bytes"] else None
        b = _beyond(m, window)
        rec = "-" if b is None else f"{b[0]:.2f} ({b[1]}, {b[3]} tokens, chance {b[2]:.2f})"
        size = (
            "-"
            if sb is None
            else (
                f"{sb['state_bytes']:,} at {sb['tokens']} tokens"
                + (", grows" if m["config"]["memory"]["kind"] == "full" else "")
            )
        )
        lines.append(f"| {n} | {size} | {rec} | {_fmt(_last_ppl(m), '.2f')} |")
    lines += _shared_start(models)
    caches = [n for n, m in models.items() if m["config"]["memory"]["kind"] == "ttt_cache"]
    if caches:
        lines += ["", _sentence(models, wname, caches, window)]
    return lines


def _shared_start(models: dict) -> list[str]:
    """A sentence when every model started from one checkpoint: its steps, the models that are
    that checkpoint (nothing trained) and the parameters the others trained on it."""
    from .recall_report import backbone

    bb = backbone({"models": models})
    if bb is None:
        return []
    steps = bb["steps"]
    same = [n for n, m in models.items() if m.get("trained_parameters") == 0]
    rest = [
        f"{n} {m['trained_parameters']:,}" for n, m in models.items() if m.get("trained_parameters")
    ]
    text = f"Every model starts from one backbone (`{bb['checkpoint']}`" + (
        f", trained {steps} steps)" if steps else ")"
    )
    if same:
        text += f"; {', '.join(same)} is that backbone, unchanged"
    if rest:
        text += f"; parameters trained on it: {', '.join(rest)}"
    return ["", text + "."]


def _sentence(models: dict, wname: str, caches: list[str], window: int) -> str:
    """What the best TTT cache recalls beyond the window against the window on the same task and
    distance, and its perplexity against the window's."""
    best = max(caches, key=lambda n: (_beyond(models[n], window) or (-1.0,))[0])
    b = _beyond(models[best], window)
    p, pw = _last_ppl(models[best]), _last_ppl(models[wname])
    tail = (
        ""
        if p is None or pw is None
        else (f" Its perplexity in the last bucket is {p:.2f} against the window's {pw:.2f}.")
    )
    if b is None:
        return f"**{best}** was not asked to recall beyond {VERDICT_MULTIPLE} x W.{tail}"
    task_w = next(
        (
            r["accuracy"]
            for t, r in _recall_rows(models[wname])
            if t == b[1] and r["distance"] == b[3]
        ),
        None,
    )
    if b[0] >= 0.8 and (task_w is None or task_w <= 0.2):
        return (
            f"**{best} recalls {b[1]} {b[3]} tokens back ({VERDICT_MULTIPLE}+ x W) with accuracy "
            f"{b[0]:.2f}, where the window scores {_fmt(task_w, '.2f')}** (chance "
            f"{b[2]:.2f}).{tail}"
        )
    return (
        f"**No memory here recalls beyond the window reliably**: the best TTT cache, {best}, "
        "scores "
        f"{b[0]:.2f} on {b[1]} at {b[3]} tokens (the window {_fmt(task_w, '.2f')}, chance "
        f"{b[2]:.2f}).{tail}"
    )


def markdown(metrics: dict, train_len: int | None = None) -> str:
    """The evaluation report: tables of every measurement, with the plots."""
    models, ev = metrics["models"], metrics["eval"]
    names = list(models)
    how = (
        f"{ev['docs']} streams of concatenated held-out documents, {ev['max_len']} tokens each"
        if ev["concat"]
        else f"the {ev['docs']} longest held-out documents, cut at {ev['max_len']} tokens"
    )
    data = (
        f"{how} from `{metrics['data']['dir']}`"
        if ev.get("perplexity", True)
        else "synthetic data only"
    )
    lines = [
        "# moshi-ttt evaluation",
        "",
        f"Commit `{metrics['commit']}`, seed {metrics['seed']}; {data}; streaming semantics "
        "throughout.",
    ]
    lines += verdict(metrics)
    if any(models[n]["loss_by_position"] for n in names):
        lines += [
            "",
            "## Perplexity by position",
            "",
            "![perplexity by position](loss_by_position.png)",
            "",
        ]
        buckets = [(r["lo"], r["hi"]) for r in models[names[0]]["loss_by_position"]]
        lines += [
            "| memory | " + " | ".join(f"{lo}-{hi}" for lo, hi in buckets) + " |",
            "|---|" + "---|" * len(buckets),
        ]
        lines += [
            f"| {n} | "
            + " | ".join(f"{r['ppl']:.2f}" for r in models[n]["loss_by_position"])
            + " |"
            for n in names
        ]
    if any("binding" in models[n] for n in names):
        lines += recall_report.markdown(metrics, train_len) or recall_report.binding_table(metrics)
    if any(models[n]["recall"] for n in names):
        lines += [
            "",
            "## Recall vs distance",
            "",
            "![recall](recall.png)",
            "",
            "Exact-answer accuracy (answer-token accuracy in brackets; the accuracy of a model "
            "that "
            "knows only which values were stated after the slash); distances in tokens.",
            "",
        ]
        for n in names:
            for task, rows in models[n]["recall"].items():
                lines.append(
                    f"- {n} / {task}: "
                    + ", ".join(
                        f"{r['distance']}: {r['accuracy']:.2f} ({r['token_accuracy']:.2f})"
                        + (f" / {r['chance']:.2f}" if "chance" in r else "")
                        for r in rows
                    )
                )
    diag = [n for n in names if "diagnostics" in models[n]]
    if diag:
        lines += [
            "",
            "## Memory diagnostics",
            "",
            "α: weight of the window in gated mixing (mean over layers and heads); mass: attention "
            "on the "
            "memory; cos: mean pairwise cosine similarity of virtual keys (below 0.8: distinct "
            "keys); inner loss: the "
            "compressor's loss on a block before -> after its update (first and last update); "
            "probe: "
            "accuracy of a linear probe predicting the just-evicted token id from the layer-0 "
            "memory "
            "read, against the majority-class rate on the same test samples.",
            "",
            "| memory | α | mass | cos | inner loss, first update | last update | states finite | "
            "probe (chance) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for n in diag:
            d = models[n]["diagnostics"]
            layers = [v for k, v in d.items() if k.startswith("layer")]
            alpha = float(np.mean([np.mean(v["alpha"]) for v in layers]))
            mass = float(np.mean([v["virtual_mass"] for v in layers]))
            cos = [v["virtual_key_cos"] for v in layers if "virtual_key_cos" in v]
            first = [v["inner_loss_first_update"] for v in layers if "inner_loss_first_update" in v]
            last = [v["inner_loss_last_update"] for v in layers if "inner_loss_last_update" in v]
            arrow = lambda xs: (
                f"{np.mean([x[0] for x in xs]):.3f} -> {np.mean([x[1] for x in xs]):.3f}"
                if xs
                else "-"
            )
            p = models[n]["probe"]
            lines.append(
                f"| {n} | {alpha:.2f} | {mass:.2f} | {_fmt(np.mean(cos) if cos else None, '.2f')} "
                "| "
                f"{arrow(first)} | {arrow(last)} | {d['state_finite']} | {p['accuracy']:.3f} "
                f"({p['chance']:.3f}) |"
            )
    lines += cross_session_table(models)
    lines += long_report.markdown(metrics)
    lines += [
        "",
        "## Cost",
        "",
        "![state bytes](state_bytes.png)",
        "",
        "| memory | parameters | state bytes after "
        + " / ".join(
            str(r["tokens"])
            for r in max((models[n]["cost"]["state_bytes"] for n in names), key=len)
        )
        + " tokens | ms/token (batch 1, eager) |",
        "|---|---|---|---|",
    ]
    for n in names:
        c, t = models[n]["cost"], metrics["timing"][n]
        lines.append(
            f"| {n} | {c['parameters']:,} | "
            + " / ".join(f"{r['state_bytes']:,}" for r in c["state_bytes"])
            + f" | {t['stream_ms_per_token']:.2f} ({t['device']}) |"
        )
    lines += ["", "## Models", ""]
    for n in names:
        m = models[n]
        mem = m["config"]["memory"]
        ttt = m["config"].get("inplace_ttt")
        lines.append(
            f"- **{n}**: memory `{mem['kind']}` window {mem['window']}"
            + (f", In-Place TTT layers {ttt['layers']} chunk {ttt['chunk_size']}" if ttt else "")
            + f"; dim {m['config']['dim']}, {m['config']['num_layers']} layers; "
            + _provenance(m)
            + f"; checkpoint `{m['checkpoint']}`"
        )
    return "\n".join(lines) + "\n"
