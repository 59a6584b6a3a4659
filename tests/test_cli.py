"""The command line end to end on a small local corpus: train, evaluate (deterministic), report."""

import json

from moshi_ttt import cli


def test_run_trains_evaluates_and_reports(corpus, tmp_path):
    out = tmp_path / "run"
    args = [
        "run",
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--steps",
        "3",
        "--max-len",
        "600",
        "--docs",
        "2",
        "--num",
        "2",
        "--distances",
        "1",
        "2",
        "--window",
        "16",
        "--ttt-chunk",
        "16",
        "--device",
        "cpu",
        "--memories",
        "window",
        "window+ttt2",
        "--buckets",
        "256",
        "600",
    ]
    assert cli.main(args) == 0
    for f in ("metrics.json", "report.md", "loss_by_position.png", "recall.png", "train_loss.png"):
        assert (out / f).is_file(), f
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["models"]) == {"window-16", "window-16+ttt2"}
    assert metrics["models"]["window-16+ttt2"]["config"]["inplace_ttt"]["layers"] == [1]
    # evaluating the same checkpoints again gives the same numbers
    again = tmp_path / "again"
    ckpts = [str(out / n / "model.pt") for n in ("window-16", "window-16+ttt2")]
    assert (
        cli.main(
            [
                "eval",
                *ckpts,
                "--data",
                str(corpus),
                "--out",
                str(again),
                "--max-len",
                "600",
                "--docs",
                "2",
                "--num",
                "2",
                "--distances",
                "1",
                "2",
                "--device",
                "cpu",
                "--buckets",
                "256",
                "600",
            ]
        )
        == 0
    )
    again2 = tmp_path / "again2"
    assert (
        cli.main(
            [
                "eval",
                *ckpts,
                "--data",
                str(corpus),
                "--out",
                str(again2),
                "--max-len",
                "600",
                "--docs",
                "2",
                "--num",
                "2",
                "--distances",
                "1",
                "2",
                "--device",
                "cpu",
                "--buckets",
                "256",
                "600",
            ]
        )
        == 0
    )
    # the same JSON twice
    assert (again / "metrics.json").read_bytes() == (again2 / "metrics.json").read_bytes()
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

    monkeypatch.setitem(
        pipeline.STUDY_PRESETS,
        "unit",
        pipeline.StudyPreset(
            model="tiny",
            memories=("window", "pooled", "infini", "ttt_cache"),
            window=16,
            block=8,
            train=TrainConfig(
                steps=2,
                batch_size=4,
                seq_len=128,
                task_frac=0.5,
                tasks=("passkey",),
                task_distances=(8,),
                answer_weight=5.0,
            ),
            eval=pipeline.EvalConfig(
                max_len=600,
                docs=2,
                buckets=(256, 600),
                num=2,
                distances=(1, 2),
                cost_lengths=(100, 300),
            ),
        ),
    )
    out = tmp_path / "study"
    assert (
        cli.main(
            [
                "study",
                "--preset",
                "unit",
                "--data",
                str(corpus),
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["models"]) == {"window-16", "pooled-16", "infini-16", "ttt_cache-16"}
    for name, m in metrics["models"].items():
        sizes = {r["state_bytes"] for r in m["cost"]["state_bytes"]}
        assert len(sizes) == 1  # constant memory for every kind in this study
        assert ("diagnostics" in m) == (name != "window-16")
    assert metrics["models"]["ttt_cache-16"]["diagnostics"]["state_finite"]
    for f in (
        "report.md",
        "loss_by_position.png",
        "recall.png",
        "state_bytes.png",
        "train_loss.png",
    ):
        assert (out / f).is_file(), f
    assert "## Memory diagnostics" in (out / "report.md").read_text()
    assert cli.main(["study", "--preset", "nope", "--data", str(corpus)]) == 2


def test_train_command_recipe_resume_and_init(corpus, tmp_path):
    base = [
        "train",
        "--data",
        str(corpus),
        "--device",
        "cpu",
        "--batch-size",
        "4",
        "--seq-len",
        "96",
        "--memory",
        "ttt_cache",
        "--window",
        "16",
        "--log-every",
        "1",
    ]
    out = tmp_path / "a"
    assert (
        cli.main(
            base
            + [
                "--out",
                str(out),
                "--recipe",
                "staged",
                "--stage-steps",
                "2,2,2",
                "--checkpoint-every",
                "2",
                "--eval-every",
                "2",
                "--seq-schedule",
                "0:64,4:96",
            ]
        )
        == 0
    )
    log = (out / "train_log.csv").read_text().splitlines()
    assert log[0].startswith("step,stage,seq_len,loss") and "val_loss" in log[0]
    assert [line.split(",")[1] for line in log[1:]] == ["memory"] * 2 + ["attention"] * 2 + [
        "all"
    ] * 2
    assert (
        (out / "train_state.pt").is_file()
        and (out / "model.pt").is_file()
        and (out / "train_loss.png").is_file()
    )
    # resuming a finished run trains nothing more and keeps the weights
    before = (out / "model.pt").read_bytes()
    assert (
        cli.main(
            base
            + [
                "--out",
                str(out),
                "--recipe",
                "staged",
                "--stage-steps",
                "2,2,2",
                "--checkpoint-every",
                "2",
                "--eval-every",
                "2",
                "--seq-schedule",
                "0:64,4:96",
                "--resume",
            ]
        )
        == 0
    )
    import torch

    a = torch.load(out / "train_state.pt", weights_only=True)
    assert a["step"] == 6 and len(before) > 0
    # a window backbone with the TTT cache added: every backbone weight is loaded
    win = tmp_path / "win"
    assert (
        cli.main(
            [
                "train",
                "--data",
                str(corpus),
                "--device",
                "cpu",
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--seq-len",
                "64",
                "--memory",
                "window",
                "--window",
                "16",
                "--out",
                str(win),
            ]
        )
        == 0
    )
    assert (
        cli.main(
            base + ["--out", str(tmp_path / "b"), "--steps", "1", "--init", str(win / "model.pt")]
        )
        == 0
    )
    assert cli.main(base + ["--out", str(tmp_path / "c"), "--seq-schedule", "bad"]) == 2
