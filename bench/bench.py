"""Benchmark: parallel training tokens/s and streaming ms/token per memory kind.

    python bench/bench.py --preset tiny --device cpu
    python bench/bench.py --preset small --device cuda --dtype bf16 --seq 8192 --out
    docs/results/bench-small

Every kind is measured in the same run, so ratios between kinds are comparable.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

import moshi_ttt as mt
from moshi_ttt.graph import GraphedStep
from moshi_ttt.ops.impl import PARTS, implementation


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device, dtype):
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def bench_train(model, device, dtype, batch, seq, steps, warmup=2):
    """Tokens/s of forward + backward + AdamW step at [batch, seq]; peak GPU memory."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, model.cfg.vocab_size, (batch, seq + 1), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        with autocast(device, dtype):
            logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {"train_tokens_per_s": batch * seq * steps / dt, "train_peak_bytes": peak}


@torch.no_grad()
def bench_stream(model, device, dtype, prefill, tokens):
    """Streaming ms/token at batch 1, one token per step, after ``prefill`` tokens."""
    state = model.init_state(1, dtype=torch.bfloat16 if dtype == "bf16" else None)
    x = torch.randint(0, model.cfg.vocab_size, (1, prefill + tokens + 8), device=device)
    with autocast(device, dtype):
        for t in range(0, prefill, 256):
            _, state = model.step(x[:, t : min(t + 256, prefill)], state)
        for t in range(prefill, prefill + 8):  # warm-up
            _, state = model.step(x[:, t : t + 1], state)
        sync(device)
        t0 = time.perf_counter()
        for t in range(prefill + 8, prefill + 8 + tokens):
            _, state = model.step(x[:, t : t + 1], state)
        sync(device)
    return {
        "stream_ms_per_token": (time.perf_counter() - t0) * 1e3 / tokens,
        "state_bytes": state.nbytes(),
        "stream_prefill": prefill,
    }


def variant_config(base: mt.ModelConfig, variant: str, chunk: int) -> mt.ModelConfig:
    return mt.config.variant(base, variant, chunk)


@torch.no_grad()
def bench_stream_graph(model, device, dtype, prefill, tokens):
    """Streaming ms/token at batch 1 with the one-token step captured once as a CUDA graph."""
    state = model.init_state(1, dtype=torch.bfloat16 if dtype == "bf16" else None)
    x = torch.randint(0, model.cfg.vocab_size, (1, prefill + tokens), device=device)
    with autocast(device, dtype):
        for t in range(0, prefill, 256):
            _, state = model.step(x[:, t : min(t + 256, prefill)], state)
        step = GraphedStep(model, state)
    for t in range(8):  # warm-up replays
        step(x[:, prefill + t : prefill + t + 1])
    sync(device)
    t0 = time.perf_counter()
    for t in range(tokens):
        step(x[:, prefill + t : prefill + t + 1])
    sync(device)
    return {"stream_graph_ms_per_token": (time.perf_counter() - t0) * 1e3 / tokens}


def git_commit() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent,
            ).stdout.strip()
            or "unknown"
        )
    except OSError:
        return "unknown"


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="tiny", choices=sorted(mt.PRESETS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument(
        "--kinds",
        nargs="+",
        default=["full", "window"],
        help="variants: a memory kind, optionally +tttN for In-Place TTT in every N-th layer",
    )
    p.add_argument("--ttt-chunk", type=int, default=512)
    p.add_argument(
        "--repeats", type=int, default=1, help="measure every variant this many times, interleaved"
    )
    p.add_argument("--no-stream", action="store_true", help="skip the streaming measurement")
    p.add_argument(
        "--graph", action="store_true", help="also time streaming as a replayed CUDA graph"
    )
    p.add_argument(
        "--block", type=int, default=None, help="ttt_cache: evicted tokens per compressor update"
    )
    p.add_argument(
        "--compile-scan",
        action="store_true",
        help="ttt_cache: torch.compile each compressor update",
    )
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--prefill", type=int, default=1024)
    p.add_argument("--stream-tokens", type=int, default=100)
    p.add_argument("--commit", default=None, help="commit to record (default: git rev-parse here)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument(
        "--reference-step",
        action="store_true",
        help="ttt_cache: one-token steps through the PyTorch reference on CUDA (default: "
        "ops/ttt_step_triton.py); the same as --reference step",
    )
    p.add_argument(
        "--reference",
        nargs="+",
        default=[],
        choices=PARTS,
        help="parts that run their PyTorch reference (moshi_ttt.ops.impl.PARTS)",
    )
    a = p.parse_args(argv)
    device = torch.device(a.device)
    base = mt.ModelConfig.preset(a.preset)
    rows = []
    reference = set(a.reference) | ({"step"} if a.reference_step else set())
    with implementation(reference=reference):
        for rep in range(a.repeats):
            for kind in a.kinds:
                cfg = variant_config(base, kind, a.ttt_chunk)
                if a.block or a.compile_scan:
                    cfg = dataclasses.replace(
                        cfg,
                        memory=dataclasses.replace(
                            cfg.memory,
                            block=a.block or cfg.memory.block,
                            compile_scan=a.compile_scan,
                        ),
                    )
                torch.manual_seed(0)
                model = mt.StreamingLM(cfg).to(device)
                evicting = cfg.memory.kind in ("ttt_cache", "pooled", "infini")
                row = {
                    "kind": kind,
                    "window": cfg.memory.window,
                    "repeat": rep,
                    "block": cfg.memory.block if evicting else None,
                    "params": sum(p.numel() for p in model.parameters()),
                }
                row.update(
                    bench_train(model.train(), device, a.dtype, a.batch, a.seq, a.train_steps)
                )
                if not a.no_stream:
                    row.update(
                        bench_stream(model.eval(), device, a.dtype, a.prefill, a.stream_tokens)
                    )
                if a.graph and not kind.startswith("full"):
                    row.update(
                        bench_stream_graph(
                            model.eval(), device, a.dtype, a.prefill, a.stream_tokens
                        )
                    )
                rows.append(row)
                print(json.dumps(row), flush=True)
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    info = {
        "command": "python bench/bench.py "
        + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU {platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "commit": a.commit or git_commit(),
        "preset": a.preset,
        "dtype": a.dtype,
        "reference": sorted(reference),
        "seq": a.seq,
        "batch": a.batch,
        "params": rows[0]["params"],
        "results": rows,
    }
    ref = rows[0]
    lines = [
        f"# Benchmark: preset `{a.preset}`, {a.dtype}, sequence {a.seq}, batch {a.batch}",
        "",
        "Variants: memory kind, `+tttN` = In-Place TTT in every N-th layer (`/tf32`: TF32 "
        "products, "
        "fp32 sums and state; otherwise IEEE fp32) "
        f"(chunk {a.ttt_chunk}). Rows repeat the variants in turn ({a.repeats}x).",
        "",
        f"Device: {info['device']}; torch {info['torch']}; commit {info['commit']}; "
        f"{info['params'] / 1e6:.1f}M parameters.",
        "",
        f"Command: `{info['command']}`",
        "",
        "| memory | window | train tokens/s | vs first | train peak GB | stream ms/token (batch 1) "
        "| state bytes "
        "| CUDA-graph stream ms/token |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = f"{r['train_peak_bytes'] / 1e9:.2f}" if r["train_peak_bytes"] else "n/a"
        stream = (
            f"{r['stream_ms_per_token']:.2f} | {r['state_bytes']:,}"
            if "stream_ms_per_token" in r
            else "- | -"
        )
        lines.append(
            f"| {r['kind']} | {r['window'] if not r['kind'].startswith('full') else '-'} | "
            f"{r['train_tokens_per_s']:,.0f} | "
            f"{r['train_tokens_per_s'] / ref['train_tokens_per_s']:.2f}x | "
            f"{peak} | {stream} | {r.get('stream_graph_ms_per_token', float('nan')):.3f} |"
        )
    lines += [
        "",
        f"Streaming is measured one token per step after a prefill of {a.prefill} tokens, eager, "
        "and (last column, where measured) as a replayed CUDA graph of the one-token step."
        + (f" TTT cache block: {a.block} evicted tokens per update." if a.block else "")
        + (" Compressor updates through torch.compile." if a.compile_scan else "")
        + (f" Parts through their reference: {', '.join(sorted(reference))}." if reference else ""),
    ]
    print("\n".join(lines))
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "bench.json").write_text(json.dumps(info, indent=2))
        (a.out / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
