"""The command line end to end on a small local corpus: train, evaluate (deterministic), report."""

import json

import numpy as np
import pytest

from moshi_ttt import cli
from moshi_ttt.data import prepare
from moshi_ttt.data.sources import Document, LoadedSource, Provenance


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    words = ["the", "pass", "key", "river", "stone", "light", "memory", "window"]

    def fake_source(name, cache_dir):
        docs = [Document(name, f"d{i}", f"doc {i}", " ".join(rng.choice(words, size=int(rng.integers(300, 900)))),
                         "public domain") for i in range(12)]
        return LoadedSource(name, docs, Provenance("fake", "1", "0" * 64, "public domain"))

    monkeypatch.setattr(prepare, "load_source", fake_source)
    out = tmp_path / "corpus"
    prepare.prepare_corpus(out, sources=("a", "b"), progress=False, val_frac=0.2, test_frac=0.2)
    return out


def test_run_trains_evaluates_and_reports(corpus, tmp_path):
    out = tmp_path / "run"
    args = ["run", "--data", str(corpus), "--out", str(out), "--steps", "3", "--max-len", "600", "--docs", "2",
            "--num", "2", "--distances", "1", "2", "--window", "16", "--ttt-chunk", "16", "--device", "cpu",
            "--memories", "window", "window+ttt2", "--buckets", "256", "600"]
    assert cli.main(args) == 0
    for f in ("metrics.json", "report.md", "loss_by_position.png", "recall.png", "train_loss.png"):
        assert (out / f).is_file(), f
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["models"]) == {"window-16", "window-16+ttt2"}
    assert metrics["models"]["window-16+ttt2"]["config"]["inplace_ttt"]["layers"] == [1]
    # evaluating the same checkpoints again gives the same numbers
    again = tmp_path / "again"
    ckpts = [str(out / n / "model.pt") for n in ("window-16", "window-16+ttt2")]
    assert cli.main(["eval", *ckpts, "--data", str(corpus), "--out", str(again), "--max-len", "600", "--docs", "2",
                     "--num", "2", "--distances", "1", "2", "--device", "cpu", "--buckets", "256", "600"]) == 0
    m2 = json.loads((again / "metrics.json").read_text())
    for name in metrics["models"]:
        assert m2["models"][name]["loss_by_position"] == metrics["models"][name]["loss_by_position"]
        assert m2["models"][name]["recall"] == metrics["models"][name]["recall"]


def test_cli_reports_bad_input(tmp_path, capsys):
    assert cli.main(["eval", str(tmp_path / "missing.pt"), "--data", str(tmp_path)]) == 2
    assert "no corpus" in capsys.readouterr().err
    assert cli.main(["train", "--memory", "window+tttx", "--data", str(tmp_path)]) == 2


def test_study_trains_every_memory_and_reports(corpus, tmp_path, monkeypatch):
    from moshi_ttt import pipeline
    from moshi_ttt.training import TrainConfig

    monkeypatch.setitem(pipeline.STUDY_PRESETS, "unit", pipeline.StudyPreset(
        model="tiny", memories=("window", "pooled", "infini", "ttt_cache"), window=16, block=8,
        train=TrainConfig(steps=2, batch_size=4, seq_len=128, task_frac=0.5, tasks=("passkey",),
                          task_distances=(8,), answer_weight=5.0),
        eval=pipeline.EvalConfig(max_len=600, docs=2, buckets=(256, 600), num=2, distances=(1, 2),
                                 cost_lengths=(100, 300))))
    out = tmp_path / "study"
    assert cli.main(["study", "--preset", "unit", "--data", str(corpus), "--out", str(out), "--device", "cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["models"]) == {"window-16", "pooled-16", "infini-16", "ttt_cache-16"}
    for name, m in metrics["models"].items():
        sizes = {r["state_bytes"] for r in m["cost"]["state_bytes"]}
        assert len(sizes) == 1  # constant memory for every kind in this study
        assert ("diagnostics" in m) == (name != "window-16")
    assert metrics["models"]["ttt_cache-16"]["diagnostics"]["state_finite"]
    for f in ("report.md", "loss_by_position.png", "recall.png", "state_bytes.png", "train_loss.png"):
        assert (out / f).is_file(), f
    assert "## Memory diagnostics" in (out / "report.md").read_text()
    assert cli.main(["study", "--preset", "nope", "--data", str(corpus)]) == 2
