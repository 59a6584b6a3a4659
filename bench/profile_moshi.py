"""Where a Moshi 7B LMGen step spends its GPU time: stock vs patched, per batch size.

    NO_TORCH_COMPILE=1 python bench/profile_moshi.py --out prof-moshi.json            # one H100
    python bench/profile_moshi.py --tiny --device cpu --batches 1,2 --out /tmp/p.json  # seconds

Variants are moshi_bench.py's (presets, ``window64``). Per variant and batch: the rows first stream
``--fill`` steps, staggered over the first ``--stagger`` (as moshi_bench.py's search, so a TTT
cache evicts every step and its rows complete blocks on different steps; 0: fresh states, which
never evict within a short run), then ms per frame with CUDA graphs (replays); then (CUDA)
replays under the profiler: the kernels the graphs run, their GPU time against the wall time;
then a few eager steps under the profiler: kernels per step, GPU time per step, in the main
transformer (``forward_text``) and in each kind of attention layer (stock, or the project's
``MemoryAttention``; CPU time off CUDA), and the kernels that take the most GPU time.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import argparse
import json

import torch
from moshi.models.lm import LMGen, LMModel
from moshi.models.loaders import _lm_kwargs
from moshi.utils.compile import no_cuda_graph

# bench/ is the script's folder
from moshi_bench import TINY_LM, reach_steady, sync, time_steps, user_tokens, variant


def profile_steps(gen: LMGen, lm: LMModel, B: int, n: int, device) -> dict:
    """n eager steps under the profiler -> kernels and GPU microseconds per step, top kernels."""
    acts = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []
    )
    inputs = [user_tokens(lm, B, device) for _ in range(n)]
    with no_cuda_graph(), torch.profiler.profile(activities=acts) as prof:
        for x in inputs:
            gen.step(x)
        sync(device)
    ev = prof.key_averages()
    main = next((e for e in ev if e.key == "forward_text"), None)
    # GPU time on CUDA, CPU time elsewhere
    total = (
        (lambda e: e.device_time_total) if device.type == "cuda" else (lambda e: e.cpu_time_total)
    )
    labels = {e.key: total(e) / n for e in ev if e.key.startswith("attention ")}
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    top = sorted(ev, key=lambda e: e.self_device_time_total, reverse=True)[:25]
    return {
        "kernels_per_step": len(kernels) / n,
        "gpu_us_per_step": sum(k.device_time for k in kernels) / n,
        "main_gpu_us_per_step": (main.device_time_total / n) if main else None,
        "attention_us_per_step": labels,
        "top": [
            {
                "name": e.key[:90],
                "calls_per_step": e.count / n,
                "gpu_us_per_step": e.self_device_time_total / n,
            }
            for e in top
            if e.self_device_time_total > 0
        ],
    }


def ranked(by: dict[str, list[float]], n: int, top: int, count: str, total: str) -> list[dict]:
    """Microseconds grouped by name -> the ``top`` names by their sum, each with its ``count``
    and ``total`` per step (of n)."""
    rows = sorted(by.items(), key=lambda kv: sum(kv[1]), reverse=True)[:top]
    return [{"name": k, count: len(v) / n, total: sum(v) / n} for k, v in rows]


def kernel_table(kernels: list, n: int, top: int) -> list[dict]:
    """Kernel events grouped by name -> the ``top`` names by GPU microseconds per step."""
    by: dict[str, list[float]] = {}
    for k in kernels:
        by.setdefault(k.name[:90], []).append(k.device_time)
    return ranked(by, n, top, "calls_per_step", "gpu_us_per_step")


def gaps_before(kernels: list, n: int, top: int) -> tuple[float, list[dict]]:
    """Idle GPU time between kernels (in start order): microseconds per step in all, and the
    ``top`` pairs "kernel before -> kernel after" by the idle time between them."""
    ks = sorted(kernels, key=lambda k: k.time_range.start)
    by: dict[str, list[float]] = {}
    end, last = None, None
    for k in ks:
        if end is not None and k.time_range.start > end:
            pair = f"{last.name[:44]} -> {k.name[:44]}"
            by.setdefault(pair, []).append(k.time_range.start - end)
        if end is None or k.time_range.end >= end:
            end, last = k.time_range.end, k
    total = sum(sum(v) for v in by.values())
    return total / n, ranked(by, n, top, "gaps_per_step", "idle_us_per_step")


def profile_graphed(gen: LMGen, lm: LMModel, B: int, n: int, device) -> dict:
    """n steps as served (CUDA graph replays) under the profiler -> the kernels the graphs ran:
    GPU microseconds per step in all and per kernel name, and the wall time per step, so the
    gap between kernels (launch latency inside the graphs) shows as the difference."""
    inputs = [user_tokens(lm, B, device) for _ in range(n)]
    sync(device)
    acts = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for x in inputs:
            gen.step(x)
        end.record()
        sync(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    idle, waits = gaps_before(kernels, n, 25)
    return {
        "graph_profiled_steps": n,
        "graph_ms_per_step_profiled": start.elapsed_time(end) / n,
        "graph_kernels_per_step": len(kernels) / n,
        "graph_kernel_us_per_step": sum(k.device_time for k in kernels) / n,
        "graph_top": kernel_table(kernels, n, 40),
        "graph_idle_us_per_step": idle,
        "graph_idle_before": waits,
    }


def profile_batch(lm: LMModel, B: int, a, device) -> dict:
    """ms per frame at batch B with CUDA graphs, then ``profile_steps`` on the same state."""
    gen = LMGen(lm, use_sampling=True)
    attns = [layer.self_attn for layer in lm.transformer.layers]
    for m in attns:  # GPU time per kind of attention layer (stock, or the project's memory)
        m.forward = labelled(m.forward, f"attention ({type(m).__name__})")
    try:
        with gen.streaming(B):
            if a.fill:  # the steady state: every row past its window, blocks completing apart
                reach_steady(gen, lm, B, a.fill, a.stagger, device)
            time_steps(gen, lm, B, 3, device)
            ms = time_steps(gen, lm, B, a.frames, device)
            graphed = (
                profile_graphed(gen, lm, B, a.graph_profiled, device)
                if a.graph_profiled and device.type == "cuda"
                else {}
            )
            return {
                "graph_ms_per_frame": ms,
                **graphed,
                **(profile_steps(gen, lm, B, a.profiled, device) if a.profiled else {}),
            }
    finally:
        for m in attns:
            del m.forward
        del gen
        torch.cuda.empty_cache() if device.type == "cuda" else None


def labelled(fn, name):
    def run(*a, **k):
        with torch.profiler.record_function(name):
            return fn(*a, **k)

    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--variants", default="off,ttt_cache", help="moshi_bench.py's variants, e.g. window64"
    )
    p.add_argument("--batches", default="1,32")
    p.add_argument(
        "--extra-batches",
        default="128",
        help="batches for the patched variants only (stock runs out of memory)",
    )
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--profiled", type=int, default=3, help="eager steps under the profiler")
    p.add_argument(
        "--graph-profiled",
        type=int,
        default=16,
        help="steps as served (CUDA graph replays) under the profiler (CUDA only; 0: none)",
    )
    p.add_argument(
        "--fill",
        type=int,
        default=96,
        help="steps streamed before timing (past the 64-step window; 0: fresh states)",
    )
    p.add_argument("--stagger", type=int, default=16, help="the rows start over this many steps")
    a = p.parse_args(argv)
    if a.fill and not 1 <= a.stagger <= a.fill:
        p.error(f"--stagger must be in 1..--fill ({a.fill}), got {a.stagger}")
    device = torch.device(a.device)
    dtype = torch.float32 if a.tiny else torch.bfloat16
    torch.manual_seed(0)
    lm = LMModel(device=device, dtype=dtype, **(TINY_LM if a.tiny else _lm_kwargs)).eval()
    lm.forward_text = labelled(lm.forward_text, "forward_text")
    has_if = hasattr(torch.cuda.CUDAGraph, "begin_capture_to_if_node")
    res = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda_graph_if_nodes": has_if,
        "fill": a.fill,
        "stagger": a.stagger if a.fill else None,
        "runs": [],
    }
    print(json.dumps({k: res[k] for k in ("device", "torch", "cuda_graph_if_nodes")}), flush=True)
    for name in a.variants.split(","):
        batches = a.batches + ("," + a.extra_batches if name != "off" and a.extra_batches else "")
        with variant(lm, name):
            for B in (int(s) for s in batches.split(",")):
                run = {"variant": name, "batch": B, **profile_batch(lm, B, a, device)}
                res["runs"].append(run)
                print(
                    f"{name} B={B}: {run['graph_ms_per_frame']:.2f} ms/frame (graphs)", flush=True
                )
                if a.profiled:
                    print(
                        f"  eager profile: {run['kernels_per_step']:.0f} kernels, "
                        f"{run['gpu_us_per_step'] / 1e3:.2f} ms GPU/step, main "
                        f"{(run['main_gpu_us_per_step'] or 0) / 1e3:.2f} ms; "
                        + ", ".join(
                            f"{k} {v / 1e3:.2f} ms" for k, v in run["attention_us_per_step"].items()
                        )
                    )
                if "graph_top" in run:
                    print(
                        f"  graphs: {run['graph_kernels_per_step']:.0f} kernels, "
                        f"{run['graph_kernel_us_per_step'] / 1e3:.2f} ms of kernels in "
                        f"{run['graph_ms_per_step_profiled']:.2f} ms per step, "
                        f"{run['graph_idle_us_per_step'] / 1e3:.2f} ms idle; idle before:"
                    )
                    for t in run["graph_idle_before"][:8]:
                        print(
                            f"   {t['idle_us_per_step']:9.1f} us  x{t['gaps_per_step']:6.1f}  "
                            f"{t['name']}"
                        )
                for t in run.get("graph_top", run.get("top", []))[:12]:
                    print(
                        f"   {t['gpu_us_per_step']:9.1f} us  x{t['calls_per_step']:6.1f}  "
                        f"{t['name']}"
                    )
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
