"""Readers of the memory of evicted tokens: the TTT cache's query read and its own compressor
projections, and the per-token gate of every gated memory. Parallel equals streaming, the fast
read equals the reference in float64, new parameters start as the model without them, the state
stays flat, and a CUDA-graph replay equals eager steps."""

import dataclasses

import pytest
import torch
from conftest import assert_close, graphed_and_eager, reset_parity, stream

import moshi_ttt as mt
from moshi_ttt.ops.impl import implementation

READERS = [
    dict(read_query=True),
    dict(gate_per_token=True),
    dict(compressor_proj=True),
    dict(read_query=True, gate_per_token=True, compressor_proj=True),
]


def reader_config(kind="ttt_cache", window=6, block=4, num_virtual=3, **kw) -> mt.ModelConfig:
    return mt.ModelConfig(
        vocab_size=50,
        dim=32,
        num_layers=2,
        num_heads=4,
        memory=mt.MemoryConfig(
            kind=kind, window=window, block=block, num_virtual=num_virtual, **kw
        ),
    )


def lively(model):
    """Every reader parameter away from its initial value, so each one matters (as after
    training)."""
    with torch.no_grad():
        for layer in model.layers:
            mem = layer.self_attn.memory
            for name in ("vkey_proj", "gate_w", "lr_w"):
                if hasattr(mem, name):
                    getattr(mem, name).normal_(0, 0.3)
            mem.gate.normal_(0, 1.0)
            for name in ("kv_proj", "q_proj"):
                if hasattr(mem, name):
                    getattr(mem, name).add_(0.1 * torch.randn_like(getattr(mem, name)))
    return model


@pytest.mark.parametrize("extra", READERS)
@pytest.mark.parametrize(
    "combine, cold", [("gate", "wait"), ("concat", "zero"), ("gate", "learned")]
)
def test_reader_parallel_equals_streaming_with_resets(extra, combine, cold):
    """Batch 3, row 1 reset mid-stream, 2000 tokens (the window wraps 300+ times), steps of one
    token (the open block) and of 37 (the block layout) in turn: fp32 logits within 1e-4."""
    cfg = reader_config(combine=combine, cold_start=cold, **extra)
    reset_parity(lively(mt.StreamingLM(cfg)).eval(), 2000, 999, [1] * 7 + [37], 1e-4)


@pytest.mark.parametrize("k", [1, 5, 13])
@pytest.mark.parametrize(
    "extra",
    [
        dict(compressor_shared=True),
        dict(compressor_depth=3),
        dict(momentum=0.5, decay=0.1),
        dict(virtual_position="decay"),
    ],
)
def test_query_read_parallel_equals_streaming_with_update_options(k, extra):
    model = lively(
        mt.StreamingLM(reader_config(read_query=True, compressor_proj=True, **extra))
    ).eval()
    tokens = torch.randint(0, 50, (2, 150))
    with torch.no_grad():
        out, _ = stream(model, tokens, k)
        assert_close(out, model(tokens), 1e-4)


@pytest.mark.parametrize("kind", ["pooled", "infini"])
def test_per_token_gate_parallel_equals_streaming_for_other_memories(kind):
    model = lively(mt.StreamingLM(reader_config(kind=kind, gate_per_token=True))).eval()
    tokens = torch.randint(0, 50, (2, 300))
    with torch.no_grad():
        for k in (1, 11):
            out, _ = stream(model, tokens, k)
            assert_close(out, model(tokens), 1e-4)


def logits_and_grads(model, tokens, **kw) -> list:
    model.zero_grad()
    logits = model(tokens, **kw)
    weight = torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype).view_as(logits)
    (logits * weight).sum().backward()
    return [logits.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize(
    "extra",
    READERS
    + [
        dict(read_query=True, virtual_position="decay"),
        dict(read_query=True, compressor_shared=True),
    ],
)
def test_fast_read_equals_reference_read_float64(extra):
    """The fast training read (every query against every state's virtual tokens, masked) and the
    explicit banded window equal the reference per-query read: logits and every gradient."""
    model = lively(mt.StreamingLM(reader_config(window=8, block=4, **extra))).double()
    tokens = torch.randint(0, 50, (2, 70))
    fast = logits_and_grads(model, tokens)
    with implementation(reference={"read", "window", "update"}):
        ref = logits_and_grads(model, tokens)
    assert len(fast) == len(ref)
    for a, b in zip(fast, ref):
        assert_close(a, b, 1e-6)


def test_query_read_blocks_equal_a_per_query_gather():
    """The block layout of the training query read equals reading each query's own state."""
    model = mt.StreamingLM(reader_config(window=7, block=3, read_query=True)).double()
    mem = model.layers[0].self_attn.memory
    G, L, Dh, m = 2 * 4, 40, 8, 16
    S = (L - 7) // 3 + 1
    states = (
        torch.randn(G, S, Dh, m, dtype=torch.float64),
        torch.randn(G, S, m, Dh, dtype=torch.float64),
    )
    qn = torch.randn(G, L, Dh, dtype=torch.float64)
    out = mem._query_read_blocks(states, qn, rows=2)
    for p in range(L):
        n = max(p - 7 + 1, 0) // 3
        h = torch.nn.functional.gelu(qn[:, p : p + 1] @ states[0][:, n])
        assert_close(out[:, p : p + 1], h @ states[1][:, n], 1e-12)


@pytest.mark.parametrize(
    "extra, new",
    [(dict(compressor_proj=True), ("kv_proj", "q_proj")), (dict(gate_per_token=True), ("gate_w",))],
)
def test_new_reader_parameters_start_as_the_model_without_them(extra, new):
    """Identity projections and a zero gate weight: the same logits as the model without them."""
    torch.manual_seed(3)
    base = mt.StreamingLM(reader_config(read_query=True)).double()
    model = mt.StreamingLM(reader_config(read_query=True, **extra)).double()
    missing = model.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert {k.rsplit(".", 1)[-1] for k in missing} == set(new)
    tokens = torch.randint(0, 50, (2, 90))
    with torch.no_grad():
        assert_close(model(tokens), base(tokens), 1e-12)


@pytest.mark.parametrize("extra", READERS)
def test_readers_keep_the_state_flat(extra):
    """The readers add no state: its bytes equal the plain TTT cache's, after 100 and 1000
    tokens."""
    model = mt.StreamingLM(reader_config(**extra)).eval()
    plain = mt.StreamingLM(reader_config()).eval()
    sizes = []
    for m in (model, plain):
        state = m.init_state(2)
        with torch.no_grad():
            m.step(torch.randint(0, 50, (2, 100)), state)
            first = state.nbytes()
            m.step(torch.randint(0, 50, (2, 900)), state)
        sizes.append((first, state.nbytes()))
        assert all(torch.isfinite(t).all() for t in state.tensors.values() if t.is_floating_point())
    assert sizes[0] == sizes[1] and sizes[0][0] == sizes[0][1]


def test_reader_options_need_a_memory_that_has_them():
    for name in ("read_query", "compressor_proj"):
        with pytest.raises(ValueError, match=name):
            mt.MemoryConfig(kind="pooled", **{name: True})
    with pytest.raises(ValueError, match="gate_per_token"):
        mt.MemoryConfig(kind="window", gate_per_token=True)
    base = mt.MemoryConfig(kind="ttt_cache")
    assert (
        reader_config().fingerprint()
        == dataclasses.replace(
            reader_config(), memory=dataclasses.replace(reader_config().memory)
        ).fingerprint()
    )
    assert (
        mt.ModelConfig(memory=base).fingerprint()
        != mt.ModelConfig(memory=dataclasses.replace(base, read_query=True)).fingerprint()
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_readers_cuda_graph_replay_equals_eager():
    cfg = mt.ModelConfig(
        vocab_size=256,
        dim=64,
        num_layers=2,
        num_heads=4,
        memory=mt.MemoryConfig(
            kind="ttt_cache",
            window=8,
            block=4,
            read_query=True,
            gate_per_token=True,
            compressor_proj=True,
        ),
    )
    model = lively(mt.StreamingLM(cfg)).cuda().eval()
    outs, eager, state, eager_state = graphed_and_eager(model, 40)
    assert_close(outs, eager, 1e-4)
    for name, t in eager_state.tensors.items():
        assert_close(state[name].float(), t.float(), 1e-4, name)


@pytest.mark.parametrize("kind", ["ttt_cache", "pooled", "infini"])
def test_gate_init_starts_a_memory_at_the_model_it_was_added_to(kind):
    """A window model's weights in a gated memory whose gate starts at 30 (α = 1 - 1e-13): the same
    logits as the window model, past many evictions; at 0 (equal mixing) they differ; streaming
    equals parallel at a gate start of 2."""
    torch.manual_seed(0)
    window = mt.StreamingLM(reader_config("window")).eval()
    tokens = torch.randint(0, 50, (2, 200))
    with torch.no_grad():
        ref = window(tokens)
        for start, same in ((30.0, True), (0.0, False)):
            model = mt.StreamingLM(reader_config(kind, gate_init=start)).eval()
            assert torch.equal(model.layers[0].self_attn.memory.gate, torch.full((4,), start))
            model.load_state_dict(window.state_dict(), strict=False)
            out = model(tokens)
            if same:
                assert_close(out, ref, 1e-5, f"{kind}, gate start {start}")
            else:
                assert (out - ref).abs().max() > 1e-2 * ref.abs().max()
    reset_parity(mt.StreamingLM(reader_config(kind, gate_init=2.0)).eval(), 300, 111, [1, 37], 1e-4)
    with pytest.raises(ValueError, match="gate_init must be finite"):
        mt.MemoryConfig(kind=kind, gate_init=float("nan"))
