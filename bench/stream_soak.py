"""Stream many tokens through a TTT-cache model: every state finite, constant state bytes, flat
ms/token (timed per thousand tokens in one run).

    python bench/stream_soak.py --tokens 100000 --out docs/results/ttt-cache-soak-cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import moshi_ttt as mt
from bench import git_commit


def soak(model, tokens: int, step: int, adversarial: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    state = model.init_state(1)
    per_thousand, sizes, finite, t0, done = [], {}, True, time.perf_counter(), 0
    with torch.no_grad():
        while done < tokens:
            if adversarial and (done // 1000) % 2:  # alternate random and repeated-token stretches
                x = torch.full((1, step), int(torch.randint(0, 256, (1,), generator=g)))
            else:
                x = torch.randint(0, 256, (1, step), generator=g)
            logits, state = model.step(x, state)
            done += step
            if done % 1000 == 0:
                per_thousand.append((time.perf_counter() - t0) * 1e3 / 1000)
                t0 = time.perf_counter()
                finite &= bool(torch.isfinite(logits).all()) and all(
                    bool(torch.isfinite(t.float()).all()) for t in state.tensors.values()
                )
            if done in (1000, tokens):
                sizes[done] = state.nbytes()
    return {"ms_per_token_per_thousand": per_thousand, "state_bytes": sizes, "all_finite": finite}


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--step", type=int, default=1, help="tokens per streaming step")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--block", type=int, default=16)
    p.add_argument(
        "--inputs", nargs="+", default=["random", "adversarial"], choices=["random", "adversarial"]
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--commit", default=None)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = mt.ModelConfig.preset(
        "tiny", memory=mt.MemoryConfig(kind="ttt_cache", window=a.window, block=a.block)
    )
    model = mt.StreamingLM(cfg).eval()
    adv = mt.StreamingLM(cfg).eval()
    adv.load_state_dict(model.state_dict())
    with torch.no_grad():
        adv.emb.weight.mul_(1e4)  # huge embeddings
    runs = {
        name: soak(adv if name == "adversarial" else model, a.tokens, a.step, name == "adversarial")
        for name in a.inputs
    }
    info = {
        "command": "python bench/stream_soak.py " + " ".join(argv or __import__("sys").argv[1:]),
        "device": f"CPU {platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "commit": a.commit or git_commit(),
        "config": cfg.to_dict(),
        "runs": runs,
    }
    lines = [
        f"# TTT-cache streaming soak: {a.tokens:,} tokens, {a.step} token(s) per step",
        "",
        f"Device: {info['device']}; torch {info['torch']}; commit {info['commit']}; preset `tiny` "
        "with "
        f"`ttt_cache` (window {a.window}, block {a.block}). Command: `{info['command']}`",
        "",
        "| input | all states finite | state bytes after 1k | after last | ms/token, 1st thousand "
        "| last thousand | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        first, last = r["ms_per_token_per_thousand"][0], r["ms_per_token_per_thousand"][-1]
        lines.append(
            f"| {name} | {r['all_finite']} | {r['state_bytes'][1000]:,} | "
            f"{r['state_bytes'][a.tokens]:,} | "
            f"{first:.3f} | {last:.3f} | {last / first:.2f} |"
        )
    print("\n".join(lines))
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        tag = "-".join(a.inputs)
        (a.out / f"soak-{tag}.json").write_text(json.dumps(info, indent=1))
        (a.out / f"soak-{tag}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
