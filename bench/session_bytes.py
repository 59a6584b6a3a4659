"""Bytes one conversation takes in a SessionStore, per memory kind, from the real streaming state.

    python bench/session_bytes.py --out docs/results/session-bytes-small      # small preset, CPU

For each variant of the preset: stream 1x and 20x the window of random tokens into a batch-1
state, save it to a temporary SessionStore and report the blob bytes (the store's ``bytes``
column, equal to ``session_bytes(state)``) and the state's tensor bytes. With ``--moshi`` (the
default) it also reports the Moshi 7B configuration from the adapter's real LMGen state
(``moshi_ttt.moshi``; built on the meta device, so no weights are allocated), or says why not.
Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moshi_ttt.config import ModelConfig, variant
from moshi_ttt.models.lm import StreamingLM
from moshi_ttt.sessions import SessionStore, identity_of, session_bytes

VARIANTS = (
    "full",
    "window",
    "sink",
    "pooled",
    "infini",
    "ttt_cache",
    "window+ttt4",
    "ttt_cache+ttt4",
)


@torch.no_grad()
def measure(spec: str, preset: str, mults: tuple[int, ...], step: int, store: SessionStore) -> dict:
    torch.manual_seed(0)
    model = StreamingLM(variant(ModelConfig.preset(preset), spec)).eval()
    ident, W = identity_of(model), model.cfg.memory.window
    state, done, rows = model.init_state(1), 0, []
    for m in mults:
        while done < m * W:
            k = min(step, m * W - done)
            model.step(torch.randint(0, model.cfg.vocab_size, (1, k)), state)
            done += k
        info = store.save(f"{spec.replace('+', '.')}-{m}", state, model, identity=ident)
        assert info.bytes == session_bytes(state)
        rows.append({"tokens": done, "blob_bytes": info.bytes, "tensor_bytes": state.nbytes()})
    return {
        "memory": ident.memory,
        "window": W,
        "rows": rows,
        "tensors": len(state.tensors),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def moshi_7b() -> dict:
    """The Moshi 7B LMGen state per adapter preset (bytes of every streaming tensor, batch 1), or
    why not."""
    os.environ.setdefault("NO_TORCH_COMPILE", "1")
    try:
        from moshi.models.lm import LMGen, LMModel
        from moshi.models.loaders import _lm_kwargs

        from moshi_ttt.moshi import PRESET_NAMES, AdapterConfig, patch_lm, unpatch_lm
        from moshi_ttt.moshi.streaming import state_nbytes
    except ImportError as e:
        return {
            "available": False,
            "why": f"moshi_ttt.moshi exposes no state-size function here ({e})",
        }
    lm = LMModel(device="meta", dtype=torch.bfloat16, **_lm_kwargs).eval()
    out = {"available": True, "dtype": "bfloat16", "presets": {}}
    for name in PRESET_NAMES:
        cfg = AdapterConfig.preset(name, num_layers=len(lm.transformer.layers))
        patch_lm(lm, cfg)
        gen = LMGen(lm)
        with gen.streaming(1):
            out["presets"][name] = {
                "adapter": cfg.to_dict(),
                "state_bytes": state_nbytes(gen) + state_nbytes(lm),
            }
        unpatch_lm(lm)
    return out


def markdown(res: dict) -> str:
    a = res["args"]
    lines = [
        "# Session bytes per conversation",
        "",
        f"`{res['command']}` at commit `{res['commit']}`"
        + (f" with modified files {res['modified']}" if res["modified"] else " (no modified files)")
        + f" on {res['device']} (torch {res['torch']}, CPU), {res['seconds']:.0f} s.",
        "",
        f"## `{a['preset']}` preset (StreamingLM, fp32 state)",
        "",
        "Blob bytes: what the SessionStore writes for one conversation (safetensors of the whole "
        "batch-1 state: windows, compressor and fast weights, buffers, positions); tensor bytes: "
        "the "
        "state's tensors alone. Measured after 1x and 20x the window of streamed tokens.",
        "",
        "| variant | memory | window | state tensors | blob bytes at "
        + " / ".join(f"{r['tokens']}" for r in next(iter(res["small"].values()))["rows"])
        + " tokens | tensor bytes | grows |",
        "|---|---|---|---|---|---|---|",
    ]
    for spec, v in res["small"].items():
        blobs = [r["blob_bytes"] for r in v["rows"]]
        lines.append(
            f"| {spec} | {v['memory']} | {v['window']} | {v['tensors']} | "
            + " / ".join(f"{b:,}" for b in blobs)
            + f" | {v['rows'][-1]['tensor_bytes']:,} | "
            + ("yes" if len(set(blobs)) > 1 else "no")
            + " |"
        )
    m = res["moshi7b"]
    lines += ["", "## Moshi 7B (the adapter's LMGen state)", ""]
    if not m["available"]:
        lines.append(f"Not measured: {m['why']}.")
    else:
        lines += [
            "Bytes of every streaming tensor of `LMGen` + `LMModel` at batch 1 (Moshi's KV caches "
            "and the "
            "adapter's states), from `moshi_ttt.moshi.streaming.state_nbytes` on a 7B `LMModel` "
            "built on "
            "the meta device in bf16 (no weights allocated; In-Place TTT fast weights are fp32). "
            "Every "
            "shape is static (LMGen replays CUDA graphs), so this is the size at any conversation "
            "length. "
            "Storing it needs the adapter to hand its named tensors to `SessionStore.put_tensors`; "
            "`moshi_ttt.moshi` does not expose that yet, so there is no blob size here.",
            "",
            "| adapter preset | state bytes per conversation |",
            "|---|---|",
        ]
        lines += [
            f"| {n} | {p['state_bytes']:,} ({p['state_bytes'] / 2**20:,.1f} MiB) |"
            for n, p in m["presets"].items()
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--preset", default="small")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument(
        "--mults", nargs="+", type=int, default=[1, 20], help="tokens streamed, x the window"
    )
    ap.add_argument("--step", type=int, default=256)
    ap.add_argument("--no-moshi", action="store_true", help="skip the Moshi 7B configuration")
    ap.add_argument("--out", type=Path, default=Path("docs/results/session-bytes-small"))
    a = ap.parse_args(argv)
    t0 = time.time()
    src = Path(__file__).resolve().parent.parent
    # noqa: E731
    git = lambda *c: subprocess.run(
        ["git", *c], cwd=src, capture_output=True, text=True
    ).stdout.strip()
    res = {
        "command": "python bench/session_bytes.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": git("rev-parse", "HEAD") or "unknown",
        "modified": git(
            "status", "--porcelain", "--untracked-files=no", "moshi_ttt", "bench"
        ).splitlines(),
        "source": str(Path(__import__("moshi_ttt").__file__).parent),
        "device": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        "small": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        store = SessionStore(tmp)
        for spec in a.variants:
            res["small"][spec] = measure(spec, a.preset, tuple(a.mults), a.step, store)
            print(spec, [r["blob_bytes"] for r in res["small"][spec]["rows"]], flush=True)
    res["moshi7b"] = (
        {"available": False, "why": "skipped (--no-moshi)"} if a.no_moshi else moshi_7b()
    )
    res["seconds"] = time.time() - t0
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    a.out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
