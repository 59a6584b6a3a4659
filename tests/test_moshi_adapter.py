"""Moshi adapter on a tiny real ``moshi.models.LMModel`` (CPU): ours vs stock Moshi, streaming
(LMGen and the transformer's streaming forward) vs parallel, known pitfalls, checkpoints
written by Moshi's loader format, conversation training with carried memory, YaRN."""

import os

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import copy
import json
import math

import pytest
import torch
from conftest import assert_close
from moshi.models.lm import LMGen, LMModel
from moshi.models.loaders import CheckpointInfo
from moshi.modules.transformer import StreamingMultiheadAttention
from safetensors.torch import load_file, save_file

from moshi_ttt import InPlaceTTTConfig, MemoryConfig
from moshi_ttt.layers.mlp import GatedMLP
from moshi_ttt.moshi import (
    AdapterConfig,
    added_keys,
    load_added,
    load_full,
    load_stock,
    patch_lm,
    save_added,
    save_full,
    unpatch_lm,
)
from moshi_ttt.moshi.attention import MemoryAttention
from moshi_ttt.moshi.config import tiny_lm_kwargs
from moshi_ttt.moshi.gating import TTTGating
from moshi_ttt.moshi.streaming import state_nbytes
from moshi_ttt.moshi.train import conversation_losses, delayed_io, logits_losses
from moshi_ttt.ops import ttt_cache_triton as tct
from moshi_ttt.ops import ttt_step_triton as step
from moshi_ttt.ops.impl import implementation
from moshi_ttt.ops.inplace_ttt import chunk_target

TINY = tiny_lm_kwargs()
K, C = 5, 4  # codebooks (text + 4 audio), In-Place TTT chunk
TTT = InPlaceTTTConfig(layers=(1, 2), chunk_size=C, lr=0.5, target="hidden")
CACHE = MemoryConfig(kind="ttt_cache", window=6, block=2, num_virtual=3)
FULL = AdapterConfig(
    inplace_ttt=TTT,
    memory=CACHE,
    memory_layers=(0, 2),
    base_memory=MemoryConfig(kind="window", window=9),
)
# layers 1, 2 keep Moshi's ring
MIXED = AdapterConfig(inplace_ttt=TTT, memory=CACHE, memory_layers=(0,))
TRAIN = AdapterConfig(
    inplace_ttt=InPlaceTTTConfig(layers=(1,), chunk_size=C, target="hidden"),
    memory=CACHE,
    memory_layers=(0,),
    base_memory=MemoryConfig(kind="window", window=6),
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only contend on a shared machine
    yield
    torch.set_num_threads(n)


def stock(seed=0, **over) -> LMModel:
    torch.manual_seed(seed)
    return LMModel(**{**TINY, **over}).eval()


def codes(B, T, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, 40, (B, K, T), generator=g)
    c[:, 0] = torch.randint(0, 50, (B, T), generator=g)
    return c


def lively(lm):
    """Non-zero new parameters (as after training), so every one of them matters."""
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith("target_conv"):
                p.normal_(0, 0.5)
            elif name.endswith("target_proj"):
                p.copy_(3 * torch.eye(p.shape[0]))
            elif name.endswith("memory.vkey_proj") or name.endswith("memory.lr_w"):
                p.normal_(0, 0.5)
            elif name.endswith("memory.gate"):
                p.normal_(0, 1.0)
    return lm


def stream(lm, seq, k=1, B=None, events=None):
    """forward_text over seq [B, K, T], k steps a call -> text logits [B, 1, T, V]; ``events``
    {t: fn(lm)} runs before step t (resets, exec masks)."""
    outs = []
    with torch.no_grad(), lm.streaming(B or seq.shape[0]):
        t = 0
        while t < seq.shape[2]:
            n = k
            for e in events or {}:
                if t == e:
                    events[e](lm)
                elif t < e < t + n:
                    n = e - t
            outs.append(lm.forward_text(seq[:, :, t : t + n])[1])
            t += n
    return torch.cat(outs, 2)


def parallel(lm, seq):
    with torch.no_grad():
        return lm.forward_text(seq)[1]


def fast_weights(lm, i):
    return lm.transformer.layers[i].gating._streaming_state.tensors


# ---- ours vs stock Moshi ------------------------------------------------------------------
def test_gated_mlp_equals_moshi_activation_gating_exactly():
    g = stock().transformer.layers[0].gating
    mlp = GatedMLP(32, g.linear_out.in_features)
    # same names: linear_in = [W_gate; W_up], linear_out
    mlp.load_state_dict(g.state_dict(), strict=True)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        assert torch.equal(mlp(x), g(x))
        # conv 0: plain MLP
        fresh = TTTGating(
            copy.deepcopy(g), InPlaceTTTConfig(layers=(0,), chunk_size=3, target="hidden")
        )(x)
    assert_close(fresh, g(x), 1e-6)


def test_memory_off_logits_equal_stock_exactly():
    seq = codes(2, 30)
    ref = stock()
    lm = patch_lm(stock(), AdapterConfig())
    assert torch.equal(parallel(lm, seq), parallel(ref, seq))
    assert torch.equal(stream(lm, seq, 1), stream(ref, seq, 1))
    # Moshi's own ring, shorter
    short, ref_short = patch_lm(stock(), AdapterConfig(context=10)), stock(context=10)
    assert torch.equal(parallel(short, seq), parallel(ref_short, seq))
    assert torch.equal(stream(short, seq, 1), stream(ref_short, seq, 1))
    # our ring, same size
    ours = patch_lm(stock(), AdapterConfig(base_memory=MemoryConfig(kind="window", window=64)))
    assert torch.equal(parallel(ours, seq), parallel(ref, seq))
    assert_close(stream(ours, seq, 1), parallel(ref, seq), 1e-5)
    assert torch.equal(parallel(unpatch_lm(patch_lm(stock(), FULL)), seq), parallel(ref, seq))


def test_fresh_patch_reproduces_stock():
    """In-Place TTT starts as the plain MLP and the TTT cache's gate on the exact window: within
    the stock context a fresh patch is stock; beyond it only the small virtual weight σ(-6)
    differs."""
    cfg = AdapterConfig(
        inplace_ttt=InPlaceTTTConfig(layers=(0, 1, 2), chunk_size=C, target="hidden"),
        memory=MemoryConfig(kind="ttt_cache", window=64, block=4, num_virtual=3),
    )
    ref, lm = stock(), patch_lm(stock(), cfg)
    seq = codes(2, 60)
    assert_close(parallel(lm, seq), parallel(ref, seq), 1e-5, "parallel")
    assert_close(stream(lm, seq, 7), parallel(ref, seq), 1e-5, "streaming")
    long = codes(2, 100)
    gate_window = (parallel(lm, long) - parallel(ref, long)).abs().max().item()
    half = patch_lm(stock(), AdapterConfig(memory=cfg.memory, gate_init=0.0))
    gate_half = (parallel(half, long) - parallel(ref, long)).abs().max().item()
    assert gate_window < 0.05 * gate_half
    # trained: TTT acts
    assert (parallel(lively(lm), seq) - parallel(ref, seq)).abs().max().item() > 1e-2


# ---- streaming vs parallel ---------------------------------------------------------------
def record_forward_text(lm):
    rec, orig = [], lm.forward_text

    def fwd(seq, *args):
        out = orig(seq, *args)
        rec.append((seq.clone(), out[0].clone(), out[1].clone()))
        return out

    lm.forward_text = fwd  # LMGen graphs (on CUDA) or calls this bound function
    return rec


@pytest.mark.parametrize("cfg", [FULL, MIXED], ids=["full", "mixed"])
def test_lmgen_streaming_equals_parallel(cfg):
    lm = lively(patch_lm(stock(), cfg))
    rec = record_forward_text(lm)
    gen = LMGen(lm, use_sampling=False)
    user = codes(2, 40)[:, 3:]  # the user's two audio codebooks
    with gen.streaming(2):
        for t in range(user.shape[2]):
            gen.step(user[:, :, t : t + 1])
    del lm.forward_text
    # what LMGen fed: generated text/audio, user audio, delays
    seq = torch.cat([r[0] for r in rec], 2)
    with torch.no_grad():
        out, text = lm.forward_text(seq)
    assert_close(out, torch.cat([r[1] for r in rec], 1), 1e-4, "transformer output")
    assert_close(text, torch.cat([r[2] for r in rec], 2), 1e-4, "text logits")


CASES = {
    "ttt_cache+ttt": FULL,
    "concat": AdapterConfig(
        memory=MemoryConfig(
            kind="ttt_cache", window=5, block=3, combine="concat", cold_start="zero"
        )
    ),
    "pooled": AdapterConfig(memory=MemoryConfig(kind="pooled", window=5, num_virtual=2)),
    "infini": AdapterConfig(memory=MemoryConfig(kind="infini", window=5)),
    "sink": AdapterConfig(base_memory=MemoryConfig(kind="sink", window=6, num_sink=2)),
    "ttt_embed": AdapterConfig(
        inplace_ttt=InPlaceTTTConfig(layers=(0, 2), chunk_size=5, target="embed")
    ),
    "yarn": AdapterConfig(memory=CACHE, memory_layers=(1,), yarn_scale=4.0),
}


@pytest.mark.parametrize("k", [1, 7])
@pytest.mark.parametrize("name", list(CASES))
def test_streaming_forward_equals_parallel(name, k):
    lm = lively(patch_lm(stock(), CASES[name]))
    seq = codes(2, 45)
    assert_close(stream(lm, seq, k), parallel(lm, seq), 1e-4)


# ---- known pitfalls ----------------------------------------------------------------------
def test_every_row_keeps_its_own_fast_weights():
    lm = lively(patch_lm(stock(), FULL))
    seq = codes(3, 26)
    with torch.no_grad(), lm.streaming(3):
        batch = torch.cat([lm.forward_text(seq[:, :, t : t + 1])[1] for t in range(26)], 2)
        s = fast_weights(lm, 1)["s"].clone()
    for b in range(3):
        with torch.no_grad(), lm.streaming(1):
            alone = torch.cat(
                [lm.forward_text(seq[b : b + 1, :, t : t + 1])[1] for t in range(26)], 2
            )
            assert_close(fast_weights(lm, 1)["s"][0], s[b], 1e-5, "fast weights")
        assert_close(alone[0], batch[b], 1e-4, "logits")
    assert (s[0] - s[1]).abs().max().item() > 1e-2  # the rows did learn different things


def test_fast_weights_stay_fp32_in_a_bf16_model():
    cfg = AdapterConfig(
        inplace_ttt=InPlaceTTTConfig(layers=(1,), chunk_size=C, lr=1.0, target="hidden", decay=0.0)
    )  # the plain sum of the updates
    lm = lively(patch_lm(stock().to(torch.bfloat16), cfg))
    gating = lm.transformer.layers[1].gating
    seen = []
    gating.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    seq = codes(1, 2 * C)
    with torch.no_grad(), lm.streaming(1):
        for t in range(2 * C):
            lm.forward_text(seq[:, :, t : t + 1])
        s = fast_weights(lm, 1)["s"][0].clone()
    x = torch.cat(seen, 1)  # [1, 2C, D] bf16: the MLP inputs, step by step
    with torch.no_grad():
        z = gating.hidden(x).double()  # bf16 activations, as the layer computes them
        v = chunk_target(x.double(), gating.target_conv.double(), gating.target_proj.double(), C)
    ref = (v[0].T @ z[0]).double()  # Σ_chunks η V̂ᵀ Z with η = 1
    assert s.dtype == torch.float32
    assert_close(s, ref, 1e-5, floor=0.0)
    assert ((s.bfloat16().double() - ref).abs().max() / ref.abs().max()).item() > 1e-5


def test_fast_weight_updates_run_outside_autocast():
    """Under bf16 autocast the MLP runs in bf16, but the fast-weight update stays fp32: it equals a
    float64 reference from the same (bf16-rounded) activations."""
    from moshi_ttt.moshi.streaming import empty_state

    g = lively(patch_lm(stock(), AdapterConfig(inplace_ttt=TTT))).transformer.layers[1].gating
    st = empty_state(1)
    g.init_state(st.scope(""), 1, "cpu")
    x = torch.randn(1, C, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for t in range(C):
            g.step_one(x[:, t : t + 1], x[:, t : t + 1], st.scope(""))
        z = g.hidden(x).double()  # the activations the step saw (bf16 under autocast)
    v = chunk_target(x.double(), g.target_conv.double(), g.target_proj.double(), C)
    ref = TTT.lr * v[0].T @ z[0]
    assert st["s"].dtype == torch.float32
    assert_close(st["s"][0], ref, 1e-5, floor=0.0)
    assert ((st["s"][0].bfloat16().double() - ref).abs().max() / ref.abs().max()).item() > 1e-5


def test_lmgen_updates_the_fast_weights_every_chunk():
    """Counted from the fast weights themselves, not a Python counter (on CUDA the same step is
    replayed as a graph: tests/test_gpu_moshi.py)."""
    lm = lively(patch_lm(stock(), AdapterConfig(inplace_ttt=TTT)))
    gen = LMGen(lm, use_sampling=False)
    user, updates = codes(2, 18)[:, 3:], 0
    with gen.streaming(2):
        prev = fast_weights(lm, 1)["s"].clone()
        for t in range(18):
            gen.step(user[:, :, t : t + 1])
            s = fast_weights(lm, 1)["s"]
            updates += int(not torch.equal(s, prev))
            prev = s.clone()
    assert updates == 18 // C


def reset_row1_at(r):
    return {r: lambda lm: lm.reset_streaming(torch.tensor([False, True]))}


def test_reset_returns_to_the_trained_w_down():
    lm = lively(patch_lm(stock(), FULL))
    w = lm.transformer.layers[1].gating.linear_out.weight
    with torch.no_grad():
        w.add_(0.05 * torch.randn_like(w))  # "trained": W0 is no longer the pretrained W_down
    trained = w.detach().clone()
    seq, r = codes(2, 30), 13
    out = stream(lm, seq, 1, events=reset_row1_at(r))
    assert torch.equal(w, trained)  # the reset did not touch the model's W_down
    fresh = stream(lm, seq[1:, :, r:], 1)
    assert_close(out[1, :, r:], fresh[0], 1e-5, "row 1 after the reset vs a fresh row")
    assert_close(out[0], stream(lm, seq[:1], 1)[0], 1e-5, "row 0 vs row 0 alone")


def test_reset_clears_the_buffered_chunk():
    lm = lively(patch_lm(stock(), FULL))
    seq, r = codes(2, 30), 2 * C + 3  # row 1 resets with 3 tokens buffered in its open chunk
    with torch.no_grad(), lm.streaming(2):
        for t in range(r):
            lm.forward_text(seq[:, :, t : t + 1])
        st = fast_weights(lm, 1)
        assert st["count"].tolist() == [3, 3] and st["zbuf"][1].abs().sum() > 0
        lm.reset_streaming(torch.tensor([False, True]))
        assert st["count"].tolist() == [3, 0]
        for name in ("s", "zbuf", "xbuf"):
            assert st[name][1].abs().sum() == 0 and st[name][0].abs().sum() > 0
    out = stream(lm, seq, 1, events=reset_row1_at(r))
    assert_close(out[1, :, r:], stream(lm, seq[1:, :, r:], 1)[0], 1e-5)


@pytest.mark.parametrize(
    "cfg",
    [MIXED, FULL, CASES["sink"], CASES["pooled"], CASES["infini"]],
    ids=["mixed", "full", "sink", "pooled", "infini"],
)
def test_exec_mask_off_rows_keep_their_memory(cfg):
    """Moshi's set_exec_mask: a row switched off for some steps continues as if they never
    happened."""
    masked, ref = exec_mask_run(lively(patch_lm(stock(), cfg)))
    assert_close(masked, ref, 1e-5)


def exec_mask_run(lm, T=30, off_at=10):
    """Row 1 off for 5 junk steps after ``off_at``: its logits over the T real steps, and row 1
    streamed alone."""
    seq = codes(2, T)
    junk = codes(2, 5, seed=7)
    with torch.no_grad(), lm.streaming(2):
        a = [lm.forward_text(seq[:, :, t : t + 1])[1] for t in range(off_at)]
        lm.set_exec_mask(torch.tensor([True, False]))
        for t in range(5):
            lm.forward_text(junk[:, :, t : t + 1])
        lm.set_exec_mask(torch.tensor([True, True]))
        b = [lm.forward_text(seq[:, :, t : t + 1])[1] for t in range(off_at, T)]
    return torch.cat(a + b, 2)[1], stream(lm, seq[1:], 1)[0]


@pytest.mark.skipif(not tct.available(), reason="needs Triton")
def test_exec_mask_with_fused_step_kernels(monkeypatch):
    """The same through the one-token step kernels (Triton's interpreter on CPU), which ran on every
    TTT-cache step, and equal to the reference step. Row 1 is off while its open block holds b - 1
    tokens (window 6, block 16: from step 20), so the junk steps must not complete it."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off (set TRITON_INTERPRET=1 before import)")
    calls = []
    for name in ("evict_step", "attend_one"):
        fn = getattr(step, name)
        monkeypatch.setattr(step, name, lambda *a, _f=fn, **k: calls.append(1) or _f(*a, **k))
    cfg = AdapterConfig(
        memory=MemoryConfig(
            kind="ttt_cache", window=6, block=16, num_virtual=3, compressor_hidden=16
        ),
        memory_layers=(0,),
    )
    lm = lively(patch_lm(stock(num_heads=2), cfg))  # head width 16
    with implementation(kernels="interpret"):
        masked, ref = exec_mask_run(lm, T=40, off_at=20)
    # both kernels, every step of the masked run (40 + 5) and the reference
    assert len(calls) == 2 * (45 + 40)
    assert_close(masked, ref, 1e-5, "masked vs row 1 alone")
    with implementation(kernels="off"):
        plain, _ = exec_mask_run(lm, T=40, off_at=20)
    assert_close(masked, plain, 1e-5, "kernels vs reference step")


# ---- checkpoints ----------------------------------------------------------------------------
def write_stock_checkpoint(d, seed=3):
    """A tiny Moshi checkpoint in Moshi's layout: safetensors weights + config.json of LMModel
    kwargs."""
    lm = stock(seed)
    save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(TINY))
    return lm


def test_stock_checkpoint_loads_strictly_then_patches(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ref = write_stock_checkpoint(tmp_path).state_dict()
    info = CheckpointInfo.from_hf_repo(
        "kyutai/not-downloaded",
        moshi_weights=tmp_path / "model.safetensors",
        mimi_weights=tmp_path / "mimi.safetensors",
        tokenizer=tmp_path / "tok.model",
        config_path=tmp_path / "config.json",
    )
    # get_moshi_lm: load_state_dict(strict=True)
    lm = info.get_moshi(device="cpu", dtype=torch.float32)
    mine = load_stock(tmp_path / "config.json", tmp_path / "model.safetensors", dtype=torch.float32)
    for m in (lm, mine):
        sd = m.state_dict()
        assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    patch_lm(lm, FULL)
    sd = lm.state_dict()
    assert set(sd) - set(ref) == set(added_keys(lm)) and set(ref) <= set(sd)
    assert all(torch.equal(sd[k], ref[k]) for k in ref)  # stock weights under their stock names
    res = lm.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=False)
    assert sorted(res.missing_keys) == sorted(added_keys(lm)) and not res.unexpected_keys


def test_added_weights_round_trip_separately_and_together(tmp_path):
    write_stock_checkpoint(tmp_path)
    load = lambda: load_stock(
        tmp_path / "config.json", tmp_path / "model.safetensors", dtype=torch.float32
    )
    a = lively(patch_lm(load(), FULL))
    save_added(a, tmp_path / "added.safetensors")
    save_full(a, tmp_path / "full.safetensors")
    saved = load_file(str(tmp_path / "added.safetensors"))
    assert set(saved) == set(added_keys(a)) and not set(saved) & set(load().state_dict())
    b = patch_lm(load(), FULL)
    load_added(b, tmp_path / "added.safetensors")
    c = patch_lm(stock(seed=99), FULL)  # other stock weights: all replaced by the full file
    load_full(c, tmp_path / "full.safetensors")
    sa = a.state_dict()
    seq = codes(2, 20)
    for m in (b, c):
        sm = m.state_dict()
        assert sm.keys() == sa.keys() and all(torch.equal(sm[k], sa[k]) for k in sa)
        assert torch.equal(parallel(m, seq), parallel(a, seq))
        assert torch.equal(stream(m, seq, 3), stream(a, seq, 3))


def test_checkpoint_errors(tmp_path):
    a = patch_lm(stock(), FULL)
    save_added(a, tmp_path / "added.safetensors")
    save_full(a, tmp_path / "full.safetensors")
    with pytest.raises(ValueError, match="saved from a model patched with"):
        load_added(patch_lm(stock(), MIXED), tmp_path / "added.safetensors")
    with pytest.raises(ValueError, match="format"):
        load_added(patch_lm(stock(), FULL), tmp_path / "full.safetensors")
    with pytest.raises(ValueError, match="no file of added"):
        load_added(a, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="not patched"):
        load_full(stock(), tmp_path / "full.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable"):
        load_added(a, tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="no file"):
        load_stock(tmp_path / "config.json", tmp_path / "model.safetensors")


# ---- bad input ----------------------------------------------------------------------------------
def _patched_twice():
    patch_lm(patch_lm(stock(), FULL), FULL)


def _patch_while_streaming():
    lm = stock()
    with lm.streaming(1):
        patch_lm(lm, FULL)


@pytest.mark.parametrize(
    "make, msg",
    [
        (lambda: AdapterConfig(memory=MemoryConfig(kind="full")), "not supported in Moshi"),
        (lambda: AdapterConfig(base_memory=MemoryConfig(kind="ttt_cache")), "base_memory.kind"),
        (lambda: AdapterConfig(yarn_scale=1.0), "yarn_scale"),
        (lambda: AdapterConfig(memory_layers=(1,)), "memory is None"),
        (lambda: AdapterConfig(memory=CACHE, memory_layers=(1, 1)), "duplicates"),
        (lambda: AdapterConfig(context=0), "context"),
        (lambda: AdapterConfig.preset("huge"), "unknown adapter preset"),
        (
            lambda: patch_lm(stock(), AdapterConfig(inplace_ttt=InPlaceTTTConfig(layers=(7,)))),
            "out of range",
        ),
        (
            lambda: patch_lm(stock(), AdapterConfig(memory=CACHE, memory_layers=(3,))),
            "out of range",
        ),
        (lambda: patch_lm("model", FULL), "LMModel"),
        (lambda: patch_lm(stock(), "cfg"), "AdapterConfig"),
        (_patched_twice, "already patched"),
        (_patch_while_streaming, "before it starts streaming"),
        (lambda: patch_lm(stock(gating="gelu"), AdapterConfig(inplace_ttt=TTT)), "silu"),
        (lambda: unpatch_lm(stock()), "not patched"),
        (lambda: conversation_losses(patch_lm(stock(), FULL), codes(1, 10)[0, :3], 5), "shape"),
        (
            lambda: conversation_losses(patch_lm(stock(), FULL), codes(1, 10)[0].float(), 5),
            "integer",
        ),
        (
            lambda: conversation_losses(patch_lm(stock(), FULL), codes(1, 10)[0] + 60, 5),
            "out of range",
        ),
        (lambda: conversation_losses(patch_lm(stock(), FULL), codes(1, 10)[0], 0), "segment"),
        (
            lambda: conversation_losses(patch_lm(stock(), MIXED), codes(1, 100)[0], 8),
            "ring KV cache of 64",
        ),
        (
            lambda: conversation_losses(
                patch_lm(stock(), TRAIN), codes(1, 20)[0], C, backward=True
            ),
            "TTT gets no gradient",
        ),
    ],
)
def test_bad_input_raises_clear_value_error(make, msg):
    with pytest.raises(ValueError, match=msg):
        make()


def test_presets_patch_and_serialise():
    for name in ("off", "inplace_ttt", "ttt_cache", "both"):
        cfg = AdapterConfig.preset(name, num_layers=3)
        assert AdapterConfig.from_json(cfg.to_json()) == cfg
        patch_lm(stock(), cfg)
    big = AdapterConfig.preset("both", num_layers=32)
    assert big.inplace_ttt.layers == (5, 11, 17, 23, 29) and big.memory_layers == tuple(
        range(3, 32, 4)
    )


# ---- conversation training --------------------------------------------------------------------
def test_memory_carries_across_segments_and_reset_does_not():
    lm = lively(patch_lm(stock(), TRAIN))
    conv = codes(1, 36)[0]
    other = conv.clone()
    other[:, :12] = codes(1, 12, seed=5)[0]  # another first segment, same later segments
    with torch.no_grad():
        carried, carried_other = (
            conversation_losses(lm, conv, 12),
            conversation_losses(lm, other, 12),
        )
        reset, reset_other = (
            conversation_losses(lm, conv, 12, carry=False),
            conversation_losses(lm, other, 12, carry=False),
        )
        out = lm(conv[None, :, 12:24])  # stock Moshi's own training forward on segment 2 alone
    for i in (1, 2):
        assert abs(carried[i]["loss"] - carried_other[i]["loss"]).item() > 1e-4
        assert_close(reset[i]["loss"], reset_other[i]["loss"], 1e-6)
    text = torch.nn.functional.cross_entropy(
        out.text_logits[out.text_mask], conv[None, :1, 12:24][out.text_mask]
    )
    audio = torch.nn.functional.cross_entropy(
        out.logits[out.mask], conv[None, 1:3, 12:24][out.mask]
    )
    assert_close(reset[1]["text"], text, 1e-5, "text loss")
    assert_close(reset[1]["audio"], audio, 1e-5, "audio loss")


def test_carried_segments_equal_one_parallel_pass():
    lm = lively(patch_lm(stock(), TRAIN))
    conv = codes(1, 40)[0]
    with torch.no_grad():
        carried = conversation_losses(lm, conv, 13)  # 13, 13, 13, 1 steps
        inputs, targets = delayed_io(lm, conv[None])
        out, text = lm.forward_text(inputs)
        audio = lm.forward_depformer_training(targets, out)
    assert len(carried) == 4
    for i, s in enumerate(range(0, 40, 13)):
        ref = logits_losses(
            lm, text[:, :, s : s + 13], audio[:, :, s : s + 13], targets[:, :, s : s + 13], s
        )
        for name in ("text", "audio"):
            assert_close(carried[i][name], ref[name], 1e-5, name)


def test_segment_backward_matches_forward_and_reaches_new_parameters():
    lm = lively(patch_lm(stock(), TRAIN)).train()
    conv = codes(1, 24)[0]
    trained = conversation_losses(lm, conv, 8, backward=True)
    with torch.no_grad():
        plain = conversation_losses(lm, conv, 8)
    for a, b in zip(trained, plain):
        assert_close(a["loss"], b["loss"], 1e-5)
    for key in (
        "transformer.layers.1.gating.target_conv",
        "transformer.layers.0.self_attn.memory.probes",
    ):
        g = lm.get_parameter(key).grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


# ---- YaRN
# ------------------------------------------------------------------------------------------
def paper_yarn(head_dim, base, s, L, alpha=1.0, beta=32.0):
    """YaRN (Peng et al. 2023) §3.2 per pair: r = L/λ, ramp γ, h(θ) = (1 - γ) θ/s + γ θ."""
    out = []
    for d in range(head_dim // 2):
        theta = base ** (-2 * d / head_dim)
        r = L / (2 * math.pi / theta)
        gamma = 0.0 if r < alpha else 1.0 if r > beta else (r - alpha) / (beta - alpha)
        out.append((1 - gamma) * theta / s + gamma * theta)
    return torch.tensor(out, dtype=torch.float64)


def rotate(x, pos, freqs):
    """Pairs (x[2d], x[2d+1]) as complex numbers times exp(i pos θ_d). x [B, H, T, D], pos [T]."""
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(
        xc * torch.polar(torch.ones((), dtype=torch.float64), pos.double()[:, None] * freqs)
    ).flatten(-2)


@pytest.mark.parametrize("head_dim, context", [(8, 64), (128, 3000)])
def test_yarn_rope_matches_the_paper(head_dim, context):
    s = 4.0
    lm = patch_lm(
        stock(dim=head_dim * 2, num_heads=2, context=context),
        AdapterConfig(memory=CACHE, memory_layers=(0,), yarn_scale=s),
    )
    rope, want = lm.transformer.rope, paper_yarn(head_dim, 10000, s, context)
    assert all(layer.self_attn.rope is rope for layer in lm.transformer.layers[1:])
    q, k = torch.randn(2, 2, 9, head_dim), torch.randn(2, 2, 9, head_dim)
    offset = torch.tensor([0, 1234])
    qo, ko = rope(q, k, offset)
    m = 0.1 * math.log(s) + 1  # √(1/t) on q and k each
    for b in range(2):
        pos = offset[b] + torch.arange(9)
        assert_close(qo[b], m * rotate(q[b : b + 1], pos, want)[0], 1e-3, "q")  # fp32 angles
        assert_close(ko[b], m * rotate(k[b : b + 1], pos, want)[0], 1e-3, "k")
    attn = lm.transformer.layers[0].self_attn
    assert_close(attn.freqs.double() / want, torch.ones_like(want), 1e-6, "frequency / the paper's")
    assert_close(attn.memory.inv_t, m * m, 1e-6)
    theta = paper_yarn(head_dim, 10000, 1.0, context)
    kept, scaled = (
        (want == theta).sum().item(),
        torch.isclose(want, theta / s, rtol=1e-12).sum().item(),
    )
    if head_dim == 128:  # the ramp keeps high frequencies and interpolates low ones
        assert (kept, scaled) == (19, 21) and torch.equal(want[:kept], theta[:kept])


# ---- the 7B benchmark's tiny mode ----------------------------------------------------------------
def load_bench(name: str = "moshi_bench"):
    """bench/NAME.py as a module (bench/ on the path while it loads, as when run as a script)."""
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "bench"
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(folder))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(folder))
    return mod


def test_profile_tiny_profiles_steady_states(tmp_path):
    """bench/profile_moshi.py streams --fill steps (rows staggered) before it times and profiles;
    what it writes is what it returns, and a --stagger beyond --fill is refused."""
    prof = load_bench("profile_moshi")
    args = ["--tiny", "--device", "cpu", "--variants", "window64,ttt_cache", "--batches", "2"]
    args += ["--extra-batches", "", "--frames", "2", "--profiled", "1"]
    out = tmp_path / "p.json"
    res = prof.main(args + ["--fill", "6", "--stagger", "3", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert (res["fill"], res["stagger"]) == (6, 3)
    runs = [(r["variant"], r["batch"]) for r in res["runs"]]
    assert runs == [("window64", 2), ("ttt_cache", 2)]
    with pytest.raises(SystemExit):
        prof.main(args + ["--fill", "2", "--stagger", "3", "--out", str(out)])


def test_profile_kernel_table_equals_a_plain_tally():
    """profile_moshi.kernel_table (kernels grouped by name, the most GPU time first) against a
    tally of the same events one by one; names alike in their first 90 characters are one."""
    from types import SimpleNamespace

    prof = load_bench("profile_moshi")
    g = torch.Generator().manual_seed(0)
    names = ["a" * 95 + "x", "a" * 95 + "y", "gemm", "copy", "rope"]
    events = [
        SimpleNamespace(name=names[int(i)], device_time=float(t))
        for i, t in zip(torch.randint(0, 5, (200,), generator=g), torch.rand(200, generator=g))
    ]
    n, top = 4, 3
    tally: dict[str, list] = {}
    for e in events:
        row = tally.setdefault(e.name[:90], [0, 0.0])
        row[0], row[1] = row[0] + 1, row[1] + e.device_time
    want = sorted(tally.items(), key=lambda kv: -kv[1][1])[:top]
    got = prof.kernel_table(events, n, top)
    assert [r["name"] for r in got] == [k for k, _ in want]
    for r, (_, (count, us)) in zip(got, want):
        assert r["calls_per_step"] == count / n
        assert r["gpu_us_per_step"] == pytest.approx(us / n, rel=1e-9)


def test_profile_idle_time_equals_the_span_less_the_busy_time():
    """profile_moshi.gaps_before: the idle time between kernels (some overlapping) equals their
    span less the length of the union of their intervals, and its pairs add up to it."""
    from types import SimpleNamespace

    prof = load_bench("profile_moshi")
    g = torch.Generator().manual_seed(1)
    starts = torch.rand(60, generator=g) * 100
    lengths = torch.rand(60, generator=g) * 3
    events = [
        SimpleNamespace(
            name=f"k{i % 4}", time_range=SimpleNamespace(start=float(s), end=float(s + d))
        )
        for i, (s, d) in enumerate(zip(starts, lengths))
    ]
    n = 2
    busy, cur = 0.0, None  # the union's length, interval by interval in start order
    for e in sorted(events, key=lambda e: e.time_range.start):
        a, b = e.time_range.start, e.time_range.end
        if cur is None or a > cur[1]:
            busy += 0.0 if cur is None else cur[1] - cur[0]
            cur = [a, b]
        else:
            cur[1] = max(cur[1], b)
    busy += cur[1] - cur[0]
    span = max(e.time_range.end for e in events) - min(e.time_range.start for e in events)
    idle, pairs = prof.gaps_before(events, n, top=1000)
    assert idle == pytest.approx((span - busy) / n, rel=1e-9)
    assert sum(p["idle_us_per_step"] for p in pairs) == pytest.approx(idle, rel=1e-9)


def test_bench_tiny_reports_the_states_it_ran(tmp_path):
    bench = load_bench()
    out = bench.main(
        [
            "--tiny",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
            "--variants",
            "off,both,window64",
            "--checkpoints",
            "5,20",
            "--max-batch",
            "2",
            "--frames",
            "2",
            "--latency-rounds",
            "2",
        ]
    )
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(out))
    assert (tmp_path / "results.png").stat().st_size > 0
    md = (tmp_path / "results.md").read_text()
    # per layer: ring K/V (fp32) + 2 offsets; the transformer's
    stock_bytes = 3 * (2 * 64 * 32 * 4 + 8 + 8) + 8
    for name in ("off", "both"):
        lm = patch_lm(stock(), AdapterConfig.preset(name, num_layers=3))
        with lm.streaming(1):
            want = state_nbytes(lm)
        assert [r["state_bytes"] for r in out["variants"][name]["series"]] == [want, want]
        assert out["variants"][name]["search"]["at_max"]["state_bytes"] == 2 * want
        for r in out["variants"][name]["series"]:
            # the mean of the timed frames, and the slowest of them
            assert r["ms_per_frame_max"] >= r["ms_per_frame"]
            assert (
                f"| {name} | {r['steps']} | {r['ms_per_frame']:.2f} | {r['ms_per_frame_max']:.2f} "
                f"| {r['state_bytes'] / 1e6:.2f} |" in md
            )
    assert out["variants"]["off"]["series"][0]["state_bytes"] == stock_bytes
    # window64: stock Moshi with a ring of 64 steps (the tiny model's own context is 64 too)
    assert [r["state_bytes"] for r in out["variants"]["window64"]["series"]] == [stock_bytes] * 2
    assert (
        "Against `window64`" in md
        and out["ratios_window64"]["both"]["state_vs_stock"]
        == out["variants"]["both"]["series"][-1]["state_bytes"] / stock_bytes
    )
    # two interleaved batch-1 rounds at the first checkpoint: the first is the series' own
    rounds = {n: v["latency_rounds_ms"] for n, v in out["variants"].items()}
    for name, v in out["variants"].items():
        assert len(rounds[name]) == 2 and rounds[name][0] == v["series"][0]["ms_per_frame"]
        assert f"| {name} | {rounds[name][0]:.2f}, {rounds[name][1]:.2f} |" in md
    median = lambda v: sorted(v)[0] / 2 + sorted(v)[1] / 2
    assert out["ratios_window64"]["both"]["latency_b1_median"] == pytest.approx(
        median(rounds["both"]) / median(rounds["window64"]), rel=1e-12
    )
    with pytest.raises(ValueError, match="latency-rounds"):
        bench.parse(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--latency-rounds", "0"])


def test_bench_variant_leaves_stock_moshi_as_it_was():
    """``variant`` patches a preset (or sets window64's context) inside its block only: the model's
    parameters, attention modules and contexts afterwards equal those before."""
    bench = load_bench()
    lm = stock()
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    attns = [(layer.self_attn, layer.self_attn.context) for layer in lm.transformer.layers]
    for name, kind in (("window64", StreamingMultiheadAttention), ("ttt_cache", MemoryAttention)):
        with bench.variant(lm, name) as (cfg, fused, context):
            inside = [type(layer.self_attn) for layer in lm.transformer.layers]
            assert kind in inside
            if context is not None:
                assert all(layer.self_attn.context == context for layer in lm.transformer.layers)
        assert [(layer.self_attn, layer.self_attn.context) for layer in lm.transformer.layers] == (
            attns
        )
        after = lm.state_dict()
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], v) for k, v in before.items())


def test_bench_staggered_rows_stream_as_many_steps_as_they_were_let():
    """``stagger_rows``: row r sits out r mod n of n steps, in Moshi's LMGen and in the project's
    memory layers alike (both follow the exec mask), so the rows' offsets differ afterwards."""
    bench = load_bench()
    lm = patch_lm(stock(), AdapterConfig.preset("ttt_cache", num_layers=3))
    B, n = 5, 3
    gen = LMGen(lm, use_sampling=True)
    with gen.streaming(B):
        bench.stagger_rows(gen, lm, B, n, torch.device("cpu"))
        want = n - torch.arange(B) % n
        assert torch.equal(gen._streaming_state.offsets, want)
        mems = [m for m in lm.modules() if isinstance(m, MemoryAttention)]
        assert mems and all(torch.equal(m._streaming_state.offset, want) for m in mems)
        assert bool(gen._streaming_state.exec_mask.all())


def test_streaming_step_of_a_memory_layer_copies_nothing_where_stock_attention_copies():
    """A same-dtype contiguous ``copy_`` is a memcpy node in a captured CUDA graph. Stock Moshi's
    attention copies its offset update in each step; a memory layer's step adds to its offset in
    place and issues no copy at all (both counted on a streaming step with some rows off)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Copies.n += func.overloadpacket is torch.ops.aten.copy_
            return func(*args, **(kwargs or {}))

    def copies_per_attention(lm, kind):
        attn = [m for m in lm.modules() if isinstance(m, kind)][0]
        inner = attn.forward

        def counted(*a, **k):
            with Copies():
                return inner(*a, **k)

        attn.forward = counted
        Copies.n = 0
        with torch.no_grad(), lm.streaming(2):
            for t in range(3):
                lm.set_exec_mask(torch.tensor([True, t != 1]))
                lm.forward_text(codes(2, 1, seed=t))
        return Copies.n / 3

    ours = patch_lm(stock(), AdapterConfig.preset("ttt_cache", num_layers=3))
    assert copies_per_attention(stock(), StreamingMultiheadAttention) >= 1
    assert copies_per_attention(ours, MemoryAttention) == 0


def test_bench_variant_names():
    """PRESET[+tf32][+unfused]: the options apply to presets that have what they change, else a
    clear error."""
    bench = load_bench()
    for name, tf32, fused in [
        ("ttt_cache", False, True),
        ("ttt_cache+unfused", False, False),
        ("both+tf32+unfused", True, False),
        ("both+unfused+tf32", True, False),
        ("both+tf32", True, True),
    ]:
        cfg, on, context = bench.variant_config(name, 32)
        assert on == fused and cfg.memory.kind == "ttt_cache" and context is None
        assert (cfg.inplace_ttt.matmul_precision == "high") == tf32 if cfg.inplace_ttt else not tf32
    cfg, _, context = bench.variant_config("window64", 32)
    assert context == 64 and cfg.memory is None and cfg.inplace_ttt is None
    for bad in ("off+unfused", "ttt_cache+tf32", "ttt_cache+fused", "ttt_cache+unfused+unfused"):
        with pytest.raises(ValueError, match="bad variant"):
            bench.variant_config(bad, 32)


def test_bench_search_matches_a_linear_scan():
    """Doubling + bisection against a scan of a synthetic cost (ms = 3 + 0.7 B, OOM from some B
    on)."""
    import argparse

    bench = load_bench()
    for threshold, oom_at, max_batch in [
        (80, 1000, 4096),
        (80, 50, 4096),
        (10, 1000, 4096),
        (80, 1000, 16),
        (2, 1000, 64),
        (500, 1000, 4096),
    ]:
        fake = lambda lm, B, args, device, oom_at=oom_at: (
            {"batch": B, "oom": True}
            if B >= oom_at
            else {"batch": B, "ms_per_frame": 3 + 0.7 * B, "peak_bytes": 0}
        )
        for resolution in (1 / 16, 1 / 128):
            args = argparse.Namespace(
                threshold_ms=threshold, max_batch=max_batch, resolution=resolution
            )
            res = bench.concurrency(None, args, torch.device("cpu"), float("inf"), measure=fake)
            truth = max(
                [B for B in range(1, max_batch + 1) if B < oom_at and 3 + 0.7 * B <= threshold],
                default=0,
            )
            assert (
                res["max_concurrent"]
                <= truth
                <= res["max_concurrent"] + max(1, int(res["max_concurrent"] * resolution))
            )
            assert res["stopped_by"] == (
                "max batch"
                if truth == max_batch
                else "out of memory"
                if truth == oom_at - 1
                else f"> {threshold} ms"
            )
    # two searches compared at the largest batch both measured without OOM
    args = argparse.Namespace(threshold_ms=80, max_batch=4096, resolution=1 / 128)
    cost = lambda a, oom_at: (
        lambda lm, B, args, device: (
            {"batch": B, "oom": True} if B >= oom_at else {"batch": B, "ms_per_frame": 3 + a * B}
        )
    )
    slow, fast = (
        bench.concurrency(None, args, torch.device("cpu"), float("inf"), measure=cost(a, 4000))
        for a in (0.75, 0.7)
    )
    common = {t["batch"] for t in slow["tried"]} & {t["batch"] for t in fast["tried"]}
    for limit in (fast["max_concurrent"], 64):
        got = bench.same_batch(slow["tried"], fast["tried"], limit)
        B = max(b for b in common if b <= limit)
        assert got == {"same_batch": B, "ms_vs_base_same_batch": (3 + 0.75 * B) / (3 + 0.7 * B)}
    assert bench.same_batch(slow["tried"], [{"batch": 5, "oom": True}], 4096) == {}
    # 5 GB fixed, 1 GB/conv
    goods = [{"batch": 8, "peak_bytes": 5e9 + 8e9}, {"batch": 16, "peak_bytes": 5e9 + 16e9}]
    assert bench.fits(goods, 60, 66e9) and not bench.fits(goods, 62, 66e9)


@pytest.mark.parametrize("clip,decay", [(None, 0.0), (1e-3, 0.0), (None, 0.25)])
def test_one_step_fast_path_equals_the_layer_step(clip, decay):
    """TTTGating.step_one (LMGen's one step a call) against the project's InPlaceTTTMLP.step on the
    same state, token by token through three chunks, in eval mode (with the inference clip)."""
    from moshi_ttt.moshi.streaming import empty_state

    cfg = InPlaceTTTConfig(
        layers=(0,), chunk_size=C, lr=0.5, target="hidden", clip_tau=clip, decay=decay
    )
    g = lively(patch_lm(stock(), AdapterConfig(inplace_ttt=cfg))).transformer.layers[0].gating
    states = [empty_state(2), empty_state(2)]
    for st in states:
        g.init_state(st.scope(""), 2, "cpu")
    x = torch.randn(2, 3 * C + 2, 32)
    with torch.no_grad():
        for t in range(x.shape[1]):
            fast = g.step_one(x[:, t : t + 1], x[:, t : t + 1], states[0].scope(""))
            ref = g.step(x[:, t : t + 1], x[:, t : t + 1], states[1].scope(""))
            assert_close(fast, ref, 1e-5, "output")
            for name, a in states[0].tensors.items():
                assert_close(a, states[1][name], 1e-5, name)
    assert states[0]["s"].abs().sum() > 0 and states[0]["count"].tolist() == [2, 2]


def test_mixed_step_sizes_equal_parallel():
    """Multi-step calls (the project's step) and one-step calls (the fast path) share one state."""
    lm = lively(patch_lm(stock(), FULL))
    seq = codes(2, 40)
    sizes = [1, 6, 1, 1, 9, 1, 3, 1, 1, 1, 7, 1, 1, 1, 1, 1, 1, 1, 1]
    assert sum(sizes) == 40
    with torch.no_grad(), lm.streaming(2):
        outs, t = [], 0
        for n in sizes:
            outs.append(lm.forward_text(seq[:, :, t : t + n])[1])
            t += n
    assert_close(torch.cat(outs, 2), parallel(lm, seq), 1e-4)
