"""Count the kernel launches of one TTT-cache attention step of one token (CPU, no GPU needed): the
PyTorch operators that launch a kernel (views excluded), with each Triton kernel counted once.

    python bench/count_step_ops.py --out docs/results/ttt-cache-step-ops/counts.json

Variants: ``window`` (the plain window memory: the whole model step only), ``reference`` (the
PyTorch step), ``block kernel`` (the Triton block update of ops/ttt_cache_triton.py alone), ``fused
step`` (both kernels of ops/ttt_step_triton.py, the default on CUDA).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import moshi_ttt as mt
from moshi_ttt.ops import ttt_cache_step as step_ops
from moshi_ttt.ops import ttt_cache_triton as block_kernel
from moshi_ttt.ops import ttt_step_triton as step_kernels

NO_LAUNCH = {
    "view",
    "unsqueeze",
    "permute",
    "expand",
    "slice",
    "select",
    "_unsafe_view",
    "transpose",
    "squeeze",
    "alias",
    "detach",
    "t",
    "promote_types",
    "scalar_tensor",
    "empty",
    "new_empty",
    "empty_like",
    "as_strided",
}


class Launches(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NO_LAUNCH:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def count(variant: str, cfg: mt.ModelConfig, prefill: int) -> dict:
    """Launches of one ``attend_step`` after ``prefill`` tokens, as on CUDA: its Triton kernels
    replaced by stand-ins that count as one launch each (their effect on the state does not
    matter for the count), and the block update run whether or not a row completes its block."""
    torch.manual_seed(0)
    if variant == "window":
        cfg = dataclasses.replace(
            cfg, memory=mt.MemoryConfig(kind="window", window=cfg.memory.window)
        )
    model = mt.StreamingLM(cfg).eval()
    mem = model.layers[0].self_attn.memory if variant != "window" else None
    saved = (
        block_kernel.supports,
        block_kernel.complete_block,
        step_kernels.evict_supports,
        step_kernels.evict_step,
        step_kernels.attend_supports,
        step_kernels.attend_one,
        step_ops._updates,
    )
    kernels = collections.Counter()
    try:
        step_ops._updates = lambda done: True  # every step's update, as on CUDA (not skipped)
        block_kernel.supports = lambda *a: variant == "block kernel"
        # its wrapper's one conversion (done to int32), then the kernel
        block_kernel.complete_block = lambda ds, moms, inits, x, y, eta, done, probes, **k: (
            kernels.update(["triton"])
            or done.to(torch.int32)
            .new_empty(0)
            .new_empty(x.shape[0], probes.shape[1], x.shape[-1], dtype=x.dtype)
        )
        step_kernels.evict_supports = step_kernels.attend_supports = lambda *a: (
            variant == "fused step"
        )
        # two launches: the append kernel and the completion kernel
        step_kernels.evict_step = lambda *a, **k: kernels.update(["triton", "triton"])
        step_kernels.attend_one = lambda q, *a, **k: (
            kernels.update(["triton"]) or q.new_empty(q.shape, dtype=torch.float32)
        )
        tokens = torch.randint(0, cfg.vocab_size, (1, prefill + 2))
        with torch.no_grad():
            state = model.init_state(1)
            for t in range(prefill):
                _, state = model.step(tokens[:, t : t + 1], state)
            kernels.clear()
            with Launches() as whole:  # the whole model step (one layer)
                _, state = model.step(tokens[:, prefill : prefill + 1], state)
            step_launches = sum(whole.ops.values()) + kernels["triton"]
            if mem is None:
                return {"variant": variant, "model_step_launches": step_launches}
            inner, mode = mem.attend_step, Launches()

            def counted(*a, **k):
                with mode:
                    return inner(*a, **k)

            mem.attend_step = counted
            kernels.clear()
            model.step(tokens[:, prefill + 1 :], state)
    finally:
        (
            block_kernel.supports,
            block_kernel.complete_block,
            step_kernels.evict_supports,
            step_kernels.evict_step,
            step_kernels.attend_supports,
            step_kernels.attend_one,
            step_ops._updates,
        ) = saved
    ops = dict(mode.ops.most_common())
    return {
        "variant": variant,
        "launches": sum(ops.values()) + kernels["triton"],
        "triton": kernels["triton"],
        "torch_ops": ops,
        "model_step_launches": step_launches,
    }


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--prefill", type=int, default=200, help="tokens streamed before the counted step"
    )
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    # the Moshi 7B preset's TTT-cache layer at a tiny width: window 64, block 16, 8 virtual tokens
    cfg = mt.ModelConfig(
        vocab_size=50,
        dim=128,
        num_layers=1,
        num_heads=4,
        memory=mt.MemoryConfig(
            kind="ttt_cache", window=64, num_virtual=8, block=16, compressor_hidden=32
        ),
    )
    res = {
        "command": "python bench/count_step_ops.py "
        + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "torch": torch.__version__,
        "config": str(cfg.memory),
        "results": [
            count(v, cfg, a.prefill) for v in ("window", "reference", "block kernel", "fused step")
        ],
    }
    for r in res["results"]:
        mem = f"; attention step {r['launches']} ({r['triton']} Triton)" if "launches" in r else ""
        print(f"{r['variant']:>13}: model step {r['model_step_launches']} launches{mem}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
