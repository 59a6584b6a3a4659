"""GPU-only checks of the Moshi adapter (``pytest -m gpu``): LMGen replaying its CUDA graphs vs
the same LMGen run eagerly, and In-Place TTT / TTT-cache updates happening under replay (counted
from the state tensors themselves)."""

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import contextlib

import pytest
import torch
from conftest import assert_close
from moshi.models.lm import LMGen, LMModel
from moshi.utils.compile import no_cuda_graph

from moshi_ttt import InPlaceTTTConfig, MemoryConfig
from moshi_ttt.moshi import AdapterConfig, patch_lm
from moshi_ttt.moshi.config import tiny_lm_kwargs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

KW = tiny_lm_kwargs(
    dim=64,
    text_card=60,
    card=48,
    num_layers=4,
    context=40,
    depformer_dim=32,
    depformer_dim_feedforward=64,
)
C = 8
CFG = AdapterConfig(
    inplace_ttt=InPlaceTTTConfig(layers=(1, 3), chunk_size=C, lr=0.5, target="hidden"),
    memory=MemoryConfig(kind="ttt_cache", window=8, block=4, num_virtual=3),
    memory_layers=(0, 2),
)


def model(cfg=CFG, dtype=torch.float32):
    torch.manual_seed(0)
    lm = patch_lm(LMModel(device="cuda", dtype=dtype, **KW).eval(), cfg)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith("target_conv"):
                p.normal_(0, 0.5)
            elif name.endswith("target_proj"):
                p.copy_(3 * torch.eye(p.shape[0]))
            elif name.endswith("memory.vkey_proj") or name.endswith("memory.gate"):
                p.normal_(0, 0.5)
    return lm


def run(lm, user, graphs: bool, reset_at: int | None = None):
    """Greedy LMGen over user audio [B, 2, T]. Returns generated tokens [B, 3, T'], text logits
    [B, T, V], how many steps changed layer 1's fast weights and layer 0's compressor, final
    states."""
    B, _, T = user.shape
    logits, tokens, ttt_updates, cache_updates = [], [], 0, 0
    gen = LMGen(
        lm,
        use_sampling=False,
        on_text_logits_hook=lambda x: logits.append(x[:, 0, 0].float().clone()),
    )
    with contextlib.nullcontext() if graphs else no_cuda_graph(), gen.streaming(B):
        s = lm.transformer.layers[1].gating._streaming_state.tensors["s"]
        d = lm.transformer.layers[0].self_attn._streaming_state.tensors["d1"]
        prev_s, prev_d = s.clone(), d.clone()
        for t in range(T):
            if t == reset_at:
                gen.reset_streaming(torch.tensor([False, True], device="cuda"))
                prev_s, prev_d = s.clone(), d.clone()
            out = gen.step(user[:, :, t : t + 1])
            if out is not None:
                tokens.append(out[:, :, 0].clone())
            ttt_updates += int(not torch.equal(s, prev_s))
            cache_updates += int(not torch.equal(d, prev_d))
            prev_s, prev_d = s.clone(), d.clone()
        final = {
            k: v.clone()
            for k, v in lm.transformer.layers[1].gating._streaming_state.tensors.tensors.items()
        }
    return torch.stack(tokens, 2), torch.stack(logits, 1), ttt_updates, cache_updates, final


def user_audio(B=2, T=3 * C + 5):
    g = torch.Generator(device="cuda").manual_seed(1)
    return torch.randint(0, 48, (B, 2, T), device="cuda", generator=g)


@torch.no_grad()
def test_cuda_graph_replay_equals_eager_and_updates_under_replay():
    lm, user = model(), user_audio()
    T = user.shape[2]
    tok_g, log_g, ttt_g, cache_g, st_g = run(lm, user, graphs=True)
    tok_e, log_e, ttt_e, cache_e, st_e = run(lm, user, graphs=False)
    assert torch.equal(tok_g, tok_e)
    assert_close(log_g, log_e, 1e-4, "text logits")
    assert ttt_g == ttt_e == T // C  # one update per completed chunk, seen in the fast weights
    assert cache_g == cache_e > 0  # the compressor learned evicted tokens under replay too
    for name in st_e:
        assert_close(st_g[name], st_e[name], 1e-5 if name == "s" else 1e-4, name)  # s: ~100


@torch.no_grad()
def test_per_row_reset_under_replay():
    """LMGen.reset_streaming between replays: row 1 starts a new conversation (fast weights back to
    W0, buffered chunk dropped), row 0 goes on; same as eager."""
    lm, user = model(), user_audio()
    r = C + 3
    tok_g, log_g, _, _, st_g = run(lm, user, graphs=True, reset_at=r)
    tok_e, log_e, _, _, st_e = run(lm, user, graphs=False, reset_at=r)
    assert torch.equal(tok_g, tok_e)
    assert_close(log_g, log_e, 1e-4, "text logits")
    _, log_fresh, _, _, _ = run(lm, user[:, :, r:], graphs=True)
    assert_close(log_g[1, r:], log_fresh[1], 1e-4)  # row 1 after reset = a fresh conversation
    assert st_g["count"].tolist() == [(user.shape[2]) % C, (user.shape[2] - r) % C]


@torch.no_grad()
def test_bf16_model_replay_keeps_fp32_fast_weights():
    lm, user = model(dtype=torch.bfloat16), user_audio(T=2 * C)
    tok_g, log_g, ttt_g, _, st_g = run(lm, user, graphs=True)
    tok_e, log_e, ttt_e, _, st_e = run(lm, user, graphs=False)
    assert st_g["s"].dtype == torch.float32 and ttt_g == ttt_e == 2
    assert_close(st_g["s"], st_e["s"], 1e-3)
