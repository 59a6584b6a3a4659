"""Each evaluation metric against a model whose right answer is known: a uniform model, an oracle
that knows the next token, a random model, and features that do or do not hold the label."""

import math

import numpy as np
import torch

import moshi_ttt as mt
from moshi_ttt.data.tasks import task_batch
from moshi_ttt.data.tokenizer import ByteTokenizer
from moshi_ttt.diagnostics import fit_probe, memory_diagnostics, state_bytes_curve
from moshi_ttt.evaluation import loss_by_position, task_accuracy
from conftest import assert_close


class Oracle(torch.nn.Module):
    """Streams like a StreamingLM; its logits put all mass on the true next token of ``seqs``."""

    def __init__(self, seqs: torch.Tensor, vocab: int, correct: bool = True):
        super().__init__()
        self.seqs, self.vocab, self.correct = seqs, vocab, correct

    def init_state(self, batch_size):
        return {"t": 0}

    def step(self, x, state):
        t, k = state["t"], x.shape[1]
        nxt = torch.nn.functional.pad(self.seqs, (0, 1))[:, t + 1:t + 1 + k]
        if not self.correct:
            nxt = torch.randint(0, self.vocab, nxt.shape, generator=torch.Generator().manual_seed(t))
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
    random = task_accuracy(Oracle(seqs, 256, correct=False), "passkey", [200], 8, seed=7, progress=False)[0]
    assert random["accuracy"] == 0.0 and random["token_accuracy"] < 0.2


def test_probe_reads_labels_only_when_present():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (600,), generator=g)
    informative = torch.nn.functional.one_hot(labels, 5).float() + 0.1 * torch.randn(600, 5, generator=g)
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
    cfg = mt.ModelConfig.preset("tiny", memory=mt.MemoryConfig(kind="ttt_cache", window=16, block=8,
                                                                 virtual_position="none"))
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
