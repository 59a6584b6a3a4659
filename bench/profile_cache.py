"""Time the parts of one TTT-cache attention layer (forward + backward) against the window layer:
both timed and profiled, with the operators where the TTT cache spends GPU time the window does not.

    python bench/profile_cache.py --batch 4 --seq 8192 --block 256 --out prof.json
"""

from __future__ import annotations

import argparse
import json

import torch
from profile_ttt import timed  # bench/ is the script's folder

import moshi_ttt as mt
from moshi_ttt.layers.attention import StreamingAttention


def layer(kind: str, window: int, block: int, **kw) -> StreamingAttention:
    cfg = mt.ModelConfig.preset(
        "small", memory=mt.MemoryConfig(kind=kind, window=window, block=block, **kw)
    )
    return StreamingAttention(cfg).cuda()


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    B, T = a.batch, a.seq
    x = torch.randn(B, T, 512, device="cuda", requires_grad=True)
    pos = torch.arange(T, device="cuda").expand(B, T)
    res = {
        "batch": B,
        "seq": T,
        "window": a.window,
        "block": a.block,
        "device": torch.cuda.get_device_name(),
    }

    def run(mod):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            mod(x, pos, None).float().sum().backward()

    for name, mod in [
        ("window", layer("window", a.window, a.block)),
        ("ttt_cache_gate", layer("ttt_cache", a.window, a.block)),
        ("ttt_cache_concat", layer("ttt_cache", a.window, a.block, combine="concat")),
    ]:
        res[f"{name}_ms"] = timed(lambda mod=mod: run(mod))
    mem = layer("ttt_cache", a.window, a.block)
    q = torch.randn(B, 8, T, 64, device="cuda", requires_grad=True)

    def virtual():
        r = mem.memory.virtual_parallel(q, q, q, pos, torch.zeros_like(pos), mem.freqs)
        (r.out.sum() if r.out is not None else r.scores.sum() + r.values.sum()).backward()

    res["virtual_parallel_ms"] = timed(virtual)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    tables, ops = {}, {}
    for name, mod in (("ttt_cache", mem), ("window", layer("window", a.window, a.block))):
        run(mod)
        with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
            run(mod)
            torch.cuda.synchronize()
        avg = prof.key_averages(group_by_input_shape=True)
        tables[name] = avg.table(
            sort_by="self_cuda_time_total",
            row_limit=50,
            max_name_column_width=40,
            max_shapes_column_width=90,
        )
        # operators (their kernels' time)
        cpu_side = [e for e in avg if e.device_type == torch.autograd.DeviceType.CPU]
        ops[name] = {
            f"{e.key} {e.input_shapes}": (e.self_device_time_total / 1e3, e.count) for e in cpu_side
        }
        res[f"{name}_profiled_gpu_ms"] = (
            sum(
                e.self_device_time_total
                for e in avg
                if e.device_type == torch.autograd.DeviceType.CUDA
            )
            / 1e3
        )
    # where the TTT cache layer's GPU time goes beyond the window layer's: per operator and input
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
