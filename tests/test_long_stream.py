"""The long-stream evaluation: loss per multiple of the training length equals the parallel pass's
loss over the same positions, fast-weight norms equal a per-row, per-head reference, and the
``moshi-ttt eval --long-stream`` report."""

import json

import numpy as np
import pytest
import torch
from conftest import assert_close, run_cli
from torch.nn import functional as F

import moshi_ttt as mt
from moshi_ttt.checkpoint import load_checkpoint, save_checkpoint
from moshi_ttt.config import memory_variant
from moshi_ttt.diagnostics import state_norms
from moshi_ttt.evaluation import long_stream
from moshi_ttt.pipeline import EvalConfig

SPECS = ["window", "ttt_cache", "infini", "pooled", "window+ttt2", "ttt_cache+ttt2"]


def model_of(spec: str, window: int = 8) -> mt.StreamingLM:
    base = mt.ModelConfig(
        vocab_size=50,
        dim=32,
        num_layers=2,
        num_heads=4,
        memory=mt.MemoryConfig(kind="window", window=window),
    )
    _, cfg = memory_variant(base, spec, 8, window, 4)
    model = mt.StreamingLM(cfg).eval()
    with torch.no_grad():  # move every parameter off its init so fast weights move too
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def naive_norms(model: mt.StreamingLM, state) -> dict:
    """Norms one row and one head at a time, summing squares in float64."""
    out = {}
    for i, layer in enumerate(model.layers):
        t = state.tensors
        rows = {}
        if f"layers.{i}.d1" in t:
            for j, init in enumerate(layer.self_attn.memory.inits(), start=1):
                d = t[f"layers.{i}.d{j}"].double()
                rows[f"W{j}"] = [
                    float(((d[b, h] + init[h].detach().double()) ** 2).sum().sqrt())
                    for b in range(d.shape[0])
                    for h in range(d.shape[1])
                ]
        if f"layers.{i}.mem_s" in t:
            m = t[f"layers.{i}.mem_s"].double()
            rows["mem_s"] = [
                float((m[b, h] ** 2).sum().sqrt())
                for b in range(m.shape[0])
                for h in range(m.shape[1])
            ]
        if f"layers.{i}.ttt.s" in t:
            s = t[f"layers.{i}.ttt.s"].double()
            rows["ttt.s"] = [float((s[b] ** 2).sum().sqrt()) for b in range(s.shape[0])]
        out.update({f"layer{i}.{k}": max(v) for k, v in rows.items()})
    return out


@pytest.mark.parametrize("spec", SPECS)
def test_state_norms_equal_the_naive_reference(spec):
    model = model_of(spec)
    state = model.init_state(3)
    with torch.no_grad():
        for _ in range(0, 60, 7):
            model.step(torch.randint(0, 50, (3, 7)), state)
    got, want = state_norms(model, state), naive_norms(model, state)
    assert set(got) == set(want)
    assert (spec in ("window", "pooled")) == (not got)  # no fast weights, no norms
    for k in want:
        assert_close(got[k], want[k], 1e-6, k)


@pytest.mark.parametrize("spec", SPECS)
def test_loss_by_length_equals_the_parallel_pass(spec):
    """Streamed 5 tokens at a time, the loss per bucket (m' L, m L] equals the parallel pass's
    loss over the same positions, and the last norms are those of a state streamed in one step."""
    model, L, mults = model_of(spec), 6, (1, 2, 4, 8)
    tokens = torch.randint(0, 50, (L * mults[-1] + 1,))
    res = long_stream(model, tokens.numpy(), L, mults, step=5, progress=False)
    with torch.no_grad():
        logits = model(tokens[None, :-1])
        nll = F.cross_entropy(logits[0].float(), tokens[1:], reduction="none")  # position p = i + 1
        state = model.init_state(1)
        model.step(tokens[None, :-1], state)
    lo = 0
    for m in mults:
        assert_close(res["loss_by_length"][str(m)], nll[lo : m * L].mean().item(), 1e-5, str(m))
        lo = m * L
    assert [r["multiple"] for r in res["norms"]] == list(mults)
    assert [r["tokens"] for r in res["norms"]] == [m * L for m in mults]
    last = {k: v for k, v in res["norms"][-1].items() if k not in ("multiple", "tokens")}
    want = state_norms(model, state)
    assert set(last) == set(want)
    for k in want:
        assert_close(last[k], want[k], 1e-5, k)


def test_long_stream_refuses_bad_input():
    model = model_of("window")
    with pytest.raises(ValueError, match="needs 49 tokens, the stream has 20"):
        long_stream(model, np.zeros(20, np.int64), 6, (1, 8), progress=False)
    for L, mults in ((0, (1, 2)), (6, ()), (6, (2, 1)), (6, (0, 1))):
        with pytest.raises(ValueError, match="increasing multiples"):
            long_stream(model, np.zeros(100, np.int64), L, mults, progress=False)
    with pytest.raises(ValueError, match="long_stream must be increasing"):
        EvalConfig(long_stream=(4, 2))
    assert EvalConfig(long_stream=[1, 2]).long_stream == (1, 2)


def test_eval_long_stream_report(corpus, tmp_path):
    """``moshi-ttt eval --long-stream``: metrics, long_stream.json, the plot and the report's
    table; the loss of each bucket equals the library call on the same joined stream."""
    from moshi_ttt.pipeline import long_stream_tokens

    ckpts = []
    for spec in ("window", "ttt_cache"):
        base = mt.ModelConfig(
            vocab_size=256,
            dim=32,
            num_layers=2,
            num_heads=4,
            memory=mt.MemoryConfig(kind="window", window=16),
        )
        path = tmp_path / spec / "model.pt"
        path.parent.mkdir()
        save_checkpoint(
            path, mt.StreamingLM(memory_variant(base, spec, 8, 16, 4)[1]), {"name": spec}
        )
        ckpts.append(path)
    out = tmp_path / "eval"
    args = [
        "eval",
        *ckpts,
        "--data",
        corpus,
        "--out",
        out,
        "--long-stream",
        "1",
        "2",
        "4",
        "--train-len",
        "32",
        "--no-perplexity",
        "--tasks",
        "--cross-session",
        "--no-diagnostics",
        "--device",
        "cpu",
    ]
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    summary = json.loads((out / "long_stream.json").read_text())
    assert summary["train_len"] == 32 and set(summary["models"]) == {"window", "ttt_cache"}
    assert summary["models"]["window"]["norm_growth"] is None
    assert summary["models"]["ttt_cache"]["kind"] == "ttt_cache"
    tokens = long_stream_tokens(corpus, 4 * 32 + 1)
    for name, ck in zip(("window", "ttt_cache"), ckpts):
        model = load_checkpoint(ck)[0].eval()
        want = long_stream(model, tokens, 32, (1, 2, 4), progress=False)["loss_by_length"]
        assert metrics["models"][name]["long_stream"]["loss_by_length"] == want
        assert summary["models"][name]["loss_by_length"] == want
    assert (out / "long_stream.png").is_file()
    text = (out / "report.md").read_text()
    assert "## Long stream" in text and "| ttt_cache |" in text


def test_a_study_with_a_long_stream_measures_it_as_eval_does(corpus, tmp_path, monkeypatch):
    """A study preset with ``long_stream`` streams every trained model to its multiples of the
    training length: each model's buckets equal the library call on its checkpoint."""
    from moshi_ttt import pipeline
    from moshi_ttt.training import TrainConfig

    monkeypatch.setitem(
        pipeline.STUDY_PRESETS,
        "unit-long",
        pipeline.StudyPreset(
            model="tiny",
            memories=("window", "ttt_cache:decay=0.1,forget_gate=true"),
            window=16,
            block=8,
            train=TrainConfig(steps=2, batch_size=2, seq_len=32),
            eval=EvalConfig(
                max_len=64,
                docs=1,
                buckets=(64,),
                tasks=(),
                cross_session=(),
                diagnostics=False,
                perplexity=False,
                long_stream=(1, 2, 4),
                cost_lengths=(32,),
            ),
        ),
    )
    out = tmp_path / "study"
    metrics = pipeline.run_study("unit-long", corpus, out, "cpu")
    tokens = pipeline.long_stream_tokens(corpus, 4 * 32 + 1)
    assert set(metrics["models"]) == {"window-16", "ttt_cache-16-decay0.1+forget"}
    for name in metrics["models"]:
        model = load_checkpoint(out / name / "model.pt")[0].eval()
        want = long_stream(model, tokens, 32, (1, 2, 4), progress=False)["loss_by_length"]
        assert metrics["models"][name]["long_stream"]["loss_by_length"] == want
    assert json.loads((out / "long_stream.json").read_text())["train_len"] == 32


def test_seed_summary_means_equal_numpy_over_shared_seeds():
    """bench/stationarity_seeds.summarise: each memory's mean over the seeds it shares with the
    window, against numpy, and the buckets above the window's mean of the same seeds."""
    from bench.stationarity_seeds import summarise

    rng = np.random.default_rng(0)
    keys = ["1", "2", "4"]

    def entry():
        return {
            "kind": "ttt_cache",
            "inplace_ttt": False,
            "settings": {},
            "norm_growth": 1.0,
            "loss_by_length": {k: float(rng.uniform(2, 3)) for k in keys},
        }

    models = {
        "window-32": {0: entry(), 1: entry(), 2: entry()},
        "mem": {0: entry(), 2: entry(), 5: entry()},
    }
    res = summarise(256, models, "window-32")["models"]["mem"]
    assert res["seeds"] == [0, 2]
    for k in keys:
        mean = np.mean([models["mem"][s]["loss_by_length"][k] for s in (0, 2)])
        ref = np.mean([models["window-32"][s]["loss_by_length"][k] for s in (0, 2)])
        assert res["loss_by_length"][k] == pytest.approx(mean)
        assert (k in res["above_window"]) == (mean > ref)
