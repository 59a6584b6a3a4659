"""Moshi 7B benchmark (random weights, bf16, LMGen with its CUDA graphs): stock vs patched.

    python bench/moshi_bench.py --out docs/results/moshi-7b-h100            # one H100, ~6 minutes
    python bench/moshi_bench.py --tiny --device cpu --out /tmp/moshi-tiny    # seconds

Per variant (an ``AdapterConfig`` preset; ``off`` is stock Moshi; ``window64`` is stock Moshi with
its own ring cache cut to 64 steps in every layer of the main transformer, the fair baseline of
the presets, whose memories keep a 64-step window):
- batch 1: ms per frame (one ``LMGen.step``: main transformer + depformer + sampling; the mean
  of the timed frames and the slowest, each timed by CUDA events around it) and the
  streaming state per conversation after 1k, 3k, 10k and 20k steps. The state is advanced between
  checkpoints by multi-step ``forward_text`` calls (eager), then timed with graph replays. The
  weights are random, so only positions and buffer fill matter; Moshi's own ring is exact for
  one step a call only, so its content after a multi-step call is approximate (not its cost).
- the most concurrent conversations under ``--threshold-ms`` per frame: batch doubled until too
  slow or out of memory, then bisected to ``--resolution``. Every step has static shapes (a CUDA
  graph), but the work inside a kernel can depend on the state: a TTT-cache row evicts a token
  every step once its window is full and updates its compressor once per block. So each batch
  streams ``--fill`` steps before it is timed (past the 64-step window), its rows staggered over
  the first ``--stagger`` of them (row r skips r mod stagger steps through Moshi's exec mask), so
  that the rows' blocks complete on different steps, as conversations that started at different
  times do.
Every variant's batch-1 series runs before the searches; ``--latency-rounds N`` repeats it N
times with the variants in turn (rounds after the first at the first checkpoint only), and the
latency ratios also take each variant's median there.
Writes results.json, results.md and results.png under ``--out``.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import argparse
import contextlib
import dataclasses
import gc
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from moshi.models.lm import LMGen, LMModel
from moshi.models.loaders import _lm_kwargs

from moshi_ttt.moshi import AdapterConfig, patch_lm, unpatch_lm
from moshi_ttt.moshi.config import tiny_lm_kwargs
from moshi_ttt.moshi.streaming import state_nbytes
from moshi_ttt.ops.impl import implementation

TINY_LM = tiny_lm_kwargs()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def allocated(device) -> int:
    return torch.cuda.memory_allocated() if device.type == "cuda" else 0


def user_tokens(lm: LMModel, B: int, device) -> torch.Tensor:
    """Random user audio for one step: [B, n_q - dep_q, 1]."""
    return torch.randint(0, lm.card, (B, lm.n_q - lm.dep_q, 1), device=device)


def frame_times(gen: LMGen, lm: LMModel, B: int, n: int, device) -> list[float]:
    """ms of each of n LMGen steps: CUDA events around every step, read after the last (the steps
    run back to back, as in streaming), or the wall clock per step off CUDA."""
    inputs = [user_tokens(lm, B, device) for _ in range(n)]
    sync(device)
    if device.type != "cuda":
        out = []
        for x in inputs:
            t0 = time.perf_counter()
            gen.step(x)
            out.append((time.perf_counter() - t0) * 1000)
        return out
    events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
    events[0].record()
    for x, e in zip(inputs, events[1:]):
        gen.step(x)
        e.record()
    sync(device)
    return [a.elapsed_time(b) for a, b in zip(events, events[1:])]


def frame_stats(times: list[float]) -> dict:
    """The mean and the slowest of a run's frame times (ms)."""
    return {"ms_per_frame": sum(times) / len(times), "ms_per_frame_max": max(times)}


def time_steps(gen: LMGen, lm: LMModel, B: int, n: int, device) -> float:
    """Mean ms per LMGen step over n steps."""
    return sum(frame_times(gen, lm, B, n, device)) / max(n, 1)


@torch.no_grad()
def fast_forward(lm: LMModel, B: int, steps: int, chunk: int, device) -> None:
    """Advance the streaming state by ``steps`` with ``forward_text`` calls of up to ``chunk``
    steps."""
    while steps > 0:
        t = min(chunk, steps)
        codes = torch.randint(0, lm.card, (B, lm.num_codebooks, t), device=device)
        codes[:, 0] = torch.randint(0, lm.text_card, (B, t), device=device)
        lm.forward_text(codes)
        steps -= t


def batch1_series(lm: LMModel, args, device, checkpoints: list[int]) -> list[dict]:
    """Batch 1 from a fresh LMGen: ms per frame (``args.frames`` frames) and state after each of
    ``checkpoints`` steps, fast-forwarding between them."""
    gen = LMGen(lm, use_sampling=True)
    base = allocated(device)
    rows, done = [], 0
    with gen.streaming(1):
        time_steps(gen, lm, 1, args.warmup, device)  # first step eager, second captures the graphs
        done += args.warmup
        for n in checkpoints:
            fast_forward(lm, 1, n - done, args.ff_chunk, device)
            times = frame_times(gen, lm, 1, args.frames, device)
            done = n + args.frames
            rows.append(
                {
                    "steps": n,
                    **frame_stats(times),
                    "state_bytes": state_nbytes(lm),
                    "allocated_bytes": allocated(device) - base,
                }
            )
    return rows


def stagger_rows(gen: LMGen, lm: LMModel, B: int, n: int, device) -> None:
    """n steps in which row r sits out its first r mod n (Moshi's exec mask): afterwards row r has
    streamed n - r mod n steps. The mask is all on again at the end."""
    rows = torch.arange(B, device=device) % n
    for j in range(n):
        gen.set_exec_mask(rows <= j)
        gen.step(user_tokens(lm, B, device))
    gen.set_exec_mask(torch.ones(B, dtype=torch.bool, device=device))


def reach_steady(gen: LMGen, lm: LMModel, B: int, fill: int, stagger: int, device) -> None:
    """Stream ``fill`` steps, the rows starting over the first ``stagger`` (``stagger_rows``):
    every row past a window shorter than ``fill - stagger``, its blocks completing on other
    steps than its neighbours'."""
    stagger_rows(gen, lm, B, stagger, device)
    time_steps(gen, lm, B, fill - stagger, device)


def is_oom(e: Exception) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e)


def measure(lm: LMModel, B: int, args, device) -> dict:
    """ms per frame at batch B (fresh states, graphs captured), or OOM; ``peak_bytes``: the most
    memory the run added (states, graph pools, the eager warm-up step's activations)."""
    gen = None
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        base = allocated(device)
        gen = LMGen(lm, use_sampling=True)
        with gen.streaming(B):
            reach_steady(gen, lm, B, args.fill, args.stagger, device)
            times = frame_times(gen, lm, B, args.frames, device)
            state, alloc = state_nbytes(lm), allocated(device) - base
        peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else 0
        return {
            "batch": B,
            **frame_stats(times),
            "state_bytes": state,
            "allocated_bytes": alloc,
            "peak_bytes": peak,
        }
    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
        if not is_oom(e):
            raise
        return {"batch": B, "oom": True}
    finally:
        del gen
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def fits(goods: list[dict], B: int, free_bytes: float) -> bool:
    """Whether batch B should fit: the peak memory of the last two good runs, extended as a line in
    the batch (one run: proportional). An OOM inside CUDA-graph capture can leave the device
    unusable, so predicted OOMs are not tried."""
    pts = [(g["batch"], g["peak_bytes"]) for g in goods if g.get("peak_bytes")][-2:]
    if not pts:
        return True
    if len(pts) == 1:
        return pts[0][1] * B / pts[0][0] <= free_bytes
    (b1, p1), (b2, p2) = pts
    return p2 + (p2 - p1) / (b2 - b1) * (B - b2) <= free_bytes


def concurrency(lm: LMModel, args, device, deadline: float, measure=measure) -> dict:
    """Largest batch with ms per frame <= threshold: doubling, then bisection until the first
    failing batch is within ``args.resolution`` of it (at least one batch)."""
    free = (
        torch.cuda.get_device_properties(device).total_memory * 0.92 - allocated(device)
        if device.type == "cuda"
        else float("inf")
    )
    tried, ok, bad = [], None, None

    def attempt(B):
        goods = sorted((t for t in tried if not t.get("oom")), key=lambda t: t["batch"])
        r = (
            measure(lm, B, args, device)
            if fits(goods, B, free)
            else {"batch": B, "oom": True, "predicted": True}
        )
        tried.append(r)
        return not r.get("oom") and r["ms_per_frame"] <= args.threshold_ms, r

    B, cut = 1, False
    while B <= args.max_batch:
        if time.monotonic() > deadline:
            cut = True
            break
        good, r = attempt(B)
        if not good:
            bad = B
            break
        ok, B = r, 2 * B
    while (
        ok is not None
        and bad is not None
        and bad - ok["batch"] > max(1, int(ok["batch"] * args.resolution))
    ):
        if time.monotonic() > deadline:
            cut = True
            break
        good, r = attempt((ok["batch"] + bad) // 2)
        if good:
            ok = r
        else:
            bad = r["batch"]
    fail = next((t for t in tried if t["batch"] == bad), None)
    reason = (
        "time budget"
        if cut
        else "max batch"
        if bad is None
        else "out of memory"
        if fail and fail.get("oom")
        else f"> {args.threshold_ms} ms"
    )
    return {
        "max_concurrent": ok["batch"] if ok else 0,
        "at_max": ok,
        "first_failing": bad,
        "stopped_by": reason,
        "tried": tried,
    }


def variant_config(name: str, num_layers: int) -> tuple[AdapterConfig, bool, int | None]:
    """An ``AdapterConfig`` preset, whether its TTT-cache steps take the fused Triton step
    (``ops/ttt_step_triton.py``, the default) and the context of stock attention (None: the
    model's): ``NAME+tf32`` its In-Place TTT scan with TF32 products, ``NAME+unfused`` one-token
    TTT-cache steps through the PyTorch reference step (both may be given); ``window64``: stock
    Moshi with a 64-step context."""
    if name == "window64":
        return AdapterConfig.preset("off", num_layers=num_layers), True, 64
    base, *opts = name.split("+")
    cfg = AdapterConfig.preset(base, num_layers=num_layers)
    if (
        any(o not in ("tf32", "unfused") for o in opts)
        or len(set(opts)) != len(opts)
        or ("tf32" in opts and cfg.inplace_ttt is None)
        or ("unfused" in opts and (cfg.memory is None or cfg.memory.kind != "ttt_cache"))
    ):
        raise ValueError(
            f"bad variant {name!r}: expected PRESET, PRESET+tf32 (a preset with In-Place TTT) "
            "and/or PRESET+unfused (a preset with the TTT cache), or window64"
        )
    if "tf32" in opts:
        cfg = dataclasses.replace(
            cfg, inplace_ttt=dataclasses.replace(cfg.inplace_ttt, matmul_precision="high")
        )
    return cfg, "unfused" not in opts, None


@contextlib.contextmanager
def variant(lm: LMModel, name: str):
    """``lm`` as the variant ``name`` inside the block (``variant_config``: the preset patched in,
    stock attention's context set, the one-token TTT-cache step fused or not), stock after it.
    Yields (config, fused, context)."""
    cfg, fused, context = variant_config(name, len(lm.transformer.layers))
    contexts = set_context(lm, context)
    patch_lm(lm, cfg)
    try:
        # +unfused: the one-token TTT-cache step in PyTorch
        with implementation(reference=() if fused else {"step"}):
            yield cfg, fused, context
    finally:
        unpatch_lm(lm)
        for layer, c in zip(lm.transformer.layers, contexts):
            layer.self_attn.context = c


def set_context(lm: LMModel, context: int | None) -> list:
    """Set the ring-cache context of every attention of the main transformer (None: unchanged);
    returns the previous ones."""
    attns = [layer.self_attn for layer in lm.transformer.layers]
    before = [a.context for a in attns]
    if context is not None:
        for a in attns:
            a.context = context
    return before


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    kwargs = TINY_LM if args.tiny else _lm_kwargs
    t_start = time.monotonic()
    torch.manual_seed(0)
    lm = LMModel(device=device, dtype=dtype, **kwargs).eval()
    built_s = time.monotonic() - t_start
    out = {
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dtype": args.dtype,
        "tiny": args.tiny,
        "threshold_ms": args.threshold_ms,
        "cuda_graphs": device.type == "cuda",
        "frames_timed": args.frames,
        "fill": args.fill,
        "stagger": args.stagger,
        "resolution": args.resolution,
        "ff_chunk": args.ff_chunk,
        "checkpoints": args.checkpoints,
        "model_build_s": built_s,
        "variants": {},
    }
    for r in range(args.latency_rounds):  # the variants interleaved: A B A B ...
        for name in args.variants:
            t0 = time.monotonic()
            with variant(lm, name) as (cfg, fused, context):
                cps = args.checkpoints if r == 0 else args.checkpoints[:1]
                series = batch1_series(lm, args, device, cps)
            if r == 0:
                out["variants"][name] = {
                    "adapter": cfg.to_dict(),
                    "fused_step": fused,
                    "context": context,
                    "series": series,
                    # batch-1 ms/frame at the first checkpoint, one per round
                    "latency_rounds_ms": [],
                    "seconds": 0.0,
                }
            entry = out["variants"][name]
            entry["latency_rounds_ms"].append(series[0]["ms_per_frame"])
            entry["seconds"] += time.monotonic() - t0
    t_search = time.monotonic()
    per_variant = (args.budget_s - (t_search - t_start)) / len(args.variants)
    for i, name in enumerate(args.variants):
        t0 = time.monotonic()
        with variant(lm, name):
            search = concurrency(lm, args, device, t_search + per_variant * (i + 1))
        entry = out["variants"][name]
        entry["search"] = search
        entry["seconds"] += time.monotonic() - t0
        series = entry["series"]
        print(
            f"{name}: batch-1 {series[-1]['ms_per_frame']:.1f} ms/frame, state "
            f"{series[-1]['state_bytes'] / 1e6:.1f} MB/conv, max concurrent "
            f"{search['max_concurrent']} "
            f"({search['stopped_by']})",
            flush=True,
        )
    out["total_s"] = time.monotonic() - t_start
    out["ratios"] = ratios(out)
    out["ratios_window64"] = ratios(out, "window64")
    return out


def ratios(out: dict, base: str = "off") -> dict:
    """Each variant against ``base`` (stock ``off``, or ``window64``): batch-1 latency, state at the
    last checkpoint, concurrency."""
    v = out["variants"]
    if base not in v:
        return {}
    s = v[base]
    res = {}
    for name, r in v.items():
        if name == base:
            continue
        res[name] = {
            "latency_b1": r["series"][-1]["ms_per_frame"] / s["series"][-1]["ms_per_frame"],
            # at the first checkpoint, the median of each variant's interleaved rounds
            "latency_b1_median": statistics.median(r["latency_rounds_ms"])
            / statistics.median(s["latency_rounds_ms"]),
            "state_mb_last": r["series"][-1]["state_bytes"] / 1e6,
            "state_vs_stock": r["series"][-1]["state_bytes"] / s["series"][-1]["state_bytes"],
            "concurrency_vs_stock": r["search"]["max_concurrent"]
            / max(s["search"]["max_concurrent"], 1),
            **same_batch(r["search"]["tried"], s["search"]["tried"], s["search"]["max_concurrent"]),
        }
    return res


def same_batch(tried: list[dict], base: list[dict], limit: int) -> dict:
    """ms per frame against ``base``'s at the largest batch up to ``limit`` (the base's most
    concurrent) both searches measured without OOM: a throughput ratio finer than the searches'
    resolution. {} when they share none."""
    ms = lambda ts: {t["batch"]: t["ms_per_frame"] for t in ts if not t.get("oom")}
    a, b = ms(tried), ms(base)
    common = sorted(B for B in set(a) & set(b) if B <= limit)
    if not common:
        return {}
    B = common[-1]
    return {"same_batch": B, "ms_vs_base_same_batch": a[B] / b[B]}


def markdown(out: dict) -> str:
    graphs = (
        "LMGen with CUDA graphs" if out["cuda_graphs"] else "LMGen eager (no CUDA graphs off GPU)"
    )
    lines = [
        f"# Moshi {'tiny' if out['tiny'] else '7B'} streaming benchmark ({out['device']}, "
        f"{out['dtype']}, "
        f"random weights, {graphs})",
        "",
        "Batch 1: ms per frame and streaming state per conversation after N steps.",
        "",
        "| variant | steps | ms/frame | slowest frame (ms) | state MB/conv | allocated MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    slowest = lambda row: f"{row['ms_per_frame_max']:.2f}" if "ms_per_frame_max" in row else "-"
    for name, r in out["variants"].items():
        for row in r["series"]:
            lines.append(
                f"| {name} | {row['steps']} | {row['ms_per_frame']:.2f} | {slowest(row)} | "
                f"{row['state_bytes'] / 1e6:.2f} | "
                f"{row['allocated_bytes'] / 1e6:.1f} |"
            )
    lines += [
        "",
        f"Most concurrent conversations under {out['threshold_ms']} ms per frame (the mean of the "
        "timed frames; the slowest one beside it).",
        "",
        "| variant | max concurrent | ms/frame there | slowest frame (ms) | state MB/conv | "
        "allocated GB there | stopped by |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in out["variants"].items():
        s, at = r["search"], r["search"]["at_max"] or {}
        lines.append(
            f"| {name} | {s['max_concurrent']} | {at.get('ms_per_frame', float('nan')):.2f} | "
            f"{slowest(at)} | "
            f"{at.get('state_bytes', 0) / max(at.get('batch', 1), 1) / 1e6:.2f} | "
            f"{at.get('allocated_bytes', 0) / 1e9:.2f} | {s['stopped_by']} |"
        )
    if out["ratios"]:
        lines += [
            "",
            "Against stock (`off`):",
            "",
            "| variant | latency at batch 1 | state at last checkpoint (MB) | "
            "state / stock | concurrency / stock |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, r in out["ratios"].items():
            lines.append(
                f"| {name} | {r['latency_b1']:.2f}x | {r['state_mb_last']:.1f} | "
                f"{r['state_vs_stock']:.4f} | "
                f"{r['concurrency_vs_stock']:.1f}x |"
            )
    if out.get("ratios_window64"):
        lines += [
            "",
            "Against `window64` (stock Moshi, a 64-step context in every layer):",
            "",
            "| variant | latency at batch 1 | state / window64 | concurrency / window64 | "
            "ms/frame / window64's at one batch |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, r in out["ratios_window64"].items():
            same = (
                f"{r['ms_vs_base_same_batch']:.3f}x at {r['same_batch']}"
                if "same_batch" in r
                else "-"
            )
            lines.append(
                f"| {name} | {r['latency_b1']:.3f}x | {r['state_vs_stock']:.3f} | "
                f"{r['concurrency_vs_stock']:.3f}x | {same} |"
            )
    rounds = {n: r["latency_rounds_ms"] for n, r in out["variants"].items()}
    if any(len(v) > 1 for v in rounds.values()):
        lines += [
            "",
            f"Batch 1 at step {out['checkpoints'][0]}, the variants measured in turn "
            f"({len(next(iter(rounds.values())))} rounds, each from a fresh LMGen): ms per frame",
            "",
            "| variant | each round | median |",
            "|---|---|---:|",
        ]
        for n, v in rounds.items():
            each = ", ".join(f"{x:.2f}" for x in v)
            lines.append(f"| {n} | {each} | {statistics.median(v):.2f} |")
        lines.append("")
        for base, key in (("off", "ratios"), ("window64", "ratios_window64")):
            for n, r in out.get(key, {}).items():
                ratio = r["latency_b1_median"]
                lines.append(f"- {n} / {base}, medians of the rounds: {ratio:.3f}x")
    lines += ["", f"Total {out['total_s']:.0f} s (model built in {out['model_build_s']:.0f} s)."]
    return "\n".join(lines) + "\n"


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for name, r in out["variants"].items():
        steps = [row["steps"] for row in r["series"]]
        ax[0].plot(steps, [row["ms_per_frame"] for row in r["series"]], marker="o", label=name)
        ax[1].plot(steps, [row["state_bytes"] / 1e6 for row in r["series"]], marker="o", label=name)
    ax[0].set(xlabel="steps streamed", ylabel="ms per frame (batch 1)", xscale="log")
    ax[1].set(
        xlabel="steps streamed", ylabel="state MB per conversation", xscale="log", yscale="log"
    )
    names = list(out["variants"])
    ax[2].bar(names, [out["variants"][n]["search"]["max_concurrent"] for n in names])
    ax[2].set(ylabel=f"concurrent conversations < {out['threshold_ms']} ms/frame")
    for a in ax[:2]:
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true", help="a tiny Moshi config (CPU tests)")
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--dtype", choices=("bf16", "fp32"), default=None, help="default: bf16 (fp32 with --tiny)"
    )
    p.add_argument(
        "--variants",
        default="off,ttt_cache,both",
        help="AdapterConfig presets ('off' is stock Moshi), PRESET+tf32 for TF32 In-Place TTT "
        "products, "
        "PRESET+unfused for the PyTorch reference one-token TTT-cache step (default: "
        "ops/ttt_step_triton.py)",
    )
    p.add_argument(
        "--checkpoints", default=None, help="steps, comma separated (default 1000,3000,10000,20000)"
    )
    p.add_argument(
        "--frames", type=int, default=None, help="timed steps per measurement (default 32; tiny 3)"
    )
    p.add_argument(
        "--fill",
        type=int,
        default=None,
        help="steps each batch of the search streams before it is timed (default 96; tiny 8)",
    )
    p.add_argument(
        "--stagger",
        type=int,
        default=None,
        help="the search's rows start over this many steps (default 16; tiny 4)",
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--latency-rounds",
        type=int,
        default=1,
        help="batch-1 series per variant, the variants in turn (A B A B ...) before the searches; "
        "rounds after the first stop at the first checkpoint, and the ratios take each variant's "
        "median there",
    )
    p.add_argument(
        "--ff-chunk",
        type=int,
        default=None,
        help="steps per fast-forward call (default 500; tiny 50)",
    )
    p.add_argument(
        "--threshold-ms", type=float, default=80.0, help="real time: 80 ms per frame at 12.5 Hz"
    )
    p.add_argument(
        "--max-batch", type=int, default=None, help="largest batch tried (default 4096; tiny 8)"
    )
    p.add_argument(
        "--resolution",
        type=float,
        default=1 / 128,
        help="the search stops when the first failing batch is within this fraction of the best",
    )
    p.add_argument(
        "--budget-s", type=float, default=None, help="wall-clock budget (default 420; tiny 60)"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default: torch's; tiny 1)"
    )
    a = p.parse_args(argv)
    a.variants = [v for v in a.variants.split(",") if v]
    a.dtype = a.dtype or ("fp32" if a.tiny else "bf16")
    a.checkpoints = [
        int(s)
        for s in (a.checkpoints or ("20,60,150,300" if a.tiny else "1000,3000,10000,20000")).split(
            ","
        )
    ]
    a.frames = a.frames or (3 if a.tiny else 32)
    a.fill = a.fill if a.fill is not None else (8 if a.tiny else 96)
    a.stagger = a.stagger if a.stagger is not None else (4 if a.tiny else 16)
    if a.stagger < 1 or a.fill < a.stagger + a.warmup:
        raise ValueError(
            f"--stagger must be >= 1 and --fill >= --stagger + --warmup ({a.warmup}), got "
            f"--fill {a.fill} --stagger {a.stagger}"
        )
    a.ff_chunk = a.ff_chunk or (50 if a.tiny else 500)
    a.max_batch = a.max_batch or (8 if a.tiny else 4096)
    a.budget_s = a.budget_s or (60.0 if a.tiny else 420.0)
    a.threads = a.threads or (1 if a.tiny else None)
    if a.latency_rounds < 1:
        raise ValueError(f"--latency-rounds must be >= 1, got {a.latency_rounds}")
    if not 0 < a.resolution < 1:
        raise ValueError(f"--resolution must be in (0, 1), got {a.resolution}")
    if sorted(a.checkpoints) != a.checkpoints or a.checkpoints[0] < a.warmup:
        raise ValueError(
            f"--checkpoints must increase and start at >= --warmup ({a.warmup}), got "
            f"{a.checkpoints}"
        )
    for v in a.variants:
        variant_config(v, 32)  # a typo fails here, before the 7B model is built
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available (use --tiny --device cpu)")
    return a


def main(argv=None) -> dict:
    args = parse(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        out = run(args)
    finally:
        torch.set_num_threads(threads)
    d = Path(args.out)
    d.mkdir(parents=True, exist_ok=True)
    (d / "results.json").write_text(json.dumps(out, indent=1))
    (d / "results.md").write_text(markdown(out))
    plot(out, d / "results.png")
    print(f"wrote {d}/results.json, results.md, results.png")
    return out


if __name__ == "__main__":
    main()
