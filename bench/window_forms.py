"""Time the window kind's attention forms, forward and backward, at several lengths T and windows
W: the dense [B, T, T] mask against the banded chunks (and FlexAttention on CUDA), on one device.
This is what ``ops.window_attention.BANDED_MIN`` (the length, in windows, from which "auto" takes
the banded form) rests on.

    python bench/window_forms.py --device cpu --out window_forms.json
    python bench/window_forms.py --device cuda --dtype bf16 --heads 8 --head-dim 64 \
        --shapes 8192:256 --out window_forms_cuda.json
"""

from __future__ import annotations

import argparse
import functools
import json

import torch
from profile_cache import timed  # bench/ is the script's folder
from tqdm import tqdm

from moshi_ttt.ops.masks import segment_positions
from moshi_ttt.ops.window_attention import window_attention

SHAPES = "256:64,512:64,1024:64,192:32,256:32,768:32"  # T:W


def _step(qkv, pos, W: int, form: str) -> None:
    """One forward and backward of the window attention in ``form``."""
    window_attention(*qkv, pos, None, "window", W, impl=form).sum().backward()


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--shapes", default=SHAPES, help="comma-separated T:W pairs")
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES), help="of q, k and v")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    shapes = [tuple(int(v) for v in s.split(":")) for s in a.shapes.split(",")]
    if any(T < 1 or W < 1 for T, W in shapes):
        p.error(f"--shapes: T and W must be >= 1, got {a.shapes}")
    forms = ["dense", "banded"] + (["flex"] if dev.type == "cuda" else [])
    rows = []
    for T, W in tqdm(shapes, desc="shapes"):
        qkv = [
            torch.randn(
                a.batch, a.heads, T, a.head_dim, device=dev, dtype=DTYPES[a.dtype]
            ).requires_grad_()
            for _ in range(3)
        ]
        pos, _ = segment_positions(None, a.batch, T, dev)
        ms = {f: timed(functools.partial(_step, qkv, pos, W, f), dev, a.reps) for f in forms}
        rows.append({"T": T, "W": W, "T_over_W": T / W, **{f"{f}_ms": ms[f] for f in forms}})
        tqdm.write(" ".join(f"{k}={v:.3g}" for k, v in rows[-1].items()))
    out = {
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "threads": torch.get_num_threads(),
        "batch": a.batch,
        "heads": a.heads,
        "head_dim": a.head_dim,
        "dtype": a.dtype,
        "results": rows,
    }
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    print("| T | W | T / W | " + " | ".join(f"{f} ms" for f in forms) + " |")
    print("|---" * (3 + len(forms)) + "|")
    for r in rows:
        cells = " | ".join(f"{r[f + '_ms']:.2f}" for f in forms)
        print(f"| {r['T']} | {r['W']} | {r['T_over_W']:g} | {cells} |")
    return out


if __name__ == "__main__":
    main()
