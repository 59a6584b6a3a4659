"""Time the TTT cache's one-token step kernels at a Moshi layer's shape, under CUDA graphs, against
the attention a plain window runs, and sweep the kernels' launch constants.

    python bench/step_kernels.py --out step.json                 # one GPU, about a minute
    python bench/step_kernels.py --device cpu --batches 2 --heads 2 --head-dim 16 --hidden 16 \
        --reps 2 --warps 4 --vkey-chunks 16 --per-sm 4 --attend 16:2 --out /tmp/s.json

Per batch: the rows' open blocks are staggered (row r holds r mod b tokens), so 1/b of them
complete a block each step, as in served conversations past their window. Timed per step:
``append`` (``evict_step`` with no token evicted: the append kernel and an empty completion),
``evict`` (``evict_step`` with every row evicting: append plus the completions), ``complete``
their difference, ``attend`` (``attend_one``) and ``sdpa`` (PyTorch's attention of the query
over the 64-slot ring alone: what a plain window's step runs). Each is captured in a CUDA graph
and replayed (off CUDA: called, wall clock). The sweep varies the completion kernel's warps
(``COMPLETE_WARPS``), programs per multiprocessor (``COMPLETE_PER_SM``) and virtual-key column
chunk (``VKEY_CHUNK``), and the attention's ring chunk and warps (``ATTEND_CHUNK``,
``ATTEND_WARPS``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
from torch.nn import functional as F

import moshi_ttt as mt
from moshi_ttt.layers.memories import make_memory
from moshi_ttt.moshi.streaming import empty_state
from moshi_ttt.ops import ttt_step_triton as ttt_step


def captured(fn) -> torch.cuda.CUDAGraph:
    """One call of fn captured as a CUDA graph (replayed once, so its first replay is done)."""
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    return g


def replay_us(g: torch.cuda.CUDAGraph, reps: int) -> float:
    """Microseconds per replay of g: ``reps`` replays back to back between two CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1e3


def timed_us(fn, reps: int, device: torch.device) -> float:
    """Microseconds per call of fn: a CUDA graph of one call replayed ``reps`` times between two
    events (off CUDA: the wall clock over ``reps`` calls)."""
    fn()  # compiles the kernels
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps * 1e6
    return replay_us(captured(fn), reps)


def layer_state(a, B: int, device: torch.device):
    """A TTT-cache layer at the given shape and a steady state of B rows: a full ring, staggered
    open blocks, one update done, small compressor offsets."""
    cfg = mt.MemoryConfig(
        kind="ttt_cache",
        window=a.window,
        num_virtual=a.virtual,
        block=a.block,
        compressor_hidden=a.hidden,
    )
    mem = make_memory(cfg, a.heads, a.head_dim).to(device=device, dtype=a.dtype)
    st = empty_state(B)
    mem.init(st.scope(""), B, device, a.dtype)
    g = torch.Generator(device=device).manual_seed(0)
    for t in st.tensors.values():
        if t.is_floating_point():
            t.copy_(torch.randn(t.shape, generator=g, device=device, dtype=t.dtype) * 0.02)
    st["kpos"].copy_(torch.arange(a.window, device=device).expand(B, -1))
    st["eeta"].fill_(0.01)
    st["ecount"].copy_(torch.arange(B, device=device) % a.block)
    st["updates"].fill_(1)
    return mem, st.scope("")


def step_parts(a, B: int, device: torch.device, reps: int) -> dict:
    """µs per step of each part (module docstring) at batch B."""
    mem, st = layer_state(a, B, device)
    H, Dh = a.heads, a.head_dim
    g = torch.Generator(device=device).manual_seed(1)
    rnd = lambda *s: torch.randn(*s, generator=g, device=device, dtype=a.dtype)
    cand_k, cand_v, q, q_raw = (rnd(B, H, 1, Dh) for _ in range(4))
    freqs = 1.0 / (10000 ** (torch.arange(0, Dh, 2, device=device).float() / Dh))
    rot = mem._rotation(freqs)
    view, weights = mem._step_view(st), mem._step_weights()
    mc = mem.cfg
    kw = dict(
        eta_scale=mc.inner_lr / a.block,
        decay=mc.decay,
        momentum=mc.momentum,
        max_norm=mc.max_state_norm,
    )

    def evict(valid):
        return lambda: ttt_step.evict_step(cand_k, cand_v, valid, view, weights, rot, **kw)

    none = torch.zeros(B, dtype=torch.bool, device=device)
    every = torch.ones(B, dtype=torch.bool, device=device)
    has = torch.ones(B, dtype=torch.bool, device=device)

    def attend():
        return mem._attend_one(q, q_raw, st, st["vk"], st["vv"], has)

    def sdpa():
        return F.scaled_dot_product_attention(q, st["k"], st["v"])

    with torch.no_grad():
        out = {
            "append": timed_us(evict(none), reps, device),
            "evict": timed_us(evict(every), reps, device),
            "attend": timed_us(attend, reps, device),
            "sdpa": timed_us(sdpa, reps, device),
        }
        if not all(torch.isfinite(d).all() for d in view.ds):
            raise FloatingPointError(f"batch {B}: compressor state not finite after the steps")
    out["complete"] = out["evict"] - out["append"]
    return out


def parse(a):
    a.batches = [int(s) for s in a.batches.split(",")]
    a.warps = [int(s) for s in a.warps.split(",")]
    a.vkey_chunks = [int(s) for s in a.vkey_chunks.split(",")]
    a.per_sm = [int(s) for s in a.per_sm.split(",")]
    a.attend = [tuple(int(x) for x in s.split(":")) for s in a.attend.split(",")]
    a.dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    for w in a.warps:
        if w not in (1, 2, 4, 8, 16):
            raise SystemExit(f"--warps: {w} is not 1, 2, 4, 8 or 16")
    for c in a.vkey_chunks:
        if c < 2 or c & (c - 1) or c > a.head_dim:
            raise SystemExit(f"--vkey-chunks: {c} must be a power of two in 2..--head-dim")
    return a


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--batches", default="1,1024")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--virtual", type=int, default=8)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--warps", default="4,8", help="completion kernel warps to try")
    p.add_argument("--vkey-chunks", default="16,32,64", help="VKEY_CHUNK values to try")
    p.add_argument("--per-sm", default="2,4,8", help="COMPLETE_PER_SM values to try")
    p.add_argument("--attend", default="16:2,32:4,64:4", help="ATTEND_CHUNK:ATTEND_WARPS pairs")
    a = parse(p.parse_args(argv))
    device = torch.device(a.device)
    defaults = (ttt_step.COMPLETE_WARPS, ttt_step.VKEY_CHUNK, ttt_step.COMPLETE_PER_SM)
    defaults += (ttt_step.ATTEND_CHUNK, ttt_step.ATTEND_WARPS)
    res = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "shape": {k: getattr(a, k) for k in ("heads", "head_dim", "window", "block", "virtual")},
        "hidden": a.hidden,
        "dtype": str(a.dtype),
        "defaults": dict(
            zip(("warps", "vkey_chunk", "per_sm", "attend_chunk", "attend_warps"), defaults)
        ),
        "runs": [],
    }
    print(json.dumps({k: res[k] for k in ("device", "torch", "shape", "defaults")}), flush=True)
    combos = list(itertools.product(a.warps, a.vkey_chunks, a.per_sm))
    try:
        for B in a.batches:
            for i, (w, kc, per) in enumerate(combos):
                ttt_step.COMPLETE_WARPS, ttt_step.VKEY_CHUNK, ttt_step.COMPLETE_PER_SM = w, kc, per
                ac, aw = a.attend[i % len(a.attend)]
                ttt_step.ATTEND_CHUNK, ttt_step.ATTEND_WARPS = ac, aw
                run = dict(batch=B, warps=w, vkey_chunk=kc, per_sm=per, attend_chunk=ac)
                run |= dict(attend_warps=aw, **step_parts(a, B, device, a.reps))
                res["runs"].append(run)
                print(
                    f"B={B} warps={w} vkey_chunk={kc} per_sm={per} attend={ac}:{aw}: "
                    + ", ".join(
                        f"{k} {run[k]:.1f}"
                        for k in ("append", "complete", "evict", "attend", "sdpa")
                    )
                    + " us/step",
                    flush=True,
                )
    finally:
        (ttt_step.COMPLETE_WARPS, ttt_step.VKEY_CHUNK, ttt_step.COMPLETE_PER_SM) = defaults[:3]
        ttt_step.ATTEND_CHUNK, ttt_step.ATTEND_WARPS = defaults[3:]
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
