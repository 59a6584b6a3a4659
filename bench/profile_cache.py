"""Time the parts of one TTT-cache attention layer (forward + backward) against the window layer:
both timed and profiled, with the operators where the TTT cache spends time the window does not
(GPU time on CUDA, CPU time on the CPU).

    python bench/profile_cache.py --batch 4 --seq 8192 --block 256 --out prof.json
    python bench/profile_cache.py --device cpu --preset tiny --batch 4 --seq 512 --window 64 \
        --block 16 --out prof.json         # where a CPU user's training time goes
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from profile_ttt import timed as cuda_timed  # bench/ is the script's folder

import moshi_ttt as mt
from moshi_ttt.layers.attention import StreamingAttention


def layer(preset: str, kind: str, window: int, block: int, device, **kw) -> StreamingAttention:
    cfg = mt.ModelConfig.preset(
        preset, memory=mt.MemoryConfig(kind=kind, window=window, block=block, **kw)
    )
    return StreamingAttention(cfg).to(device)


def timed(fn, device: torch.device, reps: int = 10) -> float:
    """Median ms of ``fn`` (CUDA events on the GPU, wall clock elsewhere)."""
    if device.type == "cuda":
        return cuda_timed(fn, reps)
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--preset", default="small", help="the model preset whose layer is timed")
    p.add_argument(
        "--compile-scan",
        action="store_true",
        help="also time the TTT cache with compile_scan (torch.compile'd updates; its first call, "
        "which compiles, timed apart)",
    )
    a = p.parse_args()
    B, T = a.batch, a.seq
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available (use --device cpu --preset tiny)")
    cfg = mt.ModelConfig.preset(a.preset)
    H, Dh = cfg.num_heads, cfg.dim // cfg.num_heads
    x = torch.randn(B, T, cfg.dim, device=dev, requires_grad=True)
    pos = torch.arange(T, device=dev).expand(B, T)
    cuda = dev.type == "cuda"
    res = {
        "preset": a.preset,
        "batch": B,
        "seq": T,
        "window": a.window,
        "block": a.block,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "threads": None if cuda else torch.get_num_threads(),
    }

    def run(mod):
        # bf16 autocast on the GPU; fp32 on the CPU
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            mod(x, pos, None).float().sum().backward()

    for name, mod in [
        ("window", layer(a.preset, "window", a.window, a.block, dev)),
        ("ttt_cache_gate", layer(a.preset, "ttt_cache", a.window, a.block, dev)),
        (
            "ttt_cache_concat",
            layer(a.preset, "ttt_cache", a.window, a.block, dev, combine="concat"),
        ),
    ]:
        res[f"{name}_ms"] = timed(lambda mod=mod: run(mod), dev)
    if a.compile_scan:
        mod = layer(a.preset, "ttt_cache", a.window, a.block, dev, compile_scan=True)
        t0 = time.perf_counter()
        run(mod)
        res["ttt_cache_gate_compiled_first_call_s"] = time.perf_counter() - t0
        res["ttt_cache_gate_compiled_ms"] = timed(lambda: run(mod), dev)
    mem = layer(a.preset, "ttt_cache", a.window, a.block, dev)
    q = torch.randn(B, H, T, Dh, device=dev, requires_grad=True)

    def virtual():
        r = mem.memory.virtual_parallel(q, q, q, pos, torch.zeros_like(pos), mem.freqs)
        (r.out.sum() if r.out is not None else r.scores.sum() + r.values.sum()).backward()

    res["virtual_parallel_ms"] = timed(virtual, dev)
    acts = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if cuda else []
    )
    # an operator's own time: its kernels' on the GPU, its own CPU time elsewhere
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    tables, ops = {}, {}
    for name, mod in (
        ("ttt_cache", mem),
        ("window", layer(a.preset, "window", a.window, a.block, dev)),
    ):
        run(mod)
        with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
            run(mod)
            if cuda:
                torch.cuda.synchronize()
        avg = prof.key_averages(group_by_input_shape=True)
        tables[name] = avg.table(
            sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
            row_limit=50,
            max_name_column_width=40,
            max_shapes_column_width=90,
        )
        cpu_side = [e for e in avg if e.device_type == torch.autograd.DeviceType.CPU]
        ops[name] = {f"{e.key} {e.input_shapes}": (own(e) / 1e3, e.count) for e in cpu_side}
        kernels = [e for e in avg if e.device_type == torch.autograd.DeviceType.CUDA]
        res[f"{name}_profiled_{'gpu' if cuda else 'cpu'}_ms"] = (
            sum(e.self_device_time_total for e in kernels) if cuda else sum(map(own, cpu_side))
        ) / 1e3
    # where the TTT cache layer's time goes beyond the window layer's: per operator and input
    # shapes
    diff = {
        k: (ms - ops["window"].get(k, (0.0, 0))[0], n) for k, (ms, n) in ops["ttt_cache"].items()
    }
    res["extra_ms_by_op"] = {
        k: round(v[0], 3) for k, v in sorted(diff.items(), key=lambda kv: -kv[1][0])[:25]
    }
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        with open(a.out.replace(".json", ".txt"), "w") as f:
            f.write("\n\n".join(f"== {n}\n{t}" for n, t in tables.items()))


if __name__ == "__main__":
    main()
