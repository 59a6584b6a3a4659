"""Count the kernel launches of one TTT-cache attention step of one token (CPU, no GPU needed): the
PyTorch operators that launch a kernel (views excluded), with each Triton kernel counted once.

    python bench/count_step_ops.py --moshi window64 ttt_cache \
        --out docs/results/ttt-cache-step-ops/counts.json

Variants: ``window`` (the plain window memory: the whole model step only), ``reference`` (the
PyTorch step), ``block kernel`` (the Triton block update of ops/ttt_cache_triton.py alone), ``fused
step`` (both kernels of ops/ttt_step_triton.py, the default on CUDA). ``--moshi``: the
launches of the attention layers in one frame of a Moshi with the 7B's layout (``moshi_frame``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
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


@contextlib.contextmanager
def stand_ins(variant: str, kernels: collections.Counter):
    """Inside: the TTT cache's Triton kernels replaced by stand-ins that count one launch each in
    ``kernels`` (their effect on the state does not matter for a count), those of ``variant``
    taken ("block kernel", "fused step"; others: the PyTorch step), and the block update run in
    every step whether or not a row completes its block, as on CUDA."""
    saved = (
        block_kernel.supports,
        block_kernel.complete_block,
        step_kernels.evict_supports,
        step_kernels.evict_step,
        step_kernels.attend_supports,
        step_kernels.attend_one,
        step_ops._updates,
    )
    try:
        step_ops._updates = lambda done: True
        block_kernel.supports = lambda *a: variant == "block kernel"
        # its wrapper's one conversion (done to int32), then the kernel
        block_kernel.complete_block = lambda ds, moms, inits, x, y, eta, done, probes, **k: (
            kernels.update(["triton"])
            or done.to(torch.int32).new_empty(0).numel()
            or _zeros((x.shape[0], probes.shape[1], x.shape[-1]), x.dtype)
        )
        step_kernels.evict_supports = step_kernels.attend_supports = lambda *a: (
            variant == "fused step"
        )
        # two launches: the append kernel and the completion kernel
        step_kernels.evict_step = lambda *a, **k: kernels.update(["triton", "triton"])
        step_kernels.attend_one = lambda q, *a, **k: (
            kernels.update(["triton"]) or _zeros(tuple(q.shape), torch.float32)
        )
        yield
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


def count(variant: str, cfg: mt.ModelConfig, prefill: int) -> dict:
    """Launches of one ``attend_step`` after ``prefill`` tokens, as on CUDA (``stand_ins``)."""
    torch.manual_seed(0)
    if variant == "window":
        cfg = dataclasses.replace(
            cfg, memory=mt.MemoryConfig(kind="window", window=cfg.memory.window)
        )
    model = mt.StreamingLM(cfg).eval()
    mem = model.layers[0].self_attn.memory if variant != "window" else None
    kernels = collections.Counter()
    with stand_ins(variant, kernels), torch.no_grad():
        tokens = torch.randint(0, cfg.vocab_size, (1, prefill + 2))
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
        mem.attend_step = lambda *a, **k: _count(mode, inner, *a, **k)
        kernels.clear()
        model.step(tokens[:, prefill + 1 :], state)
    ops = dict(mode.ops.most_common())
    return {
        "variant": variant,
        "launches": sum(ops.values()) + kernels["triton"],
        "triton": kernels["triton"],
        "torch_ops": ops,
        "model_step_launches": step_launches,
    }


def moshi_frame(variant: str, dtype: torch.dtype, frames: int = 70) -> dict:
    """Launches of the main transformer's attention layers in one LMGen frame after ``frames``
    (past the 64-step window), batch 1: a Moshi of the 7B's layout (32 layers, 8 depformer steps)
    at a tiny width, as ``moshi_bench.py``'s ``variant`` (window64: stock attention; ttt_cache:
    the preset with the fused step, ``stand_ins``)."""
    from moshi.models.lm import LMGen, LMModel
    from moshi_bench import user_tokens
    from moshi_bench import variant as patched

    from moshi_ttt.moshi.config import tiny_lm_kwargs

    kw = tiny_lm_kwargs(dim=128, num_heads=2, num_layers=32, n_q=16, dep_q=8)
    kw.update(depformer_num_layers=6, depformer_context=8, delays=[0] + [0, 1] * 8)
    torch.manual_seed(0)
    lm = LMModel(**kw).eval().to(dtype)
    kernels, mode, cpu = collections.Counter(), Launches(), torch.device("cpu")
    with stand_ins("fused step", kernels), torch.no_grad(), patched(lm, variant):
        for a in (layer.self_attn for layer in lm.transformer.layers):
            a.forward = lambda *x, _f=a.forward, **k: _count(mode, _f, *x, **k)
        gen = LMGen(lm, temp=0.8, temp_text=0.7)
        with gen.streaming(1):
            for _ in range(frames):
                gen.step(user_tokens(lm, 1, cpu))
            mode.ops.clear()
            kernels.clear()
            gen.step(user_tokens(lm, 1, cpu))
        for layer in lm.transformer.layers:
            del layer.self_attn.forward
    return {
        "variant": variant,
        "dtype": str(dtype).removeprefix("torch."),
        "attention_launches": sum(mode.ops.values()) + kernels["triton"],
        "triton": kernels["triton"],
    }


def _zeros(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A stand-in's output: zeros made once per shape (made before the counted step, as the
    streamed steps before it make them, so they launch nothing there)."""
    if (shape, dtype) not in _ZEROS:
        _ZEROS[shape, dtype] = torch.zeros(shape, dtype=dtype)
    return _ZEROS[shape, dtype]


_ZEROS: dict = {}


def _count(mode: Launches, fn, *args, **kwargs):
    with mode:
        return fn(*args, **kwargs)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--prefill", type=int, default=200, help="tokens streamed before the counted step"
    )
    p.add_argument("--out", default=None)
    p.add_argument(
        "--moshi",
        nargs="*",
        default=[],
        help="also count one LMGen frame's attention launches for these moshi_bench variants "
        "(e.g. window64 ttt_cache), fp32 and bf16",
    )
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
    if a.moshi:
        res["moshi_frame"] = [
            moshi_frame(v, d) for d in (torch.float32, torch.bfloat16) for v in a.moshi
        ]
        for r in res["moshi_frame"]:
            print(
                f"Moshi frame, {r['variant']}, {r['dtype']}: {r['attention_launches']} launches "
                f"in the attention layers ({r['triton']} Triton)"
            )
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
