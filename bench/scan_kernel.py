"""Time the TTT-cache compressor scan (forward + backward) at one layer's training shape on the GPU:
the fused Triton kernels against the reference block loop, in one run, and check they agree.

    cd bench && python scan_kernel.py --rows 4 --heads 8 --seq 8192 --window 256 --block 256 --out
    scan.json
"""

from __future__ import annotations

import argparse
import json

import torch
from profile_ttt import timed  # bench/ is the script's folder
from torch.nn import functional as F

from moshi_ttt.ops import ttt_cache as ops
from moshi_ttt.ops import ttt_scan_triton as tri


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument(
        "--variants",
        nargs="+",
        default=["tf32x3/tf32:8:32:8:16"],
        help="PRECISION[/BACKWARD_PRECISION]:WARPS:CHUNK[:BACKWARD_WARPS:BACKWARD_CHUNK] of the "
        "fused kernels",
    )
    p.add_argument("--out", default=None)
    a = p.parse_args()
    G, N, b, Dh, m = (
        a.rows * a.heads,
        (a.seq - a.window) // a.block,
        a.block,
        a.head_dim,
        2 * a.head_dim,
    )
    torch.manual_seed(0)
    dev = torch.device("cuda")
    inits = tuple(
        t.to(dev).requires_grad_()
        for t in (torch.randn(G, Dh, m) / Dh**0.5, torch.randn(G, m, Dh) / m**0.5)
    )
    ds = tuple(torch.zeros_like(w).requires_grad_() for w in inits)
    keys = F.normalize(torch.randn(G, N, b, Dh, device=dev), dim=-1).requires_grad_()
    vals = torch.randn(G, N, b, Dh, device=dev).requires_grad_()
    eta = (torch.rand(G, N, b, device=dev) / b).requires_grad_()
    apply = torch.ones(G, N, device=dev)
    leaves = [*ds, *inits, keys, vals, eta]
    weights = None
    extra = lambda scan: ("v",) if scan is tri.scan_states else ()

    def run(scan):
        nonlocal weights
        states, _, _ = scan(
            ds, None, inits, keys, vals, eta, apply, 0.0, 0.0, 100.0, 0, *extra(scan)
        )
        weights = weights or [torch.randn_like(s) for s in states]
        return states, torch.autograd.grad(
            sum((w * s).sum() for w, s in zip(weights, states)), leaves
        )

    ref_states, ref_grads = run(ops.scan_states)
    res = {
        "shape": dict(G=G, N=N, b=b, Dh=Dh, m=m),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "reference_ms": timed(lambda: run(ops.scan_states), reps=5),
        "reference_forward_ms": timed(
            lambda: ops.scan_states(ds, None, inits, keys, vals, eta, apply, 0.0, 0.0, 100.0, 0),
            reps=5,
        ),
    }
    for v in a.variants:
        prec, w, ch, *back = v.split(":")
        gw, gch = back or (w, ch)
        tri.PRECISION, tri.NUM_WARPS, tri.CHUNK = prec.split("/")[0], int(w), int(ch)
        tri.GRAD_WARPS, tri.GRAD_CHUNK = int(gw), int(gch)
        tri.GRAD_PRECISION["v"], prec = prec.split("/")[-1], prec.replace("/", "-")
        try:
            states, grads = run(tri.scan_states)
        except Exception as e:  # a variant that does not fit the machine
            res[f"fused_{prec}_w{w}_c{ch}_gw{gw}_gc{gch}"] = {"error": str(e)[:200]}
            continue
        err = max(
            (x - y).abs().max().item() / (y.abs().max().item() + 1e-12)
            for x, y in zip(states + grads, ref_states + ref_grads)
        )
        res[f"fused_{prec}_w{w}_c{ch}_gw{gw}_gc{gch}"] = {
            "ms": timed(lambda: run(tri.scan_states), reps=5),
            "max_rel_err": err,
            "forward_ms": timed(
                lambda: tri.scan_states(
                    ds, None, inits, keys, vals, eta, apply, 0.0, 0.0, 100.0, 0
                ),
                reps=5,
            ),
        }
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
