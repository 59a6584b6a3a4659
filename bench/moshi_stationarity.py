"""Fast-weight norms of the Moshi adapter on a long stream: a tiny Moshi with random weights (new
parameters moved off their initial values, as after training), patched with an adapter preset,
streams random codes for ``--steps`` steps; the largest norm of In-Place TTT's sum ``s`` and of the
TTT cache's compressor weights ``W_l = W_l_init + d_l`` (over rows, heads and layers) is recorded
at powers of two and at the end, for the preset as it is and with each ``--variant`` of settings.

    python bench/moshi_stationarity.py --steps 100000 --out docs/results/stationarity/moshi-tiny

Writes ``moshi_norms.json`` and ``moshi_norms.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from stationarity import parse_setting  # bench/stationarity.py (run as a script from bench/)
from tqdm import tqdm

from moshi_ttt.moshi.adapter import patch_lm
from moshi_ttt.moshi.config import AdapterConfig, tiny_lm_kwargs


def fast_weight_norms(lm) -> dict[str, float]:
    """{"layer{i}.ttt.s" | "layer{i}.W{j}": largest Frobenius norm over rows and heads}."""
    out = {}
    for i, layer in enumerate(lm.transformer.layers):
        g = layer.gating
        st = getattr(g, "_streaming_state", None)
        if st is not None and "s" in st.tensors.tensors:
            s = st.tensors["s"].float()  # [B, d, h]
            out[f"layer{i}.ttt.s"] = s.flatten(1).norm(dim=-1).max().item()
        attn = layer.self_attn
        mem = getattr(attn, "memory", None)
        if hasattr(mem, "inits") and attn._streaming_state is not None:
            t = attn._streaming_state.tensors.tensors  # {name: tensor}
            for j, init in enumerate(mem.inits(), start=1):
                w = t[f"d{j}"].float() + init.float()  # [B, hc, d_in, d_out]
                out[f"layer{i}.W{j}"] = w.flatten(2).norm(dim=-1).max().item()
    return out


def lively(lm, seed: int = 0):
    """The adapter's new parameters away from their initial values (targets, gates, step sizes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith("target_conv") or name.endswith("memory.lr_w"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif name.endswith("target_proj"):
                p.copy_(3 * torch.eye(p.shape[0]))
            elif name.endswith("memory.gate"):
                p.copy_(torch.randn(p.shape, generator=g))
    return lm


def stream_norms(cfg: AdapterConfig, steps: int, chunk: int, seed: int = 0) -> dict:
    """Norms after 2^k steps (k >= 8) and after ``steps``, one conversation of random codes."""
    from moshi.models.lm import LMModel

    torch.manual_seed(seed)
    lm = lively(patch_lm(LMModel(**tiny_lm_kwargs()).eval(), cfg), seed)
    g = torch.Generator().manual_seed(seed + 1)
    marks = sorted({2**k for k in range(8, steps.bit_length()) if 2**k <= steps} | {steps})
    rows, done, t0 = [], 0, time.perf_counter()
    card, text_card = lm.card, lm.text_card
    with torch.no_grad(), lm.streaming(1), tqdm(total=steps, desc="stream", unit="step") as bar:
        while done < steps:
            k = min(chunk, steps - done, min(m for m in marks if m > done) - done)
            codes = torch.randint(0, card, (1, lm.num_codebooks, k), generator=g)
            codes[:, 0] = torch.randint(0, text_card, (1, k), generator=g)
            lm.forward_text(codes)
            done += k
            bar.update(k)
            if done in marks:
                norms = fast_weight_norms(lm)
                if not all(torch.isfinite(torch.tensor(v)) for v in norms.values()):
                    raise FloatingPointError(f"a fast weight is not finite after {done} steps")
                fam = {
                    f: [v for k, v in norms.items() if (".ttt." in k) == (f == "inplace_ttt")]
                    for f in ("inplace_ttt", "ttt_cache")
                }
                rows.append(
                    {"steps": done, **{f: max(v) for f, v in fam.items() if v}, "norms": norms}
                )
    return {"rows": rows, "seconds": time.perf_counter() - t0}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    titles = {
        "inplace_ttt": "In-Place TTT: sum of updates s",
        "ttt_cache": "TTT cache: compressor W",
    }
    for ax, (fam, title) in zip(axes, titles.items()):
        for name, r in results.items():
            pts = [(x["steps"], x[fam]) for x in r["rows"] if fam in x]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("steps streamed (12.5 per second of audio)")
        ax.set_ylabel("largest Frobenius norm (rows, heads, layers)")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle("Moshi adapter (tiny, random weights): fast-weight norms on one stream")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_variant(text: str) -> tuple[str, dict, dict]:
    """``NAME:memory.F=V,inplace_ttt.F=V`` -> (name, memory fields, In-Place TTT fields)."""
    name, _, fields = text.partition(":")
    mem, ttt = {}, {}
    for item in filter(None, fields.split(",")):
        part, field, value = parse_setting(item)
        (mem if part == "memory" else ttt)[field] = value
    return name, mem, ttt


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--preset",
        default="both",
        help="AdapterConfig preset (3 layers: In-Place TTT and the TTT cache in the last)",
    )
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--chunk", type=int, default=500, help="steps per streaming call")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME:memory.F=V,inplace_ttt.F=V (settings replaced in the preset)",
    )
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    if a.steps < 256:
        raise SystemExit("--steps must be >= 256")
    base = AdapterConfig.preset(a.preset, num_layers=tiny_lm_kwargs()["num_layers"])
    configs = {f"preset {a.preset!r} (its defaults)": base}
    for text in a.variant:
        name, mem, ttt = parse_variant(text)
        cfg = base
        if mem:
            cfg = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, **mem))
        if ttt:
            cfg = dataclasses.replace(cfg, inplace_ttt=dataclasses.replace(cfg.inplace_ttt, **ttt))
        configs[name] = cfg
    results = {}
    for name, cfg in configs.items():
        print(name, flush=True)
        results[name] = {"adapter": cfg.to_dict(), **stream_norms(cfg, a.steps, a.chunk)}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "moshi_norms.json").write_text(
        json.dumps({"steps": a.steps, "models": results}, indent=1) + "\n"
    )
    plot(results, a.out / "moshi_norms.png")
    for name, r in results.items():
        for fam in ("inplace_ttt", "ttt_cache"):
            pts = [(x["steps"], x[fam]) for x in r["rows"] if fam in x]
            if pts:
                print(f"{name}, {fam}: " + ", ".join(f"{v:.3g} at {n}" for n, v in pts))


if __name__ == "__main__":
    main()
