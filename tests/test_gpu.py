"""GPU-only checks (``pytest -m gpu``): the streaming step under CUDA-graph replay."""

import pytest
import torch
from conftest import assert_close, graphed_and_eager

import moshi_ttt as mt
from moshi_ttt.graph import GraphedStep

pytestmark = pytest.mark.gpu
C = 16


def graph_model():
    cfg = mt.ModelConfig(
        vocab_size=256,
        dim=64,
        num_layers=4,
        num_heads=4,
        memory=mt.MemoryConfig(kind="window", window=32),
        inplace_ttt=mt.InPlaceTTTConfig(layers=(1, 3), chunk_size=C, lr=0.5),
    )
    torch.manual_seed(0)
    model = mt.StreamingLM(cfg).cuda().eval()
    with torch.no_grad():
        for layer in model.layers:
            if layer.is_ttt:
                layer.gating.target_conv.normal_(0, 0.3)
                layer.gating.target_proj.copy_(10 * torch.eye(cfg.dim))
    return model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_cuda_graph_replay_equals_eager_and_updates_fast_weights():
    model = graph_model()
    T = 3 * C + 5
    tokens = torch.randint(0, 256, (2, T), device="cuda")
    eager_state = model.init_state(2)
    eager = torch.cat([model.step(tokens[:, t : t + 1], eager_state)[0] for t in range(T)], 1)

    state = model.init_state(2)
    step = GraphedStep(model, state)
    outs, updates, prev = [], 0, state["layers.1.ttt.s"].clone()
    for t in range(T):
        outs.append(step(tokens[:, t : t + 1]).clone())
        s = state["layers.1.ttt.s"]
        if not torch.equal(s, prev):  # counted from the fast weights themselves
            updates += 1
            prev = s.clone()
    replayed = torch.cat(outs, 1)
    assert_close(replayed, eager, 1e-4, "logits")
    assert updates == T // C == 3
    for name, t in eager_state.tensors.items():
        assert_close(state[name], t, 1e-4, name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tf32_scan_close_to_fp32():
    from moshi_ttt.ops.inplace_ttt import ttt_chunk_scan

    g = torch.Generator(device="cuda").manual_seed(0)
    z, v = (
        torch.randn(2, 4 * 64, n, device="cuda", generator=g, requires_grad=True) for n in (96, 48)
    )
    w0 = torch.randn(48, 96, device="cuda", generator=g, requires_grad=True)
    outs = []
    for precision in ("highest", "high"):
        o, s = ttt_chunk_scan(z, v, w0, 0.01, 64, precision=precision)
        (gz,) = torch.autograd.grad(o.square().sum(), z)
        outs.append((o.detach(), s.detach(), gz))
    for a, b in zip(*outs):
        assert ((a - b).norm() / a.norm()).item() < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
@pytest.mark.parametrize("combine", ["gate", "concat"])
def test_ttt_cache_graph_replay_equals_eager(combine):
    cfg = mt.ModelConfig(
        vocab_size=256,
        dim=64,
        num_layers=2,
        num_heads=4,
        memory=mt.MemoryConfig(kind="ttt_cache", window=8, block=4, combine=combine),
    )
    torch.manual_seed(0)
    model = mt.StreamingLM(cfg).cuda().eval()
    T = 40
    outs, eager, state, eager_state = graphed_and_eager(model, T)
    assert_close(outs, eager, 1e-4, "logits")
    assert state["layers.0.updates"].tolist() == [(T - 8) // 4] * 2
    for name, t in eager_state.tensors.items():
        assert_close(state[name], t, 1e-4, name)
