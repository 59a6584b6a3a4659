"""The Python API: integer token dtypes are accepted, every other bad input raises ValueError."""

import pytest
import torch
from conftest import assert_close, tiny_config

import moshi_ttt as mt
from moshi_ttt.checkpoint import load_checkpoint, save_checkpoint
from moshi_ttt.pipeline import EvalConfig
from moshi_ttt.trainer import Trainer
from moshi_ttt.training import TrainConfig

KINDS = ["window", "full", "ttt_cache"]


def make(kind: str) -> mt.StreamingLM:
    cfg = tiny_config(kind)
    if kind == "window":  # with In-Place TTT, whose state has fp32 fast weights and counters
        cfg = mt.ModelConfig(
            vocab_size=50,
            dim=32,
            num_layers=2,
            num_heads=4,
            memory=cfg.memory,
            inplace_ttt=mt.InPlaceTTTConfig(layers=(1,), chunk_size=4),
        )
    return mt.StreamingLM(cfg).eval()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_integer_token_dtypes_equal_int64(kind, dtype):
    model = make(kind)
    tokens = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        ref = model(tokens)
        assert torch.equal(model(tokens.to(dtype)), ref)
        state = model.init_state(2)
        steps = [model.step(tokens[:, i : i + 3].to(dtype), state)[0] for i in range(0, 9, 3)]
    out = torch.cat(steps, 1)
    assert_close(out, ref, 1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_empty_batch(kind):
    model = make(kind)
    with pytest.raises(ValueError, match="at least one row"):
        model(torch.zeros(0, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one row"):
        model.step(torch.zeros(0, 4, dtype=torch.long), model.init_state(2))


@pytest.mark.parametrize("batch", [True, False, 0, -1, 2.0, "2", None])
def test_init_state_batch_size(batch):
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        make("window").init_state(batch)


def test_init_state_dtype():
    with pytest.raises(ValueError, match="floating point dtype"):
        make("window").init_state(2, dtype=torch.long)


@pytest.mark.parametrize(
    "resets, match",
    [
        (torch.zeros(2, 4), "bool"),
        (torch.zeros(2, 4, dtype=torch.float64), "bool"),
        ([[False] * 4] * 2, "torch.Tensor"),
    ],
)
def test_bad_resets(resets, match):
    with pytest.raises(ValueError, match=match):
        make("window")(torch.zeros(2, 4, dtype=torch.long), resets=resets)


def test_integer_resets_equal_bool():
    model = make("window")
    tokens, resets = torch.randint(0, 50, (2, 8)), torch.zeros(2, 8, dtype=torch.bool)
    resets[1, 5] = True
    with torch.no_grad():
        assert torch.equal(model(tokens, resets=resets.long()), model(tokens, resets=resets))


@pytest.mark.parametrize(
    "mask, match",
    [
        (torch.tensor([0.0, 1.0]), "bool"),
        (torch.tensor([True]), "shape"),
        ("ab", "reset mask"),
    ],
)
def test_bad_reset_mask(mask, match):
    with pytest.raises(ValueError, match=match):
        make("window").init_state(2).reset(mask)


def test_integer_reset_mask():
    state = make("window").init_state(2)
    state["pos"].fill_(3)
    state.reset(torch.tensor([0, 1]))
    assert state["pos"].tolist() == [3, 0]


@pytest.mark.parametrize("kind", KINDS)
def test_state_missing_a_tensor(kind, tmp_path):
    model = make(kind)
    name = "layers.1.v"
    state = model.init_state(2)
    del state.tensors[name], state.fills[name]
    with pytest.raises(ValueError, match=f"missing tensors \\['{name}'\\]"):
        model.step(torch.zeros(2, 1, dtype=torch.long), state)
    state.save(tmp_path / "s.pt")  # a consistent file that lacks a tensor
    with pytest.raises(ValueError, match="missing tensors"):
        model.step(torch.zeros(2, 1, dtype=torch.long), mt.StreamingState.load(tmp_path / "s.pt"))


@pytest.mark.parametrize("kind", KINDS)
def test_state_with_a_wrong_shape(kind, tmp_path):
    model = make(kind)
    state = model.init_state(2)
    model.step(torch.zeros(2, 3, dtype=torch.long), state)
    state["layers.0.k"] = state["layers.0.k"][..., :2].clone()
    with pytest.raises(ValueError, match="state tensor layers.0.k is"):
        model.step(torch.zeros(2, 1, dtype=torch.long), state)
    state.save(tmp_path / "s.pt")
    with pytest.raises(ValueError, match="state tensor layers.0.k is"):
        model.step(torch.zeros(2, 1, dtype=torch.long), mt.StreamingState.load(tmp_path / "s.pt"))


def test_state_with_a_wrong_dtype():
    model = make("window")
    state = model.init_state(2)
    state["pos"] = state["pos"].float()
    with pytest.raises(ValueError, match="state tensor pos"):
        model.step(torch.zeros(2, 1, dtype=torch.long), state)


def test_full_state_grows_and_stays_valid():
    model = make("full")
    state = model.init_state(1)
    with torch.no_grad():
        for _ in range(3):
            model.step(torch.zeros(1, 40, dtype=torch.long), state)
    assert state["layers.0.k"].shape[2] >= 120


def test_loading_a_malformed_state(tmp_path):
    model = make("window")
    state = model.init_state(2)
    state.save(tmp_path / "s.pt")
    blob = torch.load(tmp_path / "s.pt", weights_only=True)
    for key, value, match in (
        ("tensors", None, "not a complete saved state"),
        ("fills", {}, "tensors and fills differ"),
        ("meta", {"fingerprint": "x"}, "batch size"),
    ):
        torch.save({**blob, key: value}, tmp_path / "bad.pt")
        with pytest.raises(ValueError, match=match):
            mt.StreamingState.load(tmp_path / "bad.pt")


def test_checkpoint_with_an_incomplete_config(tmp_path):
    save_checkpoint(tmp_path / "m.pt", make("window"))
    blob = torch.load(tmp_path / "m.pt", weights_only=True)
    del blob["config"]["memory"]
    torch.save(blob, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="model config is invalid"):
        load_checkpoint(tmp_path / "bad.pt")
    blob["config"] = {**torch.load(tmp_path / "m.pt", weights_only=True)["config"], "colour": 1}
    torch.save(blob, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="model config is invalid"):
        load_checkpoint(tmp_path / "bad.pt")
    del blob["model"]
    torch.save(blob, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="incomplete checkpoint: no model"):
        load_checkpoint(tmp_path / "bad.pt")


@pytest.mark.parametrize(
    "over, match",
    [
        ({"seq_schedule": ((0, 64), (1, -5))}, "lengths must be >= 1"),
        ({"seq_schedule": ((4, 64), (1, 32))}, "increasing"),
        ({"seq_schedule": ((0, 64, 3),)}, "pairs"),
        ({"checkpoint_every": -1}, "checkpoint_every must be >= 0"),
        ({"eval_every": -1}, "eval_every must be >= 0"),
        ({"log_every": 0}, "log_every must be >= 1"),
        ({"warmup": -1}, "warmup"),
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"lr": float("inf")}, "lr must be a finite number"),
        ({"grad_clip": 0.0}, "grad_clip"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"seed": -1}, "seed"),
        ({"task_distances": (-3,)}, "task_distances"),
    ],
)
def test_train_config(over, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**over)


@pytest.mark.parametrize(
    "over, match",
    [
        ({"docs": 0}, "docs must be >= 1"),
        ({"max_len": 0}, "max_len must be >= 2"),
        ({"num": 0}, "num must be >= 1"),
        ({"buckets": (200, 100, -5)}, "buckets must be positive and increasing"),
        ({"buckets": ()}, "buckets must be positive and increasing"),
        ({"distances": (1, -1)}, "multiples of the window and must be >= 1"),
        ({"distances": (0,)}, "multiples of the window"),
        ({"tasks": ("nope",)}, "unknown tasks"),
        ({"cross_session_distance": 0}, "cross_session_distance"),
    ],
)
def test_eval_config(over, match):
    with pytest.raises(ValueError, match=match):
        EvalConfig(**over)


def _data():
    import numpy as np

    stream = np.random.default_rng(0).integers(0, 50, 4000).astype(np.uint8)
    return stream, np.array([[0, 2000], [2000, 4000]])


def test_non_finite_loss_names_only_a_written_checkpoint(tmp_path):
    cfg = TrainConfig(steps=6, batch_size=2, seq_len=32, lr=1e12, warmup=1)
    with pytest.raises(FloatingPointError, match="non-finite .* no checkpoint was written") as e:
        Trainer(make("window"), cfg, _data(), out=tmp_path / "a", progress=False).fit()
    assert "train_state.pt" not in str(e.value) and not (tmp_path / "a" / "train_state.pt").exists()
    cfg = TrainConfig(steps=6, batch_size=2, seq_len=32, lr=1e12, warmup=1, checkpoint_every=1)
    with pytest.raises(FloatingPointError, match=r"checkpoint is .*train_state.pt \(step 1\)"):
        Trainer(make("window"), cfg, _data(), out=tmp_path / "b", progress=False).fit()
    assert (tmp_path / "b" / "train_state.pt").is_file()


def test_resume_without_a_checkpoint_says_so(tmp_path, capsys):
    cfg = TrainConfig(steps=1, batch_size=2, seq_len=32, warmup=1)
    Trainer(make("window"), cfg, _data(), out=tmp_path, progress=False).fit(resume=True)
    err = capsys.readouterr().err
    assert f"no checkpoint at {tmp_path / 'train_state.pt'}: starting from step 0" in err
    with pytest.raises(ValueError, match="resume needs"):
        Trainer(make("window"), cfg, _data(), progress=False).fit(resume=True)
