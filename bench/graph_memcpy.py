"""How CUDA runs the device-to-device copies inside a captured graph: as copy-engine transfers
("Memcpy DtoD") or as driver kernels ("memcpy32_post"), and what each costs per replay.

    python bench/graph_memcpy.py --out graph-memcpy.json      # one GPU, seconds

Each case captures ``--copies`` small contiguous copies (``Tensor.copy_`` of 64 int64, as a
streaming step's counters) between small elementwise kernels, plus what the case adds: nothing,
a Triton kernel, one large copy (``--large-mb``), or an int64 update done as an in-place add
instead of a copy; and the copies alone captured while the profiler already runs (the profiler
may name the same copies differently depending on whether it attached before or after the
capture). Each case runs in a process of its own. Reported per case: the profiler's names of
the copies, microseconds per replay (CUDA events over ``--reps`` replays, which do not depend on
the profiler) and the GPU's idle time between kernels per replay
(``profile_moshi.gaps_before``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from profile_moshi import gaps_before  # bench/ is the script's folder
from step_kernels import captured, replay_us

from moshi_ttt.ops import l2norm_triton


def build(case: str, n: int, large_mb: int, device):
    """The tensors and the step function of one case."""
    src = [torch.arange(64, device=device) + i for i in range(n)]
    dst = [torch.zeros(64, dtype=torch.long, device=device) for _ in range(n)]
    x = torch.randn(4, 8, 1, 128, device=device)
    big = (
        (torch.zeros(large_mb << 18, device=device), torch.ones(large_mb << 18, device=device))
        if case == "large copy"
        else None
    )

    def step():
        for s, d in zip(src, dst):
            s.add_(1)  # a kernel between copies, as in a model step
            if case == "add instead of copy":
                d.mul_(0).add_(s)
            else:
                d.copy_(s)
        if case == "triton kernel":
            l2norm_triton.normalize(x)
        if big is not None:
            big[0].copy_(big[1])

    return step


EARLY = "copies only, profiler attached before the capture"


def run(case: str, a, device) -> dict:
    early = case == EARLY
    step = build("copies only" if early else case, a.copies, a.large_mb, device)
    step()
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
    if early:
        prof.start()
    g = captured(step)  # replays it once
    if not early:
        us = replay_us(g, a.reps)
        prof.start()
    for _ in range(4):
        g.replay()
    torch.cuda.synchronize()
    prof.stop()
    if early:
        us = replay_us(g, a.reps)
    ks = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if early:  # the last 4 of its 5 replays
        ks = sorted(ks, key=lambda k: k.time_range.start)[len(ks) // 5 :]
    names: dict[str, int] = {}
    for k in ks:
        if "emcpy" in k.name or "Memcpy" in k.name:
            names[k.name[:40]] = names.get(k.name[:40], 0) + 1
    idle, _ = gaps_before(ks, 4, top=0)
    return {
        "case": case,
        "us_per_replay": us,
        "copy_names_per_replay": {k: v / 4 for k, v in names.items()},
        "idle_us_per_replay": idle,
    }


CASES = ("copies only", EARLY, "triton kernel", "large copy", "add instead of copy")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="the JSON of all cases (with --case: of that one)")
    p.add_argument("--copies", type=int, default=200)
    p.add_argument("--large-mb", type=int, default=64)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument(
        "--case",
        choices=CASES,
        default=None,
        help="run this case alone, in this process (default: every case, each in a process of its "
        "own, so that no case is captured after another one's profiling)",
    )
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("graph_memcpy.py needs a CUDA device")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": []}
    if a.case is not None:
        res["runs"].append(run(a.case, a, torch.device("cuda")))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            for i, case in enumerate(CASES):
                out = os.path.join(tmp, f"{i}.json")
                opts = ["--copies", str(a.copies), "--large-mb", str(a.large_mb)]
                cmd = [sys.executable, __file__, "--case", case, "--out", out, *opts]
                subprocess.run([*cmd, "--reps", str(a.reps)], check=True)
                with open(out) as f:
                    res["runs"] += json.load(f)["runs"]
    for r in res["runs"]:
        print(json.dumps(r), flush=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
