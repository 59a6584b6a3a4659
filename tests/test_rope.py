"""RoPE and YaRN (ops/rope.py): vectorised vs per-pair reference, the paper's ramp and
temperature."""

import math

import pytest
import torch
from conftest import assert_close

from moshi_ttt.ops.rope import (
    apply_rope,
    apply_rope_qk,
    rope_angles,
    rope_frequencies,
    rotate,
    rotate_reference,
    yarn_attention_scale,
    yarn_frequencies,
    yarn_frequencies_naive,
    yarn_ramp,
)


@pytest.mark.parametrize(
    "head_dim,max_period,scale,context,fast,slow",
    [
        (128, 10_000.0, 4.0, 3000, 32.0, 1.0),  # Moshi 7B extended 4x
        (128, 10_000.0, 16.0, 3000, 32.0, 1.0),
        (64, 10_000.0, 1.5, 2048, 32.0, 1.0),
        (8, 10_000.0, 4.0, 300, 32.0, 1.0),  # the tiny test model: all three regimes
        (96, 500_000.0, 8.0, 8192, 16.0, 2.0),  # other boundaries
        (128, 10_000.0, 1.0, 3000, 32.0, 1.0),  # no extension
    ],
)
def test_yarn_vectorised_equals_per_pair_reference(
    head_dim, max_period, scale, context, fast, slow
):
    fast_path = yarn_frequencies(
        head_dim, max_period, scale, context, beta_fast=fast, beta_slow=slow
    )
    ref = yarn_frequencies_naive(
        head_dim, max_period, scale, context, beta_fast=fast, beta_slow=slow
    )
    assert fast_path.dtype == torch.float32
    assert_close(fast_path / ref, torch.ones_like(ref), 1e-6, "frequency / reference")


def test_yarn_ramp_and_temperature():
    """Moshi's RoPE (head dim 128, max_period 10000, 3000-step context), s = 4.
    r(d) = L / λ_d turns of pair d over the context: r < α = 1 -> θ/s, r > β = 32 -> θ (untouched),
    between: blended, and blending moves monotonically from θ (fast pairs) to θ/s (slow pairs)."""
    D, b, L, s = 128, 10_000.0, 3000, 4.0
    theta = rope_frequencies(D, b)
    h = yarn_frequencies(D, b, s, L)
    # per pair, in Python floats
    r = [L / (2 * math.pi / (b ** (-2 * d / D))) for d in range(D // 2)]
    slow = [d for d in range(D // 2) if r[d] < 1.0]
    fast = [d for d in range(D // 2) if r[d] > 32.0]
    band = [d for d in range(D // 2) if 1.0 <= r[d] <= 32.0]
    assert (len(fast), len(band), len(slow)) == (19, 24, 21)
    assert fast == list(range(19)) and slow == list(range(43, 64))  # high frequencies are kept
    assert torch.equal(h[fast], theta[fast])
    assert_close(h[slow] / (theta[slow] / s), torch.ones(len(slow)), 1e-6, "h / (θ/s)")
    # the band: strictly between θ/s and θ, the kept fraction γ falling with d
    gamma = (h[band] - theta[band] / s) / (theta[band] - theta[band] / s)
    assert ((gamma > 0) & (gamma < 1)).all() and (gamma.diff() < 0).all()
    assert_close(gamma, torch.tensor([(r[d] - 1) / 31 for d in band], dtype=torch.float64), 1e-5)
    # counted from the result: 19 pairs untouched, 21 divided by s (43 pairs have r > α: a ramp
    # with α and β swapped would leave all 43 untouched, the earlier attempt's count)
    assert int((h == theta).sum()) == 19
    assert int(torch.isclose(h, theta / s, rtol=1e-6, atol=0).sum()) == 21
    # the slowest pair's wavelength is stretched s times
    assert_close(2 * math.pi / h[-1].item(), s * 2 * math.pi / theta[-1].item(), 1e-6)
    # temperature: √(1/t) = 0.1 ln s + 1 on q and k each, 1/t on the logits
    assert_close(yarn_attention_scale(s), 0.1 * math.log(4.0) + 1.0, 1e-12)
    assert_close(yarn_attention_scale(s), 1.1386294361, 1e-9)
    assert_close(yarn_attention_scale(s) ** 2, 1.2964769928, 1e-9)
    assert yarn_attention_scale(1.0) == 1.0 and yarn_attention_scale(0.5) == 1.0


def test_yarn_ramp_boundaries():
    """γ at and around α and β against the piecewise definition."""
    r = torch.tensor(
        [0.0, 0.5, 1.0, 1.0 + 1e-3, 16.5, 32.0 - 1e-3, 32.0, 40.0], dtype=torch.float64
    )
    ref = [0.0 if x < 1 else 1.0 if x > 32 else (x - 1) / 31 for x in r.tolist()]
    assert_close(yarn_ramp(r, 1.0, 32.0), torch.tensor(ref, dtype=torch.float64), 1e-12)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_yarn_scale_one_is_plain_rope(scale):
    """No extension: identical frequencies, identical rotations."""
    plain, yarn = rope_frequencies(128, 10_000.0), yarn_frequencies(128, 10_000.0, scale, 3000)
    assert torch.equal(plain, yarn)
    x, pos = torch.randn(2, 3, 11, 128), torch.randint(0, 5000, (2, 11))
    assert torch.equal(apply_rope(x, pos, plain), apply_rope(x, pos, yarn))


ROTATE_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", ROTATE_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_rotate_equals_pair_by_pair_reference_bit_for_bit(device, dtype):
    """``rotate`` (x c2 + swap(x) s2) against ``rotate_reference`` (pair by pair): the same
    products and sums, so equal bit for bit, on a permuted view as the layers pass (q, k of one
    projection), at large positions, with the angles per row and time or one per virtual token
    ([M, D/2], broadcast); ``apply_rope_qk`` equals ``apply_rope`` on each of q and k; and the
    gradients."""
    g = torch.Generator().manual_seed(0)
    B, T, H, D = 2, 7, 3, 16
    qkv = (10 * torch.randn(B, T, 3, H, D, generator=g)).to(device, dtype)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4)  # [B, H, T, D] views, not contiguous
    pos = torch.randint(0, 10**6, (B, T), generator=g).to(device)
    freqs = rope_frequencies(D, 10_000.0, device)
    cos, sin = rope_angles(pos, freqs)
    assert torch.equal(rotate(q, cos, sin), rotate_reference(q, cos, sin))
    qr, kr = apply_rope_qk(q, k, pos, freqs)
    assert torch.equal(qr, rotate_reference(q, cos, sin)) and qr.dtype == dtype
    assert torch.equal(kr, apply_rope(k, pos, freqs))
    angle = -torch.arange(5, device=device)[:, None] * 37.0 * freqs  # [M, D/2]
    v = torch.randn(B, H, 5, D, generator=g).to(device, dtype)
    c, s = torch.cos(angle), torch.sin(angle)
    assert torch.equal(rotate(v, c, s), rotate_reference(v, c, s))
    # gradients: x's bit for bit, also where x has another use (autograd then sums three terms);
    # those of the angles (not needed by the layers) to rounding
    x = q.detach().requires_grad_(True)
    c_, s_ = cos.clone().requires_grad_(True), sin.clone().requires_grad_(True)
    w = torch.linspace(-1, 1, x.numel(), device=device).view_as(x)
    grads = []
    for fn in (rotate, rotate_reference):
        x.grad = c_.grad = s_.grad = None
        ((fn(x, c_, s_) * w).sum() + (x.float() * w.flip(-1)).sum()).backward()
        grads.append((x.grad.clone(), c_.grad.clone(), s_.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0])
    assert_close(grads[0][1], grads[1][1], 1e-5, "cos gradient")
    assert_close(grads[0][2], grads[1][2], 1e-5, "sin gradient")


def test_yarn_rejects_impossible_arguments():
    with pytest.raises(ValueError, match="original_context"):
        yarn_frequencies(128, 10_000.0, 4.0, 0)
    with pytest.raises(ValueError, match="beta_fast"):
        yarn_frequencies(128, 10_000.0, 4.0, 3000, beta_fast=1.0, beta_slow=1.0)


# ---- ModelConfig ---------------------------------------------------------------------------
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402

from conftest import reset_parity, stream, tiny_config  # noqa: E402

import moshi_ttt as mt  # noqa: E402
from moshi_ttt.layers.attention import StreamingAttention  # noqa: E402

# tiny head dim 8 at L = 300: r = 47.7 (kept), 4.8 (blended), 0.48, 0.048 (interpolated)
S, L0 = 4.0, 300


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(rope_scale=0.5, rope_original_context=300), "rope_scale"),
        (dict(rope_scale=float("nan"), rope_original_context=300), "rope_scale"),
        (dict(rope_scale=float("inf"), rope_original_context=300), "rope_scale"),
        (dict(rope_original_context=-1), "rope_original_context"),
        (dict(rope_scale=2.0), "needs rope_original_context"),
    ],
)
def test_model_config_rejects_bad_rope_fields(kw, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(tiny_config(), **kw)


def test_model_config_old_dicts_load_and_keep_their_fingerprint():
    """A dict written before the RoPE, compressor depth/sharing, reader, gate-start and
    forget-gate fields loads to the config it was made with (the gate starting at 0, the default
    then) with the hash it had."""
    cfg = tiny_config("ttt_cache")
    cfg = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, gate_init=0.0))
    old = {k: v for k, v in cfg.to_dict().items() if not k.startswith("rope_")}
    later = ("read_query", "gate_per_token", "gate_init", "forget_gate")
    old["memory"] = {
        k: v
        for k, v in old["memory"].items()
        if k not in later and (not k.startswith("compressor_") or k == "compressor_hidden")
    }
    assert mt.ModelConfig.from_dict(old) == cfg
    assert (
        cfg.fingerprint()
        == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    )
    yarn = dataclasses.replace(cfg, rope_scale=4, rope_original_context=L0)
    assert mt.ModelConfig.from_dict(json.loads(json.dumps(yarn.to_dict()))) == yarn
    assert yarn.rope_scale == 4.0 and isinstance(yarn.rope_scale, float)
    assert (
        len(
            {
                cfg.fingerprint(),
                yarn.fingerprint(),
                dataclasses.replace(yarn, rope_scale=2.0).fingerprint(),
            }
        )
        == 3
    )
    deep = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, compressor_depth=3))
    assert (
        deep.fingerprint() != cfg.fingerprint() and mt.ModelConfig.from_dict(deep.to_dict()) == deep
    )
    shut = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, gate_init=4.0))
    assert (
        shut.fingerprint() != cfg.fingerprint() and mt.ModelConfig.from_dict(shut.to_dict()) == shut
    )


# ---- the model ------------------------------------------------------------------------------
def yarn(cfg: mt.ModelConfig, scale: float = S) -> mt.ModelConfig:
    return dataclasses.replace(cfg, rope_scale=scale, rope_original_context=L0)


def cache_config(**kw) -> mt.ModelConfig:
    return mt.ModelConfig(
        vocab_size=50,
        dim=32,
        num_layers=2,
        num_heads=4,
        memory=mt.MemoryConfig(kind="ttt_cache", window=6, block=4, num_virtual=3, **kw),
    )


def twin(cfg_a: mt.ModelConfig, cfg_b: mt.ModelConfig):
    """Two models with the same weights; memory gates and virtual-key projections made non-zero."""
    a = mt.StreamingLM(cfg_a).eval()
    with torch.no_grad():
        for m in a.modules():
            for name in ("gate", "vkey_proj"):
                if isinstance(getattr(m, name, None), torch.nn.Parameter):
                    getattr(m, name).normal_(0, 0.5)
    b = mt.StreamingLM(cfg_b).eval()
    b.load_state_dict(a.state_dict())
    return a, b


def test_yarn_attention_equals_scaled_qk_reference():
    """Full attention with YaRN vs the paper written out: q, k rotated at h(θ), each multiplied by
    √(1/t) = 0.1 ln s + 1, then softmax(qᵀk / √Dh) with a causal mask."""
    att = StreamingAttention(yarn(tiny_config("full"))).eval()
    B, T, H, Dh = 2, 40, 4, 8
    # positions far past L0 / S too
    x, pos = torch.randn(B, T, 32), torch.arange(T).expand(B, T) * 37
    with torch.no_grad():
        out = att(x, pos, None)
        q, k, v = att.in_proj(x).view(B, T, 3, H, Dh).permute(2, 0, 3, 1, 4)
        h, m = yarn_frequencies_naive(Dh, 10_000.0, S, L0), yarn_attention_scale(S)
        q, k = apply_rope(q, pos, h) * m, apply_rope(k, pos, h) * m
        logits = (q @ k.transpose(-1, -2) / math.sqrt(Dh)).masked_fill(
            ~torch.ones(T, T).tril().bool(), float("-inf")
        )
        ref = att.out_proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(B, T, 32))
    assert_close(out, ref, 1e-4)


@pytest.mark.parametrize("kind", ["full", "window", "sink", "ttt_cache", "pooled", "infini"])
def test_yarn_temperature_reaches_every_logit(kind):
    """The YaRN model equals the model without the temperature (same YaRN frequencies) whose
    queries are multiplied by 1/t, in the parallel and the streaming paths: 1/t multiplies every
    softmax logit, window and memory. infini's memory read has no logits: only the windowed q."""
    cfg = cache_config(combine="concat") if kind == "ttt_cache" else tiny_config(kind, window=6)
    temp, plain = twin(yarn(cfg), yarn(cfg, 1.0))
    inv_t = yarn_attention_scale(S) ** 2
    scaled = lambda h: h._replace(  # 1/t on the queries the softmax logits use
        q=h.q * inv_t, q_raw=h.q_raw if kind == "infini" else h.q_raw * inv_t
    )
    for att in (mod for mod in plain.modules() if isinstance(mod, StreamingAttention)):
        att.freqs = yarn_frequencies(8, 10_000.0, S, L0)
        att._qkv = (lambda f: lambda x, pos: scaled(f(x, pos)))(att._qkv)
    tokens = torch.randint(0, 50, (2, 90))
    with torch.no_grad():
        ref, out = plain(tokens), temp(tokens)
        ref_s, out_s = stream(plain, tokens, 7)[0], stream(temp, tokens, 7)[0]
    assert_close(out, ref, 1e-4, "parallel")
    assert_close(out_s, ref_s, 1e-4, "streaming")
    # YaRN changes the model
    assert (out - twin(yarn(cfg, 1.0), yarn(cfg, 1.0))[0](tokens)).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["window", "ttt_cache"])
@pytest.mark.parametrize("k", [1, 7])
def test_yarn_streaming_equals_parallel(kind, k):
    cfg = cache_config(combine="concat") if kind == "ttt_cache" else tiny_config(kind, window=6)
    model = twin(yarn(cfg), yarn(cfg))[0]
    tokens = torch.randint(0, 50, (2, 90))
    with torch.no_grad():
        assert_close(stream(model, tokens, k)[0], model(tokens), 1e-4)
    reset_parity(model, T=70, r=33, k=k, rel=1e-4)


@pytest.mark.parametrize("kind", ["window", "full", "ttt_cache", "pooled"])
def test_yarn_scale_one_equals_unscaled_model_exactly(kind):
    cfg = cache_config() if kind == "ttt_cache" else tiny_config(kind, window=6)
    plain, one = twin(cfg, yarn(cfg, 1.0))
    tokens = torch.randint(0, 50, (2, 60))
    with torch.no_grad():
        assert torch.equal(plain(tokens), one(tokens))
        assert torch.equal(stream(plain, tokens, 5)[0], stream(one, tokens, 5)[0])


def test_configs_saved_before_a_default_changed_load_as_they_were_made():
    """A saved In-Place TTT config without ``decay`` (made before forgetting existed) loads with
    no forgetting, and a memory without ``gate_init`` with the gate at 0, in the model's and the
    Moshi adapter's configs; saved with the fields, the new defaults round-trip."""
    from moshi_ttt.moshi.config import AdapterConfig

    cfg = dataclasses.replace(
        tiny_config("ttt_cache"), inplace_ttt=mt.InPlaceTTTConfig(layers=(1,))
    )
    d = json.loads(json.dumps(cfg.to_dict()))
    assert mt.ModelConfig.from_dict(d) == cfg
    del d["inplace_ttt"]["decay"], d["memory"]["gate_init"]
    old = mt.ModelConfig.from_dict(d)
    assert (old.inplace_ttt.decay, old.memory.gate_init) == (0.0, 0.0)
    assert (cfg.inplace_ttt.decay, cfg.memory.gate_init) == (0.5, 3.0)
    ad = AdapterConfig.preset("both", num_layers=8).to_dict()
    del ad["inplace_ttt"]["decay"], ad["memory"]["gate_init"]
    old = AdapterConfig.from_dict(json.loads(json.dumps(ad)))
    assert (old.inplace_ttt.decay, old.memory.gate_init) == (0.0, 0.0)
