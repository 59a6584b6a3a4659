"""The ``pooled`` and ``infini`` competitors: parallel = streaming, and each memory read equals a
token-loop reference."""

import pytest
import torch
from conftest import assert_close, reset_parity, stream

import moshi_ttt as mt
from moshi_ttt.layers.infini import sigma
from moshi_ttt.ops.masks import segment_positions


def config(kind, combine="gate", window=5, num_virtual=3):
    return mt.ModelConfig(
        vocab_size=50,
        dim=32,
        num_layers=2,
        num_heads=4,
        memory=mt.MemoryConfig(kind=kind, window=window, num_virtual=num_virtual, combine=combine),
    )


def lively(model):
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.memory.gate.normal_(0, 1.0)
    return model


@pytest.mark.parametrize(
    "kind, combine", [("pooled", "gate"), ("pooled", "concat"), ("infini", "gate")]
)
@pytest.mark.parametrize("k", [1, 7, 37])
def test_parallel_equals_streaming(kind, combine, k):
    reset_parity(lively(mt.StreamingLM(config(kind, combine))).eval(), 400, 199, k, rel=1e-4)


@pytest.mark.parametrize("kind", ["pooled", "infini"])
def test_state_bytes_constant(kind):
    model = mt.StreamingLM(config(kind)).eval()
    with torch.no_grad():
        _, s1 = stream(model, torch.randint(0, 50, (1, 50)), 10)
        _, s2 = stream(model, torch.randint(0, 50, (1, 500)), 10)
    assert s1.nbytes() == s2.nbytes()


def inputs(T=23, W=5):
    g = torch.Generator().manual_seed(0)
    B, H, Dh = 2, 4, 8
    q, k, v = (torch.randn(B, H, T, Dh, dtype=torch.float64, generator=g) for _ in range(3))
    resets = torch.zeros(B, T, dtype=torch.bool)
    resets[1, 11] = True
    pos, seg = segment_positions(resets, B, T, "cpu")
    return q, k, v, pos, seg


def evicted(pos, seg, b, t, W):
    """Indices of the tokens evicted for query (b, t): same document, position <= pos - W."""
    return [p for p in range(t + 1) if seg[b, p] == seg[b, t] and pos[b, p] <= pos[b, t] - W]


def test_pooled_read_equals_token_loop():
    mem = mt.StreamingLM(config("pooled")).double().layers[0].self_attn.memory
    q, k, v, pos, seg = inputs()
    read = mem.virtual_parallel(q, k, v, pos, seg, None)
    W, M = 5, 3
    for b in range(2):
        for t in range(23):
            ps = evicted(pos, seg, b, t, W)
            assert read.has[b, t] == bool(ps)
            for m in range(M):
                members = [p for p in ps if pos[b, p] % M == m]
                if not members:
                    assert torch.isinf(read.scores[b, :, t, m]).all()
                    continue
                mk, mv = k[b, :, members].mean(1), v[b, :, members].mean(1)  # [H, Dh]
                score = (q[b, :, t] * mk).sum(-1) / 8**0.5 + torch.log(
                    torch.tensor(float(len(members)))
                )
                assert_close(read.scores[b, :, t, m], score.to(read.scores.dtype), 1e-6)
                assert_close(read.values[b, :, t, m], mv, 1e-9)


def test_infini_read_equals_token_loop():
    mem = mt.StreamingLM(config("infini")).double().layers[0].self_attn.memory
    q, k, v, pos, seg = inputs()
    read = mem.virtual_parallel(q, k, v, pos, seg, None)
    for b in range(2):
        for t in range(23):
            ps = evicted(pos, seg, b, t, 5)
            assert read.has[b, t] == bool(ps)
            if not ps:
                continue
            # [H, Dh, Dh]
            S = sum(sigma(k[b, :, p])[:, :, None] * v[b, :, p][:, None, :] for p in ps)
            z = sum(sigma(k[b, :, p]) for p in ps)
            sq = sigma(q[b, :, t])
            ref = (sq[:, None, :] @ S)[:, 0] / (sq * z).sum(-1, keepdim=True)
            assert_close(read.out[b, :, t], ref, 1e-9)
