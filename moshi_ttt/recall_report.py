"""The binding part of a report: controls, the main table, ``summary.json`` and the plots
(accuracy vs distance per number of keys, capacity, the memory/recall frontier), each recall plot
with its chance line 1/N (and the bag line H_N/N for every key asked in turn)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .data.binding import VALUES, bag_line  # noqa: E402

MAIN_KEYS = 4  # N of the main table and the targets
FRONTIER_W = 16.0  # distance (x W) of the capacity and frontier plots
MARGIN = 0.05  # the window control: at most chance + MARGIN beyond the window
FULL_MIN = 0.95  # the full-attention control: at least this within its training length
FORMED_MIN = 0.9  # binding formed: at least this where the facts are inside the window (< 1 x W)


def _rows(m: dict, n: int, variant: str = "one") -> list[dict]:
    return m.get("binding", {}).get(variant, {}).get(str(n), [])


def _at(rows: list[dict], w: float) -> float | None:
    return next((r["accuracy"] for r in rows if abs(r["distance_w"] - w) < 1e-9), None)


def state_bytes(m: dict, tokens: int) -> int:
    """State bytes of one conversation after ``tokens`` tokens (constant memories: their size;
    a growing one interpolated linearly between its measured lengths)."""
    pts = sorted((r["tokens"], r["state_bytes"]) for r in m["cost"]["state_bytes"])
    xs, ys = zip(*pts)
    return int(ys[0]) if len(set(ys)) == 1 else int(np.interp(tokens, xs, ys))


def sample_tokens(n: int, distance: int) -> int:
    """Tokens of a binding sample with ``n`` keys, ``distance`` filler and one question."""
    return 2 * n + 2 + distance + 1 + 2


def study_window(metrics: dict) -> int:
    """The W of the distances (x W): the evaluation's, else the first model's window."""
    w = metrics.get("eval", {}).get("window")
    return int(w) if w else next(iter(metrics["models"].values()))["config"]["memory"]["window"]


def controls(metrics: dict, train_len: int | None) -> dict:
    """The positive control (``full`` >= 95% binding at N = 4 wherever the sample fits its training
    length) and the negative one (``window`` at most chance + 5% at N = 4 beyond its reach: L
    layers of a W-token window relay a token L x W back, so from L x W on)."""
    models, out = metrics["models"], {}
    window = study_window(metrics)
    for name, m in models.items():
        mem = m["config"]["memory"]
        rows = _rows(m, MAIN_KEYS)
        if not rows or m["config"].get("inplace_ttt"):
            continue
        if mem["kind"] == "full" and train_len:
            inside = [r for r in rows if sample_tokens(MAIN_KEYS, r["distance"]) <= train_len]
            acc = min(r["accuracy"] for r in inside) if inside else None
            out["full"] = {
                "model": name,
                "min_binding_within_training": acc,
                "passed": acc is not None and acc >= FULL_MIN,
            }
        if mem["kind"] == "window" and mem["window"] == window:
            # L layers of a W-token window relay a token up to L x W back: the control starts there
            reach = m["config"]["num_layers"]
            beyond = [r["accuracy"] for r in rows if r["distance_w"] >= reach]
            worst = max(beyond) if beyond else None
            out["window"] = {
                "model": name,
                "max_binding_beyond_window": worst,
                "chance": 1 / MAIN_KEYS,
                "from_w": reach,
                "passed": worst is not None and worst <= 1 / MAIN_KEYS + MARGIN,
            }
    out["passed"] = all(out.get(k, {}).get("passed", False) for k in ("full", "window"))
    out["not_formed"] = not_formed(metrics)
    return out


def not_formed(metrics: dict) -> dict[str, float]:
    """Models that did not learn to bind where the facts are still inside the window: their best
    binding (N = 4) where the filler is shorter than its own window, under ``FORMED_MIN``. Their
    scores beyond the window say nothing about their memory."""
    out = {}
    for name, m in metrics["models"].items():
        own = m["config"]["memory"]["window"]
        inside = [r["accuracy"] for r in _rows(m, MAIN_KEYS) if r["distance"] < own]
        if inside and max(inside) < FORMED_MIN:
            out[name] = max(inside)
    return out


def summary(metrics: dict, train_len: int | None) -> dict:
    """``summary.json``: the window, the training length over it, N of the main table, its chance,
    and per model its kind, state bytes at 16 x W and binding per distance (x W); the controls."""
    models = metrics["models"]
    window = study_window(metrics)
    tokens = sample_tokens(MAIN_KEYS, int(FRONTIER_W * window))
    out = {
        "window": window,
        "train_length_over_window": train_len / window if train_len else None,
        "binding_keys": MAIN_KEYS,
        "chance": 1 / MAIN_KEYS,
        "controls": controls(metrics, train_len),
        "backbone": backbone(metrics),
        "models": {},
    }
    for name, m in models.items():
        if not _rows(m, MAIN_KEYS):
            continue
        per_n = {n: _at(_rows(m, int(n)), FRONTIER_W) for n in m["binding"]["one"]}
        out["models"][name] = {
            "kind": m["config"]["memory"]["kind"],
            "inplace_ttt": bool(m["config"].get("inplace_ttt")),
            "state_bytes": state_bytes(m, tokens),
            "binding": {f"{r['distance_w']:g}": r["accuracy"] for r in _rows(m, MAIN_KEYS)},
            "capacity_at_16w": per_n,
            "all_questions": {
                f"{r['distance_w']:g}": r["accuracy"] for r in _rows(m, MAIN_KEYS, "all")
            },
        }
    return out


def backbone(metrics: dict) -> dict | None:
    """The backbone every model started from (steps, whether binding formed, the last check), or
    None when the models trained from scratch or from different checkpoints."""
    inits = [m.get("init") for m in metrics["models"].values()]
    if not inits or any(i is None for i in inits) or len({i["checkpoint"] for i in inits}) != 1:
        return None
    i = inits[0]
    return {
        "checkpoint": i["checkpoint"],
        "steps": i.get("steps"),
        "formed": i.get("formed"),
        "last_check": (i.get("checks") or [None])[-1],
    }


def _colors(names):
    cmap = plt.get_cmap("tab20")
    return {n: cmap(i % 20) for i, n in enumerate(names)}


def chance_line(n: int) -> float:
    """The line a binding score of N facts is read against: 1/N, a model that knows only which
    values were stated; for one fact, where knowing the value is the task, a guess among them."""
    return 1 / len(VALUES) if n == 1 else 1 / n


def plot_binding(metrics: dict, path: Path, variant: str, train_len: int | None) -> None:
    """Accuracy vs distance (x W), one panel per N, one line per model; chance 1/N (and, for every
    key asked in turn, the bag line H_N/N); the window and the training length marked."""
    models = metrics["models"]
    keys = sorted({int(n) for m in models.values() for n in m.get("binding", {}).get(variant, {})})
    if not keys:
        return
    window = study_window(metrics)
    colors = _colors(list(models))
    cols = min(3, len(keys))
    nrows = -(-len(keys) // cols)
    fig, axes = plt.subplots(
        nrows, cols, figsize=(max(8.0, 5.2 * cols), 3.9 * nrows + 0.6 * (cols == 1)), squeeze=False
    )
    for ax, n in zip(axes.flat, keys):
        for name, m in models.items():
            rows = _rows(m, n, variant)
            if rows:
                ax.plot(
                    [r["distance_w"] for r in rows],
                    [r["accuracy"] for r in rows],
                    marker="o",
                    ms=3,
                    color=colors[name],
                    label=name,
                )
        ax.axhline(
            chance_line(n),
            color="black",
            ls="--",
            lw=1.2,
            label=f"chance (N = 1: a guess, 1/{len(VALUES)}; N >= 2: 1/N, values only)",
        )
        if variant == "all" and n > 1:
            ax.axhline(bag_line(n), color="black", ls=":", lw=1.2, label="bag H_N/N (values only)")
        ax.axvline(1, color="grey", ls="-.", lw=1, label=f"window ({window} tokens)")
        if train_len:
            ax.axvline(
                train_len / window,
                color="grey",
                ls=":",
                lw=1,
                label=f"training length ({train_len})",
            )
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"N = {n} keys")
        ax.set_xlabel("filler between facts and question (x window)")
        ax.set_ylabel("exact-answer accuracy")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    ncol = 2 if cols == 1 else 4
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=7)
    what = "one question per sample (binding)" if variant == "one" else "every key asked in turn"
    fig.suptitle(f"Key-value recall, {what}")
    legend_rows = -(-len(labels) // ncol)
    fig.tight_layout(rect=(0, 0.04 + 0.035 * legend_rows / nrows, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_capacity(metrics: dict, path: Path) -> None:
    """Binding at 16 x W against the number of keys: how many facts the state holds."""
    models = metrics["models"]
    colors = _colors(list(models))
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    keys = []
    for name, m in models.items():
        per = sorted(
            (int(n), _at(rows, FRONTIER_W))
            for n, rows in m.get("binding", {}).get("one", {}).items()
        )
        per = [(n, a) for n, a in per if a is not None]
        if per:
            keys = sorted(set(keys) | {n for n, _ in per})
            ax.plot(*zip(*per), marker="o", ms=3, color=colors[name], label=name)
    if keys:
        ax.plot(keys, [1 / n for n in keys], color="black", ls="--", lw=1.2, label="chance 1/N")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7, ncol=2)
    else:
        ax.text(
            0.5,
            0.5,
            f"binding was not measured at {FRONTIER_W:g} x window",
            ha="center",
            transform=ax.transAxes,
        )
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("keys stated (N)")
    ax.set_ylabel(f"binding accuracy at {FRONTIER_W:g} x window")
    ax.set_title("Capacity: facts recalled after they left the window")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_frontier(summ: dict, path: Path) -> None:
    """Binding (N = 4) at 16 x W against state bytes per sequence: one point per model."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    group = lambda m: m["kind"] + (" + In-Place TTT" if m.get("inplace_ttt") else "")
    kinds = sorted({group(m) for m in summ["models"].values()})
    marks = dict(zip(kinds, "osD^v<>p*h"))
    cmap = plt.get_cmap("tab10")
    for i, kind in enumerate(kinds):
        pts = [
            (m["state_bytes"], m["binding"].get(f"{FRONTIER_W:g}"), n)
            for n, m in summ["models"].items()
            if group(m) == kind and m["binding"].get(f"{FRONTIER_W:g}") is not None
        ]
        if not pts:
            continue
        ax.scatter(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker=marks[kind],
            color=cmap(i),
            label=kind,
            s=40,
        )
        for x, y, n in pts:
            ax.annotate(n, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.axhline(
        summ["chance"],
        color="black",
        ls="--",
        lw=1.2,
        label=f"chance 1/N (N = {summ['binding_keys']})",
    )
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel(f"state bytes per sequence (at {FRONTIER_W:g} x window)")
    ax.set_ylabel(f"binding at {FRONTIER_W:g} x window, N = {summ['binding_keys']}")
    ax.set_title("Memory/recall frontier (up and left is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(metrics: dict, out: Path, train_len: int | None) -> None:
    """binding.png and, with every key asked, binding_all_questions.png; with the main table's N
    measured, capacity.png and frontier.png."""
    plot_binding(metrics, out / "binding.png", "one", train_len)
    if any(m.get("binding", {}).get("all") for m in metrics["models"].values()):
        plot_binding(metrics, out / "binding_all_questions.png", "all", train_len)
    summ = summary(metrics, train_len)
    if summ["models"]:
        plot_capacity(metrics, out / "capacity.png")
        plot_frontier(summ, out / "frontier.png")


def binding_table(metrics: dict) -> list[str]:
    """Report lines for runs without the main table's N: exact-answer accuracy per N and distance
    (x W), with the line of each N (N = 1: a guess among the values; else 1/N)."""
    models = {n: m for n, m in metrics["models"].items() if m.get("binding", {}).get("one")}
    if not models:
        return []
    keys = sorted({int(k) for m in models.values() for k in m["binding"]["one"]})
    dists = [r["distance_w"] for r in _rows(next(iter(models.values())), keys[0])]
    lines = [
        "",
        "## Recall beyond the window",
        "",
        "![binding](binding.png)",
        "",
        "Exact-answer accuracy, one question per sample; distances are the filler between the "
        "facts "
        f"and the question, in multiples of the window (W = {study_window(metrics)} tokens).",
        "",
        "| memory | N (line) | " + " | ".join(f"{d:g} x W" for d in dists) + " |",
        "|---|---|" + "---|" * len(dists),
    ]
    for n in keys:
        line = chance_line(n)
        for name, m in models.items():
            rows = _rows(m, n)
            cells = " | ".join(f"{r['accuracy']:.2f}" for r in rows)
            lines.append(f"| {name} | {n} ({line:.2f}) | {cells} |")
    return lines


def markdown(metrics: dict, train_len: int | None) -> list[str]:
    """Report lines: the controls' verdict, the binding table (N = 4), capacity at 16 x W, the
    plots."""
    summ = summary(metrics, train_len)
    if not summ["models"]:
        return []
    c = summ["controls"]
    full, win = c.get("full", {}), c.get("window", {})
    verdict = (
        "Controls hold: conclusions below are supported."
        if c["passed"]
        else "**Controls failed: no conclusion is drawn from this run** (the recipe or budget is "
        "too weak)."
    )
    if c["not_formed"]:
        names = ", ".join(f"`{n}` ({a:.2f})" for n, a in c["not_formed"].items())
        verdict = ("Controls hold, but " if c["passed"] else verdict + " Also, ") + (
            f"**binding did not form inside the window** (N = {MAIN_KEYS}: best with the facts "
            f"inside its window under {FORMED_MIN:.0%}) in {names}: this run says nothing about "
            "those memories."
        )
    bb = summ["backbone"]
    if bb and bb.get("last_check"):
        chk = bb["last_check"]
        start = f" Every model starts from one backbone, trained {bb['steps']} steps"
        verdict += (
            f"{start} until it bound {chk['binding']:.2f} inside the window."
            if bb["formed"]
            else f"{start}, which **did not learn to bind** ({chk['binding']:.2f} inside the "
            "window)."
        )
    dists = list(next(iter(summ["models"].values()))["binding"])
    keys = sorted({int(n) for m in summ["models"].values() for n in m["capacity_at_16w"]})
    lines = [
        "",
        "## Key-value binding",
        "",
        verdict,
        "",
        f"- positive control: `full` binds at least {FULL_MIN:.0%} (N = {MAIN_KEYS}) wherever the "
        "sample "
        f"fits its training length: min {_pct(full.get('min_binding_within_training'))} "
        f"({'passed' if full.get('passed') else 'FAILED'})",
        f"- negative control: `window` at most chance + {MARGIN:.0%} = "
        f"{1 / MAIN_KEYS + MARGIN:.2f} from "
        f"{win.get('from_w', 1)} x W on (its layers relay tokens that far): max "
        f"{_pct(win.get('max_binding_beyond_window'))} "
        f"({'passed' if win.get('passed') else 'FAILED'})",
        "",
        f"Exact-answer accuracy with one question per sample, N = {MAIN_KEYS} keys (chance 1/N = "
        f"{1 / MAIN_KEYS:.2f}), by filler between the facts and the question (x window):",
        "",
        "| memory | state bytes | " + " | ".join(f"{d} W" for d in dists) + " |",
        "|---|---|" + "---|" * len(dists),
    ]
    for name, m in summ["models"].items():
        lines.append(
            f"| {name} | {m['state_bytes']:,} | "
            + " | ".join(_pct(m["binding"][d]) for d in dists)
            + " |"
        )
    lines += [
        "",
        f"Capacity: binding at {FRONTIER_W:g} x W by number of keys N (chance 1/N):",
        "",
        "| memory | " + " | ".join(f"N={n}" for n in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for name, m in summ["models"].items():
        lines.append(
            f"| {name} | " + " | ".join(_pct(m["capacity_at_16w"].get(str(n))) for n in keys) + " |"
        )
    lines += [
        "",
        "![binding](binding.png)",
        "",
        "![capacity](capacity.png)",
        "",
        "![frontier](frontier.png)",
        "",
        "Every key asked in turn (a model that knows only the values scores the bag line H_N/N):",
        "",
        "![all questions](binding_all_questions.png)",
    ]
    return lines


def _pct(x) -> str:
    return "-" if x is None else f"{x:.2f}"
