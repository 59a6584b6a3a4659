"""Memory diagnostics (gate, attention mass, virtual keys, inner loss, fast-weight norms, an
evicted-token probe) and cost measurements."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch.nn import functional as F

from .layers import records
from .layers.evicting import EvictingMemory
from .models.lm import StreamingLM


def evicting_memories(model: StreamingLM) -> dict[int, EvictingMemory]:
    return {
        i: layer.self_attn.memory
        for i, layer in enumerate(model.layers)
        if isinstance(layer.self_attn.memory, EvictingMemory)
    }


@torch.no_grad()
def memory_diagnostics(model: StreamingLM, tokens: torch.Tensor) -> dict:
    """Per layer with a memory of evicted tokens: gate α per head, attention mass on the memory,
    virtual-key cosine similarity and the inner loss of the first and last compressor updates
    (one parallel pass over ``tokens`` [B, T]); and whether every streamed state tensor is
    finite."""
    mems = evicting_memories(model)
    out = {}
    with records.recording() as stats:
        model.eval()(tokens)
    for i, mem in mems.items():
        st = stats[mem]
        row = {"alpha": st["alpha"].tolist(), "virtual_mass": st["virtual_mass"]}
        if "virtual_key_cos" in st:
            row["virtual_key_cos"] = st["virtual_key_cos"]
        before, after = st.get("inner_loss_before"), st.get("inner_loss_after")
        if before is not None and before.shape[1] > 0:
            row["inner_loss_first_update"] = [before[:, 0].mean().item(), after[:, 0].mean().item()]
            row["inner_loss_last_update"] = [
                before[:, -1].mean().item(),
                after[:, -1].mean().item(),
            ]
        out[f"layer{i}"] = row
    state = model.init_state(tokens.shape[0])
    for t in range(0, tokens.shape[1], 256):
        _, state = model.step(tokens[:, t : t + 256], state)
    out["state_finite"] = all(bool(torch.isfinite(t.float()).all()) for t in state.tensors.values())
    return out


@torch.no_grad()
def memory_features(model: StreamingLM, tokens: torch.Tensor, layer: int) -> torch.Tensor:
    """What layer ``layer``'s memory offers each query: [B, T, F] (virtual values, or the read)."""
    mem = model.layers[layer].self_attn.memory
    if not isinstance(mem, EvictingMemory):
        raise ValueError(f"layer {layer} has no memory of evicted tokens ({model.cfg.memory.kind})")
    with records.recording() as stats:
        model.eval()(tokens)
    read = stats[mem]["read"]
    x = read["values"] if "values" in read else read["out"]  # [B, H, T, (M,) Dh]
    return x.transpose(1, 2).flatten(2).float()


def fit_probe(
    feats: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int = 300, seed: int = 0
):
    """Linear softmax probe: train on the first 70% of samples, accuracy on the rest, and the
    majority-class accuracy on the same test samples (chance). feats [N, F], labels [N]."""
    # a small fit: on the CPU, wherever the model ran
    feats, labels = feats.detach().float().cpu(), labels.cpu()
    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    perm = torch.randperm(n, generator=g)
    tr, te = perm[: int(0.7 * n)], perm[int(0.7 * n) :]
    mu, sd = feats[tr].mean(0), feats[tr].std(0).clamp_min(1e-6)
    x = (feats - mu) / sd
    w = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        (F.cross_entropy(x[tr] @ w + b, labels[tr]) + 1e-3 * w.pow(2).sum()).backward()
        opt.step()
    with torch.no_grad():
        acc = ((x[te] @ w + b).argmax(-1) == labels[te]).float().mean().item()
    chance = (
        (labels[te] == torch.bincount(labels[tr], minlength=num_classes).argmax())
        .float()
        .mean()
        .item()
    )
    return {"accuracy": acc, "chance": chance, "train": len(tr), "test": len(te)}


def evicted_token_probe(
    model: StreamingLM, tokens: torch.Tensor, layer: int = 0, lag: int = 0
) -> dict:
    """Spec experiment 1: predict the id of the token evicted ``lag`` positions before the newest
    evicted one (position t - W - lag) from what the memory offers query t."""
    W = model.cfg.memory.window
    feats = memory_features(model, tokens, layer)  # [B, T, F]
    t = torch.arange(W + lag, tokens.shape[1])
    x = feats[:, t].flatten(0, 1)
    y = tokens[:, t - W - lag].flatten()
    return {"layer": layer, "lag": lag, **fit_probe(x, y, model.cfg.vocab_size)}


@torch.no_grad()
def state_bytes_curve(model: StreamingLM, lengths: list[int], step: int = 256) -> list[dict]:
    """Streaming state bytes of one conversation after each of ``lengths`` tokens."""
    state = model.init_state(1)
    rows, done = [], 0
    device = next(model.parameters()).device
    for n in sorted(lengths):
        while done < n:
            k = min(step, n - done)
            _, state = model.step(
                torch.randint(0, model.cfg.vocab_size, (1, k), device=device), state
            )
            done += k
        rows.append({"tokens": n, "state_bytes": state.nbytes()})
    return rows


@torch.no_grad()
def stream_ms_per_token(model: StreamingLM, tokens: int = 200, prefill: int = 512) -> float:
    """Batch 1, one token per step, eager, after ``prefill`` tokens (median of per-step times)."""
    device = next(model.parameters()).device
    state = model.init_state(1)
    x = torch.randint(0, model.cfg.vocab_size, (1, prefill + tokens), device=device)
    for t in range(0, prefill, 256):
        _, state = model.step(x[:, t : min(t + 256, prefill)], state)
    times = []
    for t in range(prefill, prefill + tokens):
        t0 = time.perf_counter()
        model.step(x[:, t : t + 1], state)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


@torch.no_grad()
def state_norms(model: StreamingLM, state) -> dict[str, float]:
    """Frobenius norms of the memories' fast weights in a streamed ``state``, max over batch rows
    and heads, per layer: the TTT cache's compressor weights ``W_l = W_l_init + d_l`` ("W1"...),
    Infini-attention's matrix ``mem_s`` and In-Place TTT's fast-weight sum ``s`` ("ttt.s").
    {"layer{i}.{name}": norm}; memories without fast weights (window, sink, pooled) add nothing."""
    out = {}
    for i, layer in enumerate(model.layers):
        names = state.tensors
        mem = layer.self_attn.memory
        if hasattr(mem, "inits") and f"layers.{i}.d1" in names:
            for j, init in enumerate(mem.inits(), start=1):
                w = names[f"layers.{i}.d{j}"].float() + init.float()  # [B, hc, d_in, d_out]
                out[f"layer{i}.W{j}"] = w.flatten(2).norm(dim=-1).max().item()
        if f"layers.{i}.mem_s" in names:
            mem_s = names[f"layers.{i}.mem_s"].float()  # [B, H, Dh, Dh]
            out[f"layer{i}.mem_s"] = mem_s.flatten(2).norm(dim=-1).max().item()
        if f"layers.{i}.ttt.s" in names:
            out[f"layer{i}.ttt.s"] = (
                names[f"layers.{i}.ttt.s"].float().flatten(1).norm(dim=-1).max().item()
            )
    return out
