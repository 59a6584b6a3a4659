"""Evaluation with streaming semantics: loss by position bucket and recall accuracy vs distance."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from .data.binding import bag_line, binding_batch, chance
from .data.tasks import answer_accuracy, answer_token_accuracy, make_task, pad_samples
from .data.tokenizer import ByteTokenizer
from .models.lm import StreamingLM

BUCKETS = (1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000)


@torch.no_grad()
def stream_chunks(model: StreamingLM, tokens: torch.Tensor, step: int = 256):
    """Stream tokens[:, :-1] ``step`` at a time from an empty state; yields (logits, next tokens):
    logits [B, s, V] at inputs t..t+s-1 and the tokens they predict [B, s]."""
    B, T = tokens.shape
    state = model.init_state(B)
    for t in range(0, T - 1, step):
        end = min(t + step, T - 1)
        logits, state = model.step(tokens[:, t:end], state)
        yield logits, tokens[:, t + 1 : end + 1]


def stream_logits_nll(model: StreamingLM, tokens: torch.Tensor, step: int = 256) -> torch.Tensor:
    """Per-token NLL of tokens[:, 1:] under streaming. [B, T] -> [B, T-1]."""
    return torch.cat(
        [
            F.cross_entropy(lg.float().transpose(1, 2), y, reduction="none")
            for lg, y in stream_chunks(model, tokens, step)
        ],
        dim=1,
    )


def stream_predictions(model: StreamingLM, tokens: torch.Tensor, step: int = 256) -> torch.Tensor:
    """Greedy next-token predictions under streaming: pred[:, t] predicts tokens[:, t+1]. [B, T] ->
    [B, T-1]."""
    return torch.cat([lg.argmax(-1) for lg, _ in stream_chunks(model, tokens, step)], dim=1)


def bucket_edges(max_len: int, buckets=BUCKETS) -> list[tuple[int, int]]:
    """Position ranges [lo, hi) up to max_len: (0, 1k), (1k, 2k), (2k, 5k), ..."""
    edges, lo = [], 0
    for hi in buckets:
        if lo >= max_len:
            break
        edges.append((lo, min(hi, max_len)))
        lo = hi
    return edges


def loss_by_position(
    model: StreamingLM,
    docs: list[np.ndarray],
    max_len: int,
    step: int = 256,
    buckets=BUCKETS,
    device="cpu",
    progress=True,
) -> list[dict]:
    """Mean NLL (nats/token) and perplexity per position bucket over held-out documents.

    Each document is streamed from an empty state and cut at ``max_len`` tokens; the position of
    a prediction is the index of the predicted token within its document.
    """
    model.eval()
    edges = bucket_edges(max_len, buckets)
    sums, counts = np.zeros(len(edges)), np.zeros(len(edges), dtype=np.int64)
    for doc in tqdm(docs, desc="eval loss", disable=not progress, dynamic_ncols=True):
        toks = torch.as_tensor(np.asarray(doc[:max_len], dtype=np.int64), device=device)[None]
        if toks.shape[1] < 2:
            continue
        nll = stream_logits_nll(model, toks, step)[0].cpu().numpy()  # nll[i]: token i + 1
        pos = np.arange(1, len(nll) + 1)
        for i, (lo, hi) in enumerate(edges):
            sel = (pos >= lo) & (pos < hi)
            sums[i] += nll[sel].sum()
            counts[i] += sel.sum()
    out = []
    for (lo, hi), s, c in zip(edges, sums, counts):
        if c:
            out.append(
                {
                    "lo": lo,
                    "hi": hi,
                    "tokens": int(c),
                    "loss": s / c,
                    "ppl": float(np.exp(s / c)),
                    "bits_per_token": s / c / np.log(2),
                }
            )
    return out


@torch.no_grad()
def long_stream(
    model: StreamingLM,
    tokens,
    train_len: int,
    multiples=(1, 2, 4, 8, 16, 32, 64),
    step: int = 256,
    device="cpu",
    progress=True,
) -> dict:
    """One held-out stream from an empty state out to max(multiples) x ``train_len`` tokens.

    ``loss_by_length[str(m)]``: mean NLL of the predicted tokens at positions p in
    (m' L, m L], m' the previous multiple (0 for the first), L = ``train_len``;
    ``norms``: ``state_norms`` of the state after m L tokens, one row per multiple.
    tokens: 1-D, at least max(multiples) L + 1 of them."""
    from .diagnostics import state_norms

    if (
        train_len < 1
        or not multiples
        or any(b <= a for a, b in zip(multiples, multiples[1:]))
        or multiples[0] < 1
    ):
        raise ValueError(
            f"long_stream needs train_len >= 1 and increasing multiples >= 1, "
            f"got {train_len}, {list(multiples)}"
        )
    need = multiples[-1] * train_len + 1
    toks = torch.as_tensor(np.asarray(tokens, dtype=np.int64)[:need], device=device)[None]
    if toks.shape[1] < need:
        raise ValueError(
            f"long_stream to {multiples[-1]} x {train_len} tokens needs {need} "
            f"tokens, the stream has {toks.shape[1]}"
        )
    model.eval()
    state, pos, loss, norms = model.init_state(1), 0, {}, []
    bar = tqdm(total=need - 1, desc="long stream", disable=not progress, dynamic_ncols=True)
    for m in multiples:
        edge, nll = m * train_len, []
        while pos < edge:  # inputs pos..end-1 predict tokens pos+1..end
            end = min(pos + step, edge)
            logits, state = model.step(toks[:, pos:end], state)
            target = toks[0, pos + 1 : end + 1]
            nll.append(F.cross_entropy(logits[0].float(), target, reduction="none"))
            bar.update(end - pos)
            pos = end
        loss[str(m)] = torch.cat(nll).mean().item()
        norms.append({"multiple": m, "tokens": edge, **state_norms(model, state)})
    bar.close()
    return {"train_len": train_len, "loss_by_length": loss, "norms": norms}


def task_accuracy(
    model: StreamingLM,
    task: str,
    distances: list[int],
    num: int,
    seed: int = 0,
    tokenizer=None,
    step: int = 256,
    device="cpu",
    progress=True,
) -> list[dict]:
    """Recall accuracy vs distance: a sample counts only if every answer token is predicted exactly.

    Held-out instances: seeds ``seed * 1_000_003 + i`` for i < num (training uses other seeds).
    """
    tokenizer = tokenizer or ByteTokenizer()
    model.eval()
    rows = []
    for d in tqdm(distances, desc=f"eval {task}", disable=not progress, dynamic_ncols=True):
        seeds = [seed * 1_000_003 + i for i in range(num)]
        samples = [make_task(task, s, d, tokenizer) for s in seeds]
        tokens, mask = pad_samples(samples)
        toks = torch.as_tensor(tokens, device=device)
        pred = stream_predictions(model, toks, step).cpu().numpy()
        rows.append(
            {
                "distance": int(d),
                "accuracy": float(answer_accuracy(pred, tokens, mask).mean()),
                "token_accuracy": float(answer_token_accuracy(pred, tokens, mask).mean()),
                "n": num,
                "chance": float(np.mean([x.meta["chance"] for x in samples])),
            }
        )
    return rows


def binding_accuracy(
    model: StreamingLM,
    num_keys: int,
    distances: list[int],
    num: int,
    seed: int = 0,
    num_queries: int = 1,
    step: int = 256,
    device="cpu",
    batch: int = 256,
    progress=True,
) -> list[dict]:
    """Key-value binding vs distance (data/binding.py), streamed: ``num_keys`` facts, ``d`` filler
    tokens, ``num_queries`` keys asked. ``accuracy``: the fraction of asked values predicted
    exactly (with one question per sample, binding; chance 1/N); ``chance`` 1/N and, with every
    key asked, ``bag`` H_N/N (a model that only knows which values occurred). Held-out instances:
    seeds ``seed * 1_000_003 + i``, i < num."""
    model.eval()
    rows = []
    for d in tqdm(
        distances, desc=f"eval binding N={num_keys}", disable=not progress, dynamic_ncols=True
    ):
        hits = []
        for lo in range(0, num, batch):
            seeds = [seed * 1_000_003 + i for i in range(lo, min(num, lo + batch))]
            tokens, mask = binding_batch(seeds, int(d), num_keys, num_queries)
            pred = (
                stream_predictions(model, torch.as_tensor(tokens, device=device), step)
                .cpu()
                .numpy()
            )
            m = mask[:, 1:]
            hits.append((pred == tokens[:, 1:])[m])
        row = {
            "distance": int(d),
            "accuracy": float(np.concatenate(hits).mean()),
            "n": num,
            "questions": num_queries,
            "chance": chance(num_keys),
        }
        if num_queries == num_keys > 1:
            row["bag"] = bag_line(num_keys)
        rows.append(row)
    return rows
