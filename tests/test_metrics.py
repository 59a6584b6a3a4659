"""Each evaluation metric against a model whose right answer is known: a uniform model, an oracle
that knows the next token, a random model, and features that do or do not hold the label."""

import math

import numpy as np
import pytest
import torch
from conftest import assert_close

import moshi_ttt as mt
from moshi_ttt.data.tasks import task_batch
from moshi_ttt.data.tokenizer import ByteTokenizer
from moshi_ttt.diagnostics import fit_probe, memory_diagnostics, state_bytes_curve
from moshi_ttt.evaluation import loss_by_position, task_accuracy


class Oracle(torch.nn.Module):
    """Streams like a StreamingLM; its logits put all mass on the true next token of ``seqs``."""

    def __init__(self, seqs: torch.Tensor, vocab: int, correct: bool = True):
        super().__init__()
        self.seqs, self.vocab, self.correct = seqs, vocab, correct

    def init_state(self, batch_size):
        return {"t": 0}

    def step(self, x, state):
        t, k = state["t"], x.shape[1]
        nxt = torch.nn.functional.pad(self.seqs, (0, 1))[:, t + 1 : t + 1 + k]
        if not self.correct:
            nxt = torch.randint(
                0, self.vocab, nxt.shape, generator=torch.Generator().manual_seed(t)
            )
        state["t"] += k
        return torch.nn.functional.one_hot(nxt, self.vocab).float() * 50.0, state


def test_uniform_model_loss_is_log_vocab():
    model = mt.StreamingLM(mt.ModelConfig.preset("tiny"))
    with torch.no_grad():
        model.head.weight.zero_()
    docs = [np.random.default_rng(0).integers(0, 256, 2500)]
    rows = loss_by_position(model, docs, 2500, progress=False)
    assert [r["tokens"] for r in rows] == [999, 1000, 500]
    for r in rows:
        assert_close(r["loss"], math.log(256), 1e-5, "loss")
        assert_close(r["ppl"], 256, 4e-5, "perplexity")


def test_recall_oracle_is_perfect_and_random_is_chance():
    seeds = [7 * 1_000_003 + i for i in range(8)]
    tokens, _ = task_batch("passkey", seeds, 200, ByteTokenizer())
    seqs = torch.as_tensor(tokens)
    perfect = task_accuracy(Oracle(seqs, 256), "passkey", [200], 8, seed=7, progress=False)[0]
    assert perfect["accuracy"] == 1.0 and perfect["token_accuracy"] == 1.0
    random = task_accuracy(
        Oracle(seqs, 256, correct=False), "passkey", [200], 8, seed=7, progress=False
    )[0]
    assert random["accuracy"] == 0.0 and random["token_accuracy"] < 0.2


def test_probe_reads_labels_only_when_present():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (600,), generator=g)
    informative = torch.nn.functional.one_hot(labels, 5).float() + 0.1 * torch.randn(
        600, 5, generator=g
    )
    noise = torch.randn(600, 5, generator=g)
    good, bad = fit_probe(informative, labels, 5), fit_probe(noise, labels, 5)
    assert good["accuracy"] == 1.0
    assert bad["accuracy"] < bad["chance"] + 0.1


def test_state_bytes_curve_constant_or_growing():
    window = mt.StreamingLM(mt.ModelConfig.preset("tiny"))
    full = mt.StreamingLM(mt.ModelConfig.preset("tiny", memory=mt.MemoryConfig(kind="full")))
    w = state_bytes_curve(window, [10, 300, 1000])
    f = state_bytes_curve(full, [10, 300, 1000])
    assert {r["state_bytes"] for r in w} == {window.init_state(1).nbytes()}
    assert f[0]["state_bytes"] < f[1]["state_bytes"] < f[2]["state_bytes"]


def test_virtual_key_cosine_detects_identical_keys():
    cfg = mt.ModelConfig.preset(
        "tiny",
        memory=mt.MemoryConfig(kind="ttt_cache", window=16, block=8, virtual_position="none"),
    )
    model = mt.StreamingLM(cfg)
    x = torch.randint(0, 256, (1, 120))
    diverse = memory_diagnostics(model, x)["layer0"]["virtual_key_cos"]
    with torch.no_grad():
        for layer in model.layers:
            mem = layer.self_attn.memory
            mem.vkeys.copy_(mem.vkeys[:, :1].expand_as(mem.vkeys))  # all virtual keys the same
    same = memory_diagnostics(model, x)["layer0"]["virtual_key_cos"]
    assert_close(same, 1.0, 1e-5)
    assert diverse < 0.5


def verdict_metrics(cache_far: float, window_far: float) -> dict:
    """Two models' recall rows (passkey at 0.5, 4 and 16 x W = 32) and perplexity buckets."""

    def model(kind, far, ppl):
        rows = [
            {"distance": d, "accuracy": a, "token_accuracy": a, "chance": 0.1}
            for d, a in ((16, 1.0), (128, far), (512, far / 2))
        ]
        return {
            "config": {"memory": {"kind": kind, "window": 32}},
            "recall": {"passkey": rows},
            "loss_by_position": [
                {"lo": 0, "hi": 9, "ppl": ppl + 1},
                {"lo": 9, "hi": 99, "ppl": ppl},
            ],
            "cost": {
                "state_bytes": [
                    {"tokens": 100, "state_bytes": 10},
                    {"tokens": 1000, "state_bytes": 10},
                ]
            },
        }

    return {
        "eval": {},
        "models": {
            "window-32": model("window", window_far, 9.5),
            "ttt_cache-32": model("ttt_cache", cache_far, 9.25),
        },
    }


@pytest.mark.parametrize(
    "cache_far, window_far, says",
    [
        (0.9, 0.05, "**ttt_cache-32 recalls passkey 128 tokens back"),
        (0.9, 0.5, "No memory here recalls beyond the window reliably"),
        (0.3, 0.05, "No memory here recalls beyond the window reliably"),
    ],
)
def test_verdict_names_what_the_ttt_cache_recalls_beyond_the_window(cache_far, window_far, says):
    """The verdict's rows hold each model's best accuracy at >= 4 x W (against the rows), and its
    sentence claims recall only at >= 0.8 where the window is at most 0.2."""
    from moshi_ttt.report import verdict

    lines = verdict(verdict_metrics(cache_far, window_far))
    row = next(x for x in lines if x.startswith("| ttt_cache-32 |"))
    assert f"| {cache_far:.2f} (passkey, 128 tokens, chance 0.10) | 9.25 |" in row
    assert says in lines[-1] and "9.25 against the window's 9.50" in lines[-1]
    assert (
        verdict(
            {
                "eval": {},
                "models": {"ttt_cache-32": verdict_metrics(0.9, 0.0)["models"]["ttt_cache-32"]},
            }
        )
        == []
    )


def test_one_fact_recall_is_drawn_against_a_guess_among_the_values():
    """Binding with N = 1 only (the CPU main job): the verdict's line and the table's are a guess
    among the 64 values, not 1/N = 1, and the table holds each model's rows in order."""
    from moshi_ttt.recall_report import binding_table
    from moshi_ttt.report import verdict

    m = verdict_metrics(0.0, 0.0)
    for name, acc in (("window-32", 0.03), ("ttt_cache-32", 1.0)):
        rows = [
            {"distance_w": w, "distance": int(32 * w), "accuracy": a, "chance": 1.0}
            for w, a in ((0.5, 1.0), (4.0, acc), (16.0, acc))
        ]
        m["models"][name]["binding"] = {"one": {"1": rows}}
        m["models"][name]["recall"] = {}
    lines = binding_table(m)
    assert "| ttt_cache-32 | 1 (0.02) | 1.00 | 1.00 | 1.00 |" in lines
    assert "| window-32 | 1 (0.02) | 1.00 | 0.03 | 0.03 |" in lines
    row = next(x for x in verdict(m) if x.startswith("| ttt_cache-32 |"))
    # ties: the farthest distance
    assert "1.00 (one fact (binding N = 1), 512 tokens, chance 0.02)" in row
