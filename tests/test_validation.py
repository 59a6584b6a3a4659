"""Bad input raises ValueError naming the problem."""

import pytest
import torch
from conftest import tiny_config

import moshi_ttt as mt


@pytest.fixture
def model():
    return mt.StreamingLM(tiny_config("window"))


@pytest.mark.parametrize(
    "tokens, match",
    [
        (torch.zeros(5, dtype=torch.long), "shape"),
        (torch.zeros(1, 2, 3, dtype=torch.long), "shape"),
        (torch.zeros(2, 4), "integer dtype"),
        (torch.zeros(2, 4, dtype=torch.bool), "integer dtype"),
        (torch.full((2, 4), 50), r"token ids must be in \[0, 50\)"),
        (torch.full((2, 4), -1), r"token ids must be in"),
        (
            torch.full((2, 4), 255, dtype=torch.uint8),
            r"token ids must be in \[0, 50\), got min 255 max 255",
        ),
        ([[1, 2]], "torch.Tensor"),
        (torch.zeros(2, 0, dtype=torch.long), "at least one time step"),
    ],
)
def test_bad_tokens(model, tokens, match):
    with pytest.raises(ValueError, match=match):
        model(tokens)
    with pytest.raises(ValueError, match=match):
        model.step(tokens, model.init_state(2))


def test_batch_mismatch(model):
    with pytest.raises(ValueError, match="batch size 3 does not match the state's 2"):
        model.step(torch.zeros(3, 1, dtype=torch.long), model.init_state(2))


def test_bad_reset_mask(model):
    with pytest.raises(ValueError, match="reset mask must have shape"):
        model.init_state(2).reset(torch.tensor([True]))


def test_bad_resets_shape(model):
    with pytest.raises(ValueError, match="resets must have shape"):
        model(torch.zeros(2, 4, dtype=torch.long), resets=torch.zeros(2, 3, dtype=torch.bool))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: mt.MemoryConfig(kind="nope"), "unknown"),
        (lambda: mt.MemoryConfig(kind="ttt_cache", combine="sum"), "combine"),
        (lambda: mt.MemoryConfig(kind="ttt_cache", virtual_position="abs"), "virtual_position"),
        (lambda: mt.MemoryConfig(kind="ttt_cache", cold_start="warm"), "cold_start"),
        (lambda: mt.MemoryConfig(kind="ttt_cache", grad_precision="bf16"), "grad_precision"),
        (lambda: mt.MemoryConfig(kind="ttt_cache", block=0), "block must be >= 1"),
        (lambda: mt.MemoryConfig(kind="ttt_cache", bptt=-1), "bptt"),
        (lambda: mt.MemoryConfig(kind="ttt_cache", inner_lr=0.0), "inner_lr"),
        (lambda: mt.MemoryConfig(kind="ttt_cache", decay=1.0), "decay and momentum"),
        (lambda: mt.MemoryConfig(kind="ttt_cache", momentum=-0.1), "decay and momentum"),
        (lambda: mt.MemoryConfig(kind="ttt_cache", max_state_norm=0.0), "max_state_norm"),
        (lambda: mt.MemoryConfig(window=0), "window must be >= 1"),
        (lambda: mt.MemoryConfig(kind="sink", num_sink=0), "needs num_sink >= 1"),
        (lambda: mt.ModelConfig(dim=30, num_heads=4), "not divisible"),
        (lambda: mt.ModelConfig(dim=12, num_heads=4), "must be even"),
        (lambda: mt.ModelConfig(num_layers=0), "num_layers must be >= 1"),
        (
            lambda: mt.ModelConfig(num_layers=2, inplace_ttt=mt.InPlaceTTTConfig(layers=(2,))),
            "out of range",
        ),
        (lambda: mt.InPlaceTTTConfig(layers=(1, 1)), "duplicates"),
        (lambda: mt.InPlaceTTTConfig(target="x"), "target"),
        (lambda: mt.InPlaceTTTConfig(chunk_size=0), "chunk_size"),
        (lambda: mt.InPlaceTTTConfig(lr=0), "lr must be > 0"),
        (lambda: mt.InPlaceTTTConfig(clip_tau=-1.0), "clip_tau"),
        (lambda: mt.InPlaceTTTConfig(decay=1.0), "decay"),
        (lambda: mt.InPlaceTTTConfig(conv_kernel=0), "conv_kernel"),
        (lambda: mt.InPlaceTTTConfig(matmul_precision="medium"), "matmul_precision"),
        (lambda: mt.ModelConfig.preset("huge"), "unknown preset"),
        (lambda: mt.StreamingLM(tiny_config()).init_state(0), "batch_size"),
    ],
)
def test_impossible_configs(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_presets_roundtrip():
    ttt = mt.ModelConfig.preset("tiny", inplace_ttt=mt.InPlaceTTTConfig(layers=(1,), clip_tau=1e-5))
    for cfg in [mt.ModelConfig.preset(n) for n in mt.PRESETS] + [ttt]:
        assert mt.ModelConfig.from_dict(cfg.to_dict()) == cfg
        assert cfg.fingerprint() == mt.ModelConfig.from_dict(cfg.to_dict()).fingerprint()


@pytest.mark.parametrize(
    "spec, memory, ttt",
    [
        (
            "ttt_cache:decay=0.05,forget_gate=true",
            dict(kind="ttt_cache", decay=0.05, forget_gate=True),
            None,
        ),
        ("window+ttt2:ttt.decay=0.05", dict(kind="window"), dict(decay=0.05)),
        (
            "ttt_cache+ttt2:decay=0.01,ttt.clip_tau=0.5,ttt.lr=0.1",
            dict(kind="ttt_cache", decay=0.01),
            dict(clip_tau=0.5, lr=0.1),
        ),
    ],
)
def test_memory_specs_equal_the_configs_they_name(spec, memory, ttt):
    """A spec's memory and In-Place TTT fields against the same config built field by field."""
    import dataclasses

    from moshi_ttt.config import memory_variant, variant

    base = mt.ModelConfig.preset("tiny")
    _, cfg = memory_variant(base, spec, 64, 32)
    ref = variant(base, spec.partition(":")[0], 64, 32)
    ref = dataclasses.replace(ref, memory=dataclasses.replace(ref.memory, **memory))
    if ttt:
        ref = dataclasses.replace(ref, inplace_ttt=dataclasses.replace(ref.inplace_ttt, **ttt))
    assert cfg == ref


@pytest.mark.parametrize(
    "spec, match",
    [
        ("window:ttt.decay=0.1", "needs \\+tttN"),
        ("window+ttt2:ttt.layers=1", "not FIELD=VALUE"),
        ("window:kind=full", "not FIELD=VALUE"),
        ("window+ttt2:ttt.decay=x", "not a float"),
        ("ttt_cache:forget_gate=yes", "true or false"),
    ],
)
def test_bad_memory_specs(spec, match):
    from moshi_ttt.config import memory_variant

    with pytest.raises(ValueError, match=match):
        memory_variant(mt.ModelConfig.preset("tiny"), spec)
