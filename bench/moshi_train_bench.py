"""Moshi training throughput and memory: stage 1 (the memory alone on the reconstruction loss, the
backbone frozen) and stage 3 (every parameter on Moshi's loss), one GPU, random weights.

    python bench/moshi_train_bench.py --out docs/results/moshi-train-7b-h200      # one H200
    torchrun --nproc_per_node 2 bench/moshi_train_bench.py --out DIR              # FSDP2, 2 GPUs
    python bench/moshi_train_bench.py --tiny --device cpu --out /tmp/moshi-train  # seconds

Each stage trains ``--steps`` steps (after one warm-up step) of ``MoshiTrainer`` on conversations
of ``--conversation`` Moshi steps (12.5 per second), streamed in segments of ``--segment`` steps
with the memory carried. Reported per stage: Moshi steps (frames) per second and tokens per second
(17 tokens a frame on the 7B: text and 16 audio codebooks), the peak memory allocated, the
parameters in the optimizer, and the streaming state of one conversation after every segment
(flat: it must not grow). Under torchrun each of N processes trains one conversation a step with
the model sharded by FSDP2 (``trainer.shard``): frames/s counts all N, the peak is per GPU.
Weights are bf16; AdamW's moments take their parameters' dtype, so
stage 3 holds 2 + 2 + 4 bytes per parameter. Writes results.json and results.md under ``--out``.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import argparse
import dataclasses
import gc
import json
import platform
import time
from pathlib import Path

import torch
from moshi.models.lm import LMModel
from moshi.models.loaders import _lm_kwargs

from moshi_ttt.moshi import AdapterConfig, patch_lm
from moshi_ttt.moshi.config import tiny_lm_kwargs
from moshi_ttt.moshi.streaming import state_nbytes
from moshi_ttt.moshi.train import delayed_io
from moshi_ttt.moshi.trainer import MoshiTrainConfig, MoshiTrainer, stage_parameters
from moshi_ttt.trainer import ADDED, init_distributed
from moshi_ttt.training import Stage

STAGES = {
    "stage 1 (memory, reconstruction)": Stage("memory", 1, (ADDED,), "reconstruction"),
    "stage 3 (all, Moshi loss)": Stage("all", 1),
}


def build(tiny: bool, device: torch.device, adapter: str, dtype: str) -> LMModel:
    torch.manual_seed(0)
    kw = tiny_lm_kwargs() if tiny else dict(_lm_kwargs)
    dtype = torch.float32 if tiny or device.type == "cpu" else getattr(torch, dtype)
    lm = LMModel(device=device, dtype=dtype, **kw)
    return patch_lm(lm, AdapterConfig.preset(adapter, num_layers=len(lm.transformer.layers)))


def conversation(lm: LMModel, T: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, lm.card, (lm.num_codebooks, T), generator=g)
    codes[0] = torch.randint(0, lm.text_card, (T,), generator=g)
    return codes


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def state_per_segment(lm: LMModel, codes: torch.Tensor, segment: int) -> list[int]:
    """Bytes of one conversation's streaming state after each segment (the training path)."""
    inputs, _ = delayed_io(lm, codes.to(lm.device)[None])
    out = []
    with lm.streaming(1):
        for s in range(0, codes.shape[1], segment):
            lm.forward_text(inputs[:, :, s : s + segment])
            out.append(state_nbytes(lm))
    return out


def run_stage(lm, stage: Stage, a, device, out: Path, world: int) -> dict:
    convs = [conversation(lm, a.conversation, i) for i in range(world * (a.steps + 1))]
    cfg = MoshiTrainConfig(
        stages=(dataclasses.replace(stage, steps=a.steps + 1),),
        segment=a.segment,
        warmup=0,
        bf16=device.type == "cuda",
        lr=1e-5,
        batch=world,
    )
    trainer = MoshiTrainer(lm, cfg, convs, out, progress=False)
    trainer.train_step()  # warm-up: kernels, allocator
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, rows = [], []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        rows.append(trainer.train_step())
        sync(device)
        times.append(time.perf_counter() - t0)
    trained = sum(p.numel() for p in lm.parameters() if p.requires_grad)  # whole sizes
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # this GPU's shard
    opt_bytes = sum(
        local(t).numel() * t.element_size()
        for st in trainer.opt.state.values()
        for t in st.values()
        if torch.is_tensor(t)
    )
    frames_s = world * a.conversation / (sum(times) / len(times))
    res = {
        "seconds_per_step": times,
        "frames_per_s": frames_s,
        "tokens_per_s": frames_s * lm.num_codebooks,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "trained_parameters": trained,
        "named_trained": len(stage_parameters(lm, stage)),
        "optimizer_state_gib": opt_bytes / 2**30,
        "losses": [r["loss"] for r in rows],
    }
    trainer.opt = None
    del trainer
    gc.collect()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny random Moshi (CPU smoke run)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--adapter", default="ttt_cache")
    ap.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("bfloat16", "float32"),
        help="weights on CUDA (float32: fp32 weights and AdamW moments, bf16 autocast)",
    )
    ap.add_argument("--conversation", type=int, default=3000, help="Moshi steps per conversation")
    ap.add_argument("--segment", type=int, default=250, help="Moshi steps per segment")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per stage")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    init_distributed()
    rank, world = (
        (torch.distributed.get_rank(), torch.distributed.get_world_size())
        if torch.distributed.is_initialized()
        else (0, 1)
    )
    device = torch.device(a.device if a.device != "cuda" or world == 1 else f"cuda:{rank}")
    a.out.mkdir(parents=True, exist_ok=True)
    lm = build(a.tiny, device, a.adapter, a.dtype)
    total = sum(p.numel() for p in lm.parameters())
    results = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "model": "tiny" if a.tiny else "moshi 7B (random weights)",
        "adapter": a.adapter,
        "parameters": total,
        "conversation": a.conversation,
        "segment": a.segment,
        "dtype": str(next(lm.parameters()).dtype),
        "processes": world,
        "stages": {},
    }
    results["state_bytes_per_segment"] = state_per_segment(
        lm, conversation(lm, a.conversation, 99), a.segment
    )
    for name, stage in STAGES.items():
        print(name, flush=True)
        try:
            r = run_stage(lm, stage, a, device, a.out / "run", world)
        except torch.OutOfMemoryError as e:
            r = {"out_of_memory": str(e).splitlines()[0]}
        results["stages"][name] = r
        lm.zero_grad(set_to_none=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps({k: v for k, v in r.items() if k != "losses"}), flush=True)
    if rank:
        return
    (a.out / "results.json").write_text(json.dumps(results, indent=1))
    lines = [
        f"# Moshi training, {results['model']}, {results['device']}",
        "",
        f"Conversations of {a.conversation} steps in segments of {a.segment}, one per "
        f"process a step, {world} process(es), weights {results['dtype']}, adapter "
        f"`{a.adapter}`; peak and optimizer memory per GPU.",
        "",
        "| stage | trained params | frames/s | tokens/s | peak GiB | optimizer GiB |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results["stages"].items():
        if "out_of_memory" in r:
            lines.append(f"| {name} | out of memory: {r['out_of_memory'][:120]} | | | | |")
            continue
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        lines.append(
            f"| {name} | {r['trained_parameters']:,} | {r['frames_per_s']:.0f} | "
            f"{r['tokens_per_s']:.0f} | {peak} | {r['optimizer_state_gib']:.2f} |"
        )
    sb = results["state_bytes_per_segment"]
    lines += [
        "",
        f"Streaming state of one conversation after each segment: {min(sb):,} to "
        f"{max(sb):,} bytes over {len(sb)} segments.",
    ]
    (a.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
