"""Time the parts of one In-Place TTT layer (forward + backward) on the GPU.

python bench/profile_ttt.py --batch 4 --seq 8192 --dim 512 --hidden 1408 --chunk 512
"""

from __future__ import annotations

import argparse
import json

import torch

import moshi_ttt as mt
from moshi_ttt.layers.inplace_ttt import InPlaceTTTMLP
from moshi_ttt.layers.mlp import GatedMLP
from moshi_ttt.ops.inplace_ttt import chunk_target, ttt_chunk_scan


def timed(fn, reps=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1408)
    p.add_argument("--chunk", type=int, default=512)
    a = p.parse_args()
    B, T, D, H, C = a.batch, a.seq, a.dim, a.hidden, a.chunk
    dev = "cuda"
    z = torch.randn(B, T, H, device=dev, requires_grad=True)
    v = torch.randn(B, T, D, device=dev, requires_grad=True)
    w0 = (torch.randn(D, H, device=dev) * 0.02).requires_grad_()
    x0 = torch.randn(B, T, D, device=dev)
    conv = torch.zeros(D, 1, 5, device=dev, requires_grad=True)
    proj = torch.eye(D, device=dev, requires_grad=True)
    res = {}

    def scan():
        o, _ = ttt_chunk_scan(z, v, w0, 0.3, C)
        o.sum().backward()

    res["scan_fp32_ms"] = timed(scan)
    res["scan_tf32_ms"] = timed(
        lambda: ttt_chunk_scan(z, v, w0, 0.3, C, precision="high")[0].sum().backward()
    )
    res["target_fwd_bwd_ms"] = timed(lambda: chunk_target(x0, conv, proj, C).sum().backward())
    x = torch.randn(B, T, D, device=dev, requires_grad=True)
    pos = torch.arange(T, device=dev).expand(B, T)
    ttt = InPlaceTTTMLP(D, H, mt.InPlaceTTTConfig(chunk_size=C)).to(dev)
    ttt32 = InPlaceTTTMLP(D, H, mt.InPlaceTTTConfig(chunk_size=C, matmul_precision="high")).to(dev)
    plain = GatedMLP(D, H).to(dev)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        res["mlp_plain_bf16_ms"] = timed(lambda: plain(x).float().sum().backward())
        res["mlp_ttt_bf16_ms"] = timed(
            lambda: ttt.forward_ttt(x, x, pos, None).float().sum().backward()
        )
        res["mlp_ttt_tf32_bf16_ms"] = timed(
            lambda: ttt32.forward_ttt(x, x, pos, None).float().sum().backward()
        )
    flops = 14 * B * T * D * H
    res["scan_fp32_tflops"] = flops / res["scan_fp32_ms"] / 1e9
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
