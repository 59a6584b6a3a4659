"""Compile the project's Triton kernels for a GPU target without a GPU (Triton's ahead-of-time path
and the ptxas it ships) and report each one's registers, spill stack and shared memory per block.

    python bench/compile_kernels.py --out docs/results/kernel-compile-sm90/compile.json

This shows whether a kernel fits an H100 (sm_90, 232,448 bytes of shared memory per block) before
any device time is spent. It does not run them: correctness is the tests' job.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from moshi_ttt.ops import l2norm_triton as l2_k
from moshi_ttt.ops import ttt_cache_triton as cache_k
from moshi_ttt.ops import ttt_scan_triton as scan_k
from moshi_ttt.ops import ttt_step_triton as step_k

SHARED_LIMIT = 232448  # bytes per block on an H100


def source(fn, types: dict, consts: dict) -> ASTSource:
    """Pointers are fp32 unless ``types`` says otherwise; constexprs from ``consts``."""
    sig = {}
    for p in fn.params:
        name = p.name
        sig[name] = "constexpr" if p.is_constexpr else types.get(name, "*fp32")
    return ASTSource(fn, sig, consts)


F32S = {n: "fp32" for n in ("decay", "momentum", "max_norm", "eta_scale", "scale")}
SCAN_INTS = {"n": "i32", "N": "i32", "k": "i32", "bptt": "i32", "apply": "*i32", "count": "*i32"}


def scan_sweep(block: int, warps: list[int], chunks: list[int]) -> list:
    """(name, shape, source, num_warps) of the training scan's block kernels (forward, backward in
    TF32) at the `small` preset's compressor (Dh 64, hidden 128) and ``block``, with the
    benchmark's options (forgetting on, no momentum), for every warps x token chunk <= block."""
    out = []
    for name, fn, prec in (
        ("scan_fwd_block", scan_k._fwd_block, scan_k.PRECISION),
        ("scan_bwd_block", scan_k._bwd_block, scan_k.GRAD_PRECISION["tf32"]),
    ):
        for nw in warps:
            for ch in (c for c in chunks if c <= block):
                consts = dict(BLK=block, DH=64, MH=128, HAS_MOM=False, HAS_DECAY=True)
                consts.update(CH=ch, NC=block // ch, PREC=prec)
                shape = f"small, block {block}, chunk {ch}"
                out.append((name, shape, source(fn, {**SCAN_INTS, **F32S}, consts), nw))
    return out


def kernels() -> list:
    """(name, shape, source, num_warps) at the `small` preset's and the Moshi 7B preset's shapes."""
    out = []
    for label, Dh, m, b, M in (("small", 64, 128, 256, 4), ("moshi7b", 128, 32, 16, 8)):
        MP = max(16, 1 << (M - 1).bit_length())
        common = dict(BLK=b, CH=min(b, 32), DH=Dh, MH=m, M=M, MP=MP, HAS_MOM=False, HAS_DECAY=False)
        nw = 4 if Dh * m <= 4096 else 8
        out.append(
            (
                "complete_block",
                label,
                source(cache_k._complete_kernel, {**F32S, "done": "*i32"}, {**common, "HC": 8}),
                nw,
            )
        )
        counters = {"arrive": "*i32", "rows": "*i32", "nrows": "*i32", "finished": "*i32"}
        out.append(
            (
                "evict_step: append",
                label,
                source(
                    step_k._append_kernel,
                    {
                        **F32S,
                        **counters,
                        "kraw": "*bf16",
                        "cv": "*bf16",
                        "valid": "*i1",
                        "ecount": "*i64",
                        "updates": "*i64",
                    },
                    dict(H=8, BLK=b, DH=Dh),
                ),
                1 if Dh <= 128 else 2,
            )
        )
        out.append(
            (
                "evict_step: complete rows",
                label,
                source(
                    step_k._complete_rows_kernel,
                    {**F32S, **counters, "P": "i32"},
                    {**common, "H": 8, "KC": step_k.vkey_chunk(Dh), "ROTATE": True},
                ),
                nw,
            )
        )
    for label, W, Dh, M in (("small", 256, 64, 4), ("moshi7b", 64, 128, 8)):
        out.append(
            (
                "attend_one",
                label,
                source(
                    step_k._attend_kernel,
                    {
                        "q": "*bf16",
                        "qr": "*bf16",
                        "rk": "*bf16",
                        "rv": "*bf16",
                        "kpos": "*i64",
                        "has": "*i1",
                        "scale": "fp32",
                    },
                    dict(
                        H=8,
                        W=W,
                        WC=step_k.ATTEND_CHUNK,
                        DH=Dh,
                        M=M,
                        MP=max(16, 1 << (M - 1).bit_length()),
                        GATE=True,
                        DECAY=True,
                    ),
                ),
                step_k.ATTEND_WARPS,
            )
        )
    chunk = dict(BLK=256, DH=64, MH=128, HAS_MOM=True, HAS_DECAY=True)
    flags = dict(NC=8, DH=64, MH=128, HAS_MOM=True, HAS_DECAY=True)
    for name, fn, ch, nw, prec in (
        ("scan_fwd_block", scan_k._fwd_block, scan_k.CHUNK, scan_k.NUM_WARPS, scan_k.PRECISION),
        (
            "scan_bwd_block",
            scan_k._bwd_block,
            scan_k.GRAD_CHUNK,
            scan_k.GRAD_WARPS,
            scan_k.GRAD_PRECISION["tf32"],
        ),
    ):
        out.append(
            (
                name,
                "small",
                source(
                    fn, {**SCAN_INTS, **F32S}, {**chunk, "CH": ch, "NC": 256 // ch, "PREC": prec}
                ),
                nw,
            )
        )
    norm = dict(EPS=l2_k.EPS, ROWS=l2_k.ROWS, D=64)
    out += [
        ("l2norm_fwd", "small", source(l2_k._fwd, {"x": "*bf16", "R": "i32"}, norm), 4),
        ("l2norm_bwd", "small", source(l2_k._bwd, {"dx": "*bf16", "R": "i32"}, norm), 4),
    ]
    out.append(
        (
            "scan_bwd_state",
            "small",
            source(scan_k._bwd_state, {**SCAN_INTS, **F32S}, flags),
            scan_k.STATE_WARPS,
        )
    )
    return out


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--out", default=None)
    p.add_argument(
        "--scan-block",
        type=int,
        default=None,
        help="compile only the training scan's block kernels at this block, over --scan-warps x "
        "--scan-chunks",
    )
    p.add_argument("--scan-warps", default="4,8,16")
    p.add_argument("--scan-chunks", default="16,32,64")
    a = p.parse_args(argv)
    ints = lambda text: [int(x) for x in text.split(",") if x]
    todo = (
        scan_sweep(a.scan_block, ints(a.scan_warps), ints(a.scan_chunks))
        if a.scan_block
        else kernels()
    )
    os.environ.pop("TRITON_INTERPRET", None)
    target = GPUTarget("cuda", a.arch, 32)
    cuobjdump = os.path.join(
        os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"
    )
    rows, ok = [], True
    for name, shape, src, nw in todo:
        t0 = time.time()
        k = triton.compile(src, target=target, options=dict(num_warps=nw))
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            usage = subprocess.run(
                [cuobjdump, "-res-usage", f.name], capture_output=True, text=True
            ).stdout
            sass = subprocess.run(
                [cuobjdump, "-sass", f.name], capture_output=True, text=True
            ).stdout
        m = re.search(r"REG:(\d+).*?STACK:(\d+)", usage, re.S)
        row = {
            "kernel": name,
            "shape": shape,
            "num_warps": nw,
            "registers": int(m[1]),
            "spill_stack_bytes": int(m[2]),
            "shared_bytes": k.metadata.shared,
            # local-memory loads and stores in the machine code (spills)
            "local_loads": len(re.findall(r"\bLDL\b", sass)),
            "local_stores": len(re.findall(r"\bSTL\b", sass)),
            "fits": k.metadata.shared <= SHARED_LIMIT,
            "compile_s": round(time.time() - t0, 1),
        }
        ok &= row["fits"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    res = {
        "command": "python bench/compile_kernels.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "triton": triton.__version__,
        "arch": f"sm_{a.arch}",
        "shared_limit": SHARED_LIMIT,
        "kernels": rows,
    }
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
