"""The real ``moshi-ttt`` command on bad input: one line ``moshi-ttt: error: ...`` on stderr, no
traceback, exit status 2; silent fallbacks refused; what it does instead of guessing."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli

import moshi_ttt as mt
from moshi_ttt import cli
from moshi_ttt.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TQDM = re.compile(r"^[\w ]+:\s+\d+%\|")  # a progress bar line


def process(*args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the command from ``cwd`` as its own process on this worktree's package."""
    base = {k: v for k, v in os.environ.items() if k != "MOSHI_TTT_DEBUG"}
    env = {**base, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "moshi_ttt.cli", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


moshi = run_cli  # in this process: the same main(), without an interpreter start per case


def error_line(r: subprocess.CompletedProcess) -> str:
    """The one error line; every other stderr line may only be a progress bar."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.replace("\r", "\n").splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("moshi-ttt: error: "), r.stderr[-2000:]
    assert all(TQDM.match(ln) for ln in lines[:-1]), lines
    return lines[-1]


@pytest.fixture
def nowhere(tmp_path):
    """A file where a corpus would be: a command that gets past its option checks stops there
    (and cannot start building a corpus in it)."""
    path = tmp_path / "nowhere"
    path.write_text("not a corpus")
    return path


def test_a_process_prints_what_main_prints(nowhere, tmp_path):
    """The cases below run ``main`` in this process; as its own process the command prints the
    same line and exits with the same status."""
    for args in (["train", "--window", "0"], ["train", "--memory", "nope", "--data", nowhere]):
        a, b = process(*args, cwd=tmp_path), moshi(*args, cwd=tmp_path)
        assert a.returncode == b.returncode == 2
        assert error_line(a) == error_line(b)


@pytest.mark.parametrize(
    "args, match",
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        ([], "a command is required: data, train, eval, study, run, sessions"),
        (["data"], "a command is required: prepare"),
        (["train", "--device", "bogus"], "unknown device 'bogus'"),
        (["train", "--window", "0"], r"argument --window: expected an integer >= 1, got '0'"),
        (["run", "--window", "0"], r"argument --window: expected an integer >= 1"),
        (["train", "--memory", ""], "argument --memory: unknown memory ''"),
        (["train", "--memory", "window+tttx"], "unknown memory 'window\\+tttx'"),
        (["run", "--memories", "window", "nope"], "unknown memory 'nope'"),
        (["train", "--seq-schedule", "0:64,1:-5"], r"lengths must be >= 1, got \[64, -5\]"),
        (["train", "--seq-schedule", "0:64:9"], "STEP:LENGTH"),
        (["train", "--seq-schedule", "0:64,x:9"], "--seq-schedule"),
        (["train", "--checkpoint-every", "-1"], "checkpoint_every must be >= 0, got -1"),
        (["train", "--log-every", "0"], "log_every must be >= 1"),
        (["train", "--lr", "nan"], "lr must be a finite number > 0"),
        (["train", "--stage-steps", "1,1,1"], "--stage-steps .* --recipe staged"),
        (
            ["train", "--recipe", "staged", "--steps", "5"],
            "--steps has no effect with --recipe staged",
        ),
        # the former name of the staged recipe is accepted as it
        (
            ["train", "--recipe", "spec", "--steps", "5"],
            "--steps has no effect with --recipe staged",
        ),
        (["train", "--recipe", "staged", "--stage-steps", "1,x,1"], "--stage-steps '1,x,1'"),
        (["train", "--name", ""], "argument --name"),
        (["train", "--init", "missing.pt"], "--init missing.pt: no such checkpoint"),
        (["eval", "x.pt", "--docs", "0"], "docs must be >= 1, got 0"),
        (["eval", "x.pt", "--max-len", "0"], "max_len must be >= 2, got 0"),
        (
            ["eval", "x.pt", "--buckets", "200", "100", "-5"],
            r"buckets must be positive and increasing .*\[200, 100, -5\]",
        ),
        (["eval", "x.pt", "--num", "0"], "num must be >= 1, got 0"),
        (
            ["eval", "x.pt", "--distances", "4", "-1"],
            r"multiples of the window and must be >= 1, got \[4, -1\]",
        ),
        (["eval", "x.pt", "--distances", "0"], "multiples of the window"),
        (["run", "--docs", "0"], "docs must be >= 1"),
    ],
)
def test_bad_options_are_one_line(args, match, nowhere, tmp_path):
    if args and args[0] in ("train", "eval", "run") and "--data" not in args:
        args = [*args, "--data", nowhere, "--device", "cpu"]
    line = error_line(moshi(*args, cwd=tmp_path))
    assert re.search(match, line), line
    assert nowhere.read_text() == "not a corpus"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(tmp_path):
    line = error_line(moshi("train", "--device", "cuda", "--data", tmp_path, cwd=tmp_path))
    assert "CUDA is not available" in line and "--device cpu" in line


@pytest.mark.parametrize("command", [["train"], ["eval", "x.pt"], ["run"]])
def test_missing_corpus_is_refused_with_the_command_to_make_it(command, tmp_path):
    typo = tmp_path / "typo"
    line = error_line(moshi(*command, "--data", typo, "--device", "cpu", cwd=tmp_path))
    assert f"no corpus at {typo}" in line and f"moshi-ttt data prepare --out {typo}" in line
    assert not typo.exists()  # nothing built at a mistyped path


def test_only_the_default_corpus_is_prepared_automatically(tmp_path, monkeypatch):
    """``make run`` on a fresh clone: the study prepares data/corpus; a path given is not."""
    from moshi_ttt.data import prepare

    made, studied = [], []

    def fake_prepare(path, **kw):
        made.append(Path(path))
        Path(path).mkdir(parents=True)
        (Path(path) / "manifest.json").write_text("{}")

    monkeypatch.setattr(prepare, "prepare_corpus", fake_prepare)
    monkeypatch.setattr(
        cli, "run_study", lambda preset, data, out, device, **kw: studied.append(data)
    )
    monkeypatch.chdir(tmp_path)
    assert cli.main(["study", "--preset", "cpu", "--device", "cpu"]) == 0
    assert made == [Path("data/corpus")] and studied == [Path("data/corpus")]
    assert cli.main(["study", "--preset", "cpu", "--device", "cpu", "--data", "other"]) == 2
    assert made == [Path("data/corpus")]


def test_help_lists_every_memory_and_the_corpus_rule(tmp_path):
    from moshi_ttt.config import MEMORY_KINDS

    r = moshi("train", "--help", cwd=tmp_path)
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    memory = text[text.index("--memory MEMORY") : text.index("--window WINDOW attention")]
    assert all(kind in memory for kind in MEMORY_KINDS)
    assert "+tttN" in memory and "+tttN/tf32" in memory
    assert "prepared automatically when missing" in text
    assert "moshi-ttt data prepare --out DIR" in text
    assert "start from step 0" in text


def test_non_finite_loss_is_one_line_naming_no_unwritten_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    line = error_line(
        moshi(
            "train",
            "--data",
            corpus,
            "--device",
            "cpu",
            "--steps",
            "4",
            "--batch-size",
            "2",
            "--seq-len",
            "64",
            "--lr",
            "1e12",
            "--out",
            out,
            cwd=tmp_path,
        )
    )
    assert "non-finite training loss" in line and "no checkpoint was written" in line
    assert not (out / "train_state.pt").exists() and "train_state.pt" not in line


def test_resume_without_a_checkpoint_starts_at_step_0_and_says_so(corpus, tmp_path):
    out = tmp_path / "run"
    args = [
        "train",
        "--data",
        corpus,
        "--device",
        "cpu",
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--seq-len",
        "64",
        "--out",
        out,
        "--resume",
    ]
    r = moshi(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"no checkpoint at {out / 'train_state.pt'}: starting from step 0" in r.stderr
    r = moshi(*args, cwd=tmp_path)
    assert r.returncode == 0 and f"resuming from {out / 'train_state.pt'} at step 1" in r.stderr


def _checkpoint(path: Path, name: str) -> Path:
    """An untrained tiny window-16 model saved as a checkpoint named ``name``."""
    cfg = mt.ModelConfig.preset("tiny", memory=mt.MemoryConfig(kind="window", window=16))
    model = mt.StreamingLM(cfg)
    save_checkpoint(path, model, {"name": name})
    return path


EVAL = [
    "--max-len",
    "300",
    "--docs",
    "1",
    "--num",
    "1",
    "--distances",
    "1",
    "--buckets",
    "300",
    "--cross-session",
    "--no-diagnostics",
    "--device",
    "cpu",
]


def test_eval_keeps_every_model_when_names_repeat(corpus, tmp_path):
    a = _checkpoint(tmp_path / "A" / "model.pt", "same")
    b = _checkpoint(tmp_path / "B" / "model.pt", "same")
    out = tmp_path / "eval"
    r = moshi("eval", a, b, "--data", corpus, "--out", out, *EVAL, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    models = json.loads((out / "metrics.json").read_text())["models"]
    assert list(models) == ["same (A)", "same (B)"]
    assert [m["checkpoint"] for m in models.values()] == [str(a), str(b)]
    assert f"{a} is named 'same' like another model: reported as 'same (A)'" in r.stderr
    assert f"{b} is named 'same' like another model: reported as 'same (B)'" in r.stderr


def test_unique_names(capsys):
    from moshi_ttt.pipeline import unique_names

    runs = [Path("x/A/run/model.pt"), Path("x/B/run/model.pt"), Path("x/C/model.pt")]
    assert unique_names(["w", "w", "v"], runs) == ["w (A/run)", "w (B/run)", "v"]
    assert unique_names(["w", "w"], [runs[2], runs[2]]) == ["w (C)", "w (C) #2"]
    assert unique_names(["w", "v"], runs[:2]) == ["w", "v"]
    assert capsys.readouterr().err.count("like another model") == 4


def test_eval_checkpoint_with_an_incomplete_config(corpus, tmp_path):
    path = _checkpoint(tmp_path / "A" / "model.pt", "a")
    blob = torch.load(path, weights_only=True)
    del blob["config"]["memory"]
    torch.save(blob, path)
    line = error_line(
        moshi("eval", path, "--data", corpus, "--out", tmp_path / "eval", *EVAL, cwd=tmp_path)
    )
    assert f"{path}: its model config is invalid (no 'memory')" in line


def test_sessions_errors_are_one_line(tmp_path):
    """A store that does not exist is named; in one that does, the missing id is named."""
    store = tmp_path / "store"
    line = error_line(moshi("sessions", "show", "nope", "--store", store, cwd=tmp_path))
    assert f"no session store at {store}" in line and not store.exists()
    from moshi_ttt.sessions.store import SessionStore

    SessionStore(store)
    line = error_line(moshi("sessions", "show", "nope", "--store", store, cwd=tmp_path))
    assert "nope" in line


def test_unexpected_errors_keep_their_traceback(tmp_path, monkeypatch):
    def boom(a):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "cmd_data_prepare", boom)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["data", "prepare", "--out", str(tmp_path)])


def test_debug_shows_the_traceback_of_user_errors(tmp_path):
    r = process(
        "eval",
        "x.pt",
        "--docs",
        "0",
        "--data",
        tmp_path,
        "--device",
        "cpu",
        cwd=tmp_path,
        env={"MOSHI_TTT_DEBUG": "1"},
    )
    assert r.returncode != 0 and "Traceback" in r.stderr
    assert "ValueError: EvalConfig.docs" in r.stderr
