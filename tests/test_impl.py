"""The implementation context (ops/impl.py) and the records of a pass (layers/records.py): what
each selects, that contexts nest and restore, and that bad choices are refused."""

import pytest
import torch
from conftest import assert_close

import moshi_ttt as mt
from moshi_ttt.layers import records
from moshi_ttt.ops import impl, ttt_scan_torch
from moshi_ttt.ops import ttt_cache as ops


def test_contexts_nest_and_restore():
    assert impl.current() == impl.Impl()
    with impl.implementation(reference={"update"}):
        with impl.implementation(kernels="off", reference={"read"}):
            assert impl.current() == impl.Impl("off", frozenset({"update", "read"}))
        assert impl.current() == impl.Impl("cuda", frozenset({"update"}))
        assert impl.reference("update") and not impl.reference("read")
    assert impl.current() == impl.Impl()


def test_bad_choices_are_refused():
    with pytest.raises(ValueError, match="kernels='gpu'"):
        impl.Impl("gpu")
    with pytest.raises(ValueError, match="unknown parts"):
        with impl.implementation(reference={"scan"}):
            pass


def test_kernels_take_cpu_tensors_only_under_the_interpreter(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with impl.implementation(kernels="interpret"):
        assert impl.kernel_runs(x) == (impl.triton is not None)
    assert not impl.kernel_runs(x)  # "cuda": CPU tensors never
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with impl.implementation(kernels="interpret"):
        assert not impl.kernel_runs(x)
    assert impl.powers_of_two(16, 64) and not impl.powers_of_two(8) and not impl.powers_of_two(48)


def cache_model():
    cfg = mt.ModelConfig(
        vocab_size=50,
        dim=32,
        num_layers=2,
        num_heads=4,
        memory=mt.MemoryConfig(kind="ttt_cache", window=8, block=4, cold_start="zero"),
    )
    return mt.StreamingLM(cfg).eval()


def test_update_part_selects_the_per_token_reference(monkeypatch):
    """With "update" on its reference, the compressor's blocks go through ``block_step_naive``;
    otherwise through the hand-written scan (``ops.ttt_scan_torch``, on the CPU)."""
    calls = {"naive": 0, "fast": 0}
    naive, fast = ops.block_step_naive, ttt_scan_torch.scan_states
    monkeypatch.setattr(
        ops, "block_step_naive", lambda *a: calls.update(naive=calls["naive"] + 1) or naive(*a)
    )
    monkeypatch.setattr(
        ttt_scan_torch, "scan_states", lambda *a: calls.update(fast=calls["fast"] + 1) or fast(*a)
    )
    model, tokens = cache_model(), torch.randint(0, 50, (1, 30))
    with torch.no_grad():
        with impl.implementation(reference={"update"}):
            ref = model(tokens)
        assert calls["naive"] > 0 and calls["fast"] == 0
        out = model(tokens)
    assert calls["fast"] > 0
    assert_close(out, ref, 1e-5, "logits")


def test_records_gather_per_memory_and_leave_nothing_behind():
    model, tokens = cache_model(), torch.randint(0, 50, (2, 30))
    mems = [layer.self_attn.memory for layer in model.layers]
    with records.reconstruction() as terms, torch.no_grad():
        model(tokens)
    assert set(terms) == set(mems) and all(len(t) == 1 for t in terms.values())
    per = [t[0][0] / t[0][1] for t in terms.values()]  # one call: Σ errors / tokens per memory
    assert_close(records.reconstruction_loss(terms), torch.stack(per).mean(), 1e-6, "loss")
    assert records.reconstruction_sink() is None and records.recorder() is None
    with records.recording() as stats, torch.no_grad():
        model(tokens)
    assert set(stats) == set(mems) and "alpha" in stats[mems[0]]
    assert not any(hasattr(m, "stats") or hasattr(m, "aux") for m in mems)
    with pytest.raises(ValueError, match="no block was absorbed"):
        records.reconstruction_loss({})
