"""Training peak GPU memory vs sequence length, per variant (must grow linearly in T).

python bench/peak_memory.py --preset small --kinds full full+ttt4 --seqs 4096 8192 16384 32768
--out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import moshi_ttt as mt
from bench import bench_train, git_commit, variant_config


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="small", choices=sorted(mt.PRESETS))
    p.add_argument("--kinds", nargs="+", default=["full", "full+ttt4"])
    p.add_argument("--seqs", nargs="+", type=int, default=[4096, 8192, 16384, 32768])
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--ttt-chunk", type=int, default=512)
    p.add_argument("--commit", default=None)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    device = torch.device("cuda")
    base = mt.ModelConfig.preset(a.preset)
    rows = []
    for kind in a.kinds:
        for seq in a.seqs:
            torch.manual_seed(0)
            model = mt.StreamingLM(variant_config(base, kind, a.ttt_chunk)).to(device).train()
            torch.cuda.empty_cache()
            r = bench_train(model, device, a.dtype, 1, seq, steps=1, warmup=1)
            rows.append(
                {
                    "kind": kind,
                    "seq": seq,
                    "peak_bytes": r["train_peak_bytes"],
                    "tokens_per_s": r["train_tokens_per_s"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            del model
    lines = [
        f"# Training peak memory vs sequence length: preset `{a.preset}`, {a.dtype}, batch 1",
        "",
        f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}; commit "
        f"{a.commit or git_commit()}; "
        f"In-Place TTT chunk {a.ttt_chunk}.",
        "",
        "Peak = `torch.cuda.max_memory_allocated` over one forward + backward + AdamW step "
        "(weights, "
        "optimizer state and activations). Linear growth: the increment per token is the same "
        "between "
        "every pair of lengths.",
        "",
        "| variant | "
        + " | ".join(f"T={s}" for s in a.seqs)
        + " | MB per 1k tokens between successive T |",
        "|---|" + "---|" * (len(a.seqs) + 1),
    ]
    for kind in a.kinds:
        peaks = [r["peak_bytes"] for r in rows if r["kind"] == kind]
        slopes = np.diff(peaks) / np.diff(a.seqs) * 1000 / 1e6
        lines.append(
            f"| {kind} | "
            + " | ".join(f"{b / 1e9:.2f} GB" for b in peaks)
            + " | "
            + ", ".join(f"{x:.1f}" for x in slopes)
            + " |"
        )
    print("\n".join(lines))
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "peak_memory.json").write_text(
            json.dumps(
                {"rows": rows, "device": torch.cuda.get_device_name(), "torch": torch.__version__},
                indent=2,
            )
        )
        (a.out / "peak_memory.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
