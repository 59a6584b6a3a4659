"""In-Place TTT: naive vs fast, parallel vs streaming, and one test per known pitfall."""

import dataclasses

import pytest
import torch
from conftest import assert_close, stream

import moshi_ttt as mt
from moshi_ttt.layers.inplace_ttt import InPlaceTTTMLP
from moshi_ttt.ops.impl import implementation
from moshi_ttt.ops.inplace_ttt import chunk_target, ttt_chunk_scan, ttt_naive
from moshi_ttt.training import lm_loss

C = 8


def ttt_config(
    kind="window",
    window=6,
    layers=(0, 1),
    chunk=C,
    target="embed",
    lr=0.5,
    clip_tau=None,
    reset_on_boundary=True,
    decay=0.0,
):
    return mt.ModelConfig(
        vocab_size=50,
        dim=32,
        num_layers=2,
        num_heads=4,
        memory=mt.MemoryConfig(kind=kind, window=window),
        inplace_ttt=mt.InPlaceTTTConfig(
            layers=layers,
            chunk_size=chunk,
            lr=lr,
            target=target,
            clip_tau=clip_tau,
            reset_on_boundary=reset_on_boundary,
            decay=decay,
        ),
    )


def ttt_model(cfg, conv_std=0.3, proj_scale=10.0, seed=0):
    """A model whose target is far from zero, so TTT changes the outputs (as after training)."""
    torch.manual_seed(seed)
    model = mt.StreamingLM(cfg)
    with torch.no_grad():
        for layer in model.layers:
            if layer.is_ttt:
                layer.gating.target_conv.normal_(0, conv_std)
                layer.gating.target_proj.copy_(proj_scale * torch.eye(cfg.dim))
    return model


# ---- naive vs fast ------------------------------------------------------------------
@pytest.mark.parametrize("decay", [0.0, 0.2])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_scan_naive_equals_fast_float64(clip, decay):
    g = torch.Generator().manual_seed(1)
    B, T, h, d = 3, 5 * C, 12, 8
    args = [
        torch.randn(*s, dtype=torch.float64, generator=g, requires_grad=True)
        for s in ((B, T, h), (B, T, d), (d, h), (B, d, h))
    ]
    apply = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.float64)
    go, gs = (
        torch.randn(B, T, d, dtype=torch.float64, generator=g),
        torch.randn(B, d, h, dtype=torch.float64, generator=g),
    )
    results = []
    for f in (ttt_naive, ttt_chunk_scan):
        for a in args:
            a.grad = None
        o, s = f(*args[:3], 0.3, C, s0=args[3], apply=apply, clip_tau=clip, decay=decay)
        ((o * go).sum() + (s * gs).sum()).backward()
        results.append([o.detach(), s.detach()] + [a.grad.clone() for a in args])
    for ref, fast in zip(*results):
        assert_close(fast, ref, 1e-6, floor=0.0)


@pytest.mark.parametrize("target", ["embed", "hidden"])
@pytest.mark.parametrize("resets", [False, True])
def test_model_naive_equals_fast_float64(target, resets):
    """Outputs and gradients of every parameter; T = 45 (not a multiple of 8), batch 3."""
    model = ttt_model(ttt_config(target=target)).double()
    tokens = torch.randint(0, 50, (3, 45))
    rs = None
    if resets:
        rs = torch.zeros(3, 45, dtype=torch.bool)
        rs[0, 13] = rs[2, 30] = True
    grads = []
    for parts in ({"update"}, ()):  # the chunk-by-chunk reference, then the fast scan
        model.zero_grad()
        with implementation(reference=parts):
            logits = model(tokens, resets=rs)
            weight = torch.linspace(-1, 1, logits.numel(), dtype=torch.float64)
            (logits * weight.view_as(logits)).sum().backward()
        grads.append(
            {"logits": logits.detach(), **{n: p.grad.clone() for n, p in model.named_parameters()}}
        )
    for name, ref in grads[0].items():
        assert_close(grads[1][name], ref, 1e-6, name, floor=0.0)


# ---- parallel vs streaming ----------------------------------------------------------
@pytest.mark.parametrize("k", [1, 5, C, 3 * C + 2])
@pytest.mark.parametrize("target", ["embed", "hidden"])
@pytest.mark.parametrize("kind", ["full", "window", "sink"])
def test_parallel_equals_streaming(k, target, kind):
    model = ttt_model(ttt_config(kind=kind, target=target)).eval()
    tokens = torch.randint(0, 50, (2, 93))
    with torch.no_grad():
        ref = model(tokens)
        out, _ = stream(model, tokens, k)
    assert_close(out, ref, 1e-4)


@pytest.mark.parametrize("k", [1, 5, 3 * C + 2])
def test_row_reset_mid_stream(k):
    model = ttt_model(ttt_config()).eval()
    tokens = torch.randint(0, 50, (3, 70))
    resets = torch.zeros(3, 70, dtype=torch.bool)
    resets[1, 29] = True  # mid-chunk
    with torch.no_grad():
        ref = model(tokens, resets=resets)
        out, _ = stream(model, tokens, k, resets_at={29: torch.tensor([False, True, False])})
        fresh = model(tokens[1:2, 29:])
    assert_close(out, ref, 1e-4, "streaming vs parallel")
    assert_close(ref[1:2, 29:], fresh, 1e-4, "row 1 after the reset vs a fresh row")


@pytest.mark.parametrize("k", [1, 5, 3 * C + 2])
def test_decay_streaming_equals_parallel(k):
    """Forgetting over 12 chunks, streamed in steps of k tokens, against the parallel pass; and it
    changes the outputs (the option is live)."""
    model = ttt_model(ttt_config(decay=0.3)).eval()
    tokens = torch.randint(0, 50, (2, 12 * C))
    with torch.no_grad():
        ref = model(tokens)
        out, _ = stream(model, tokens, k)
        plain = ttt_model(ttt_config()).eval()(tokens)
    assert_close(out, ref, 1e-4)
    assert (ref - plain).abs().amax() > 1e-3 * plain.abs().amax()


def test_decay_bounds_the_sum_of_updates():
    """With λ the sum s of the updates stays under max‖ΔW‖ / λ (the geometric series) over a stream
    of 400 chunks, while without it the sum outgrows that bound."""
    g = torch.Generator().manual_seed(0)
    h, d, N, lam = 6, 4, 400, 0.1
    z = torch.randn(1, N * C, h, generator=g, dtype=torch.float64) + 1.0  # a biased, drifting input
    v = torch.randn(1, N * C, d, generator=g, dtype=torch.float64) + 1.0
    w0 = torch.zeros(d, h, dtype=torch.float64)
    dw = torch.stack(
        [0.3 * v[0, n * C : (n + 1) * C].T @ z[0, n * C : (n + 1) * C] for n in range(N)]
    )
    bound = torch.linalg.vector_norm(dw, dim=(1, 2)).max() / lam
    _, s_decay = ttt_chunk_scan(z, v, w0, 0.3, C, decay=lam)
    _, s_plain = ttt_chunk_scan(z, v, w0, 0.3, C)
    assert torch.linalg.vector_norm(s_decay) <= bound < torch.linalg.vector_norm(s_plain)


def test_eval_clip_streaming_equals_parallel():
    model = ttt_model(ttt_config(clip_tau=1e-3)).eval()
    tokens = torch.randint(0, 50, (2, 50))
    with torch.no_grad():
        out, _ = stream(model, tokens, 3)
        assert_close(out, model(tokens), 1e-4)


def test_ttt_changes_outputs_after_first_chunk():
    """Apply-then-update: chunk 0 equals the plain MLP, later chunks differ."""
    cfg = ttt_config()
    model = ttt_model(cfg).eval()
    plain = mt.StreamingLM(dataclasses.replace(cfg, inplace_ttt=None)).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "target_" not in k})
    tokens = torch.randint(0, 50, (2, 40))
    with torch.no_grad():
        a, b = model(tokens), plain(tokens)
    assert_close(a[:, :C], b[:, :C], 1e-6)
    assert (a[:, C:] - b[:, C:]).abs().max().item() > 1e-2


def test_fresh_layer_is_the_plain_mlp():
    mlp = InPlaceTTTMLP(16, 40, mt.InPlaceTTTConfig(chunk_size=4))
    x = torch.randn(2, 21, 16)
    pos = torch.arange(21).expand(2, 21)
    assert_close(mlp.forward_ttt(x, x, pos, None), mlp(x), 1e-6)


# ---- known pitfalls ----------------------------------------------------------------
def test_conv_target_stays_inside_chunk():
    """Changing X0 in chunk 2 leaves chunk 1's target, and so every output up to chunk 2,
    unchanged."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4 * C, 6, generator=g)
    conv, proj = torch.randn(6, 1, 5, generator=g), torch.randn(6, 6, generator=g)
    x1 = x0.clone()
    x1[:, 2 * C] += 10.0  # first token of chunk 2
    v0, v1 = chunk_target(x0, conv, proj, C), chunk_target(x1, conv, proj, C)
    assert torch.equal(v0[:, : 2 * C], v1[:, : 2 * C])
    assert not torch.equal(v0[:, 2 * C : 3 * C], v1[:, 2 * C : 3 * C])
    z, w0 = torch.randn(2, 4 * C, 10, generator=g), torch.randn(6, 10, generator=g)
    o0, _ = ttt_chunk_scan(z, v0, w0, 0.3, C)
    o1, _ = ttt_chunk_scan(z, v1, w0, 0.3, C)
    assert torch.equal(o0[:, : 3 * C], o1[:, : 3 * C])


def test_batch_rows_keep_their_own_fast_weights():
    model = ttt_model(ttt_config()).eval()
    tokens = torch.randint(0, 50, (3, 41))
    with torch.no_grad():
        out, st = stream(model, tokens, 1)
        for b in range(3):
            single, sb = stream(model, tokens[b : b + 1], 1)
            assert_close(out[b], single[0], 1e-5, "logits")
            assert_close(st["layers.0.ttt.s"][b], sb["layers.0.ttt.s"][0], 1e-6, "fast weights")
    s = st["layers.0.ttt.s"]
    assert not torch.allclose(s[0], s[1])


def test_fast_weights_stay_fp32():
    model = ttt_model(ttt_config()).eval()
    st = model.init_state(2, dtype=torch.bfloat16)
    for name in ("s", "zbuf", "xbuf"):
        assert st[f"layers.0.ttt.{name}"].dtype == torch.float32
    assert st["layers.0.k"].dtype == torch.bfloat16
    # an fp32 state keeps increments far below bf16 resolution
    model2 = ttt_model(ttt_config(lr=1e-6)).eval()
    with torch.no_grad():
        _, st2 = stream(model2, torch.randint(0, 50, (1, 4 * C)), C)
        s = st2["layers.0.ttt.s"]
    assert s.abs().max() > 0 and not torch.equal(s, s.bfloat16().float())


def test_target_init_is_not_all_zero():
    mlp = InPlaceTTTMLP(16, 40, mt.InPlaceTTTConfig(chunk_size=4))
    assert torch.count_nonzero(mlp.target_conv) == 0
    assert (
        torch.count_nonzero(mlp.target_proj)
        == 16
        == torch.count_nonzero(torch.diag(mlp.target_proj))
    )
    x = torch.randn(2, 16, 16)
    mlp.forward_ttt(x, x, torch.arange(16).expand(2, 16), None).pow(2).sum().backward()
    assert mlp.target_conv.grad.abs().max() > 0


def test_clip_never_applied_in_training():
    cfg = ttt_config(clip_tau=1e-5)
    model = ttt_model(cfg)
    noclip = ttt_model(
        dataclasses.replace(cfg, inplace_ttt=dataclasses.replace(cfg.inplace_ttt, clip_tau=None))
    )
    tokens = torch.randint(0, 50, (2, 40))
    model.train(), noclip.train()
    assert torch.equal(model(tokens), noclip(tokens))
    model.eval(), noclip.eval()
    assert not torch.allclose(model(tokens), noclip(tokens))


def test_ttt_loss_differs_from_no_ttt_after_one_step():
    """Stock init (conv zero) equals no TTT exactly; one outer step later (training mode, clip
    configured) the losses differ far beyond float64 rounding."""
    cfg = ttt_config(clip_tau=1e-5, lr=3.0)
    torch.manual_seed(0)
    model = mt.StreamingLM(cfg).double().train()
    plain = mt.StreamingLM(dataclasses.replace(cfg, inplace_ttt=None)).double().train()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "target_" not in k})
    x, y = torch.randint(0, 50, (4, 64)), torch.randint(0, 50, (4, 64))
    assert_close(model(x), plain(x), 1e-12)
    for m in (model, plain):
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        lm_loss(m, x, y).backward()
        opt.step()
    assert abs(lm_loss(model, x, y).item() - lm_loss(plain, x, y).item()) > 1e-8


def test_streaming_targets_use_real_tokens():
    """The update after chunk 0 in streaming equals the one computed from the whole real chunk."""
    model = ttt_model(ttt_config(layers=(0,))).eval()
    tokens = torch.randint(0, 50, (1, C))
    mlp = model.layers[0].gating
    with torch.no_grad():
        _, st = stream(model, tokens, 1)
        x = model.emb(tokens)
        h = model.layers[0].norm2(
            x + model.layers[0].self_attn(model.layers[0].norm1(x), torch.arange(C)[None], None)
        )
        v = chunk_target(x, mlp.target_conv, mlp.target_proj, C)
        ref = mlp.ttt.lr * v[0].T @ mlp.hidden(h)[0]
    assert_close(st["layers.0.ttt.s"][0], ref, 1e-5)
    assert st["layers.0.ttt.count"].item() == 0


def test_reset_returns_to_the_trained_w_down():
    model = ttt_model(ttt_config()).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.gating.linear_out.weight.add_(0.05)  # "training" changed W_down
    tokens = torch.randint(0, 50, (1, 30))
    with torch.no_grad():
        _, st = stream(model, torch.randint(0, 50, (1, 25)), 4)
        st.reset(torch.tensor([True]))
        out, _ = stream(model, tokens, 4, state=st)
        assert_close(out, model(tokens), 1e-5)


def test_reset_clears_buffered_tokens():
    model = ttt_model(ttt_config()).eval()
    tokens = torch.randint(0, 50, (1, 30))
    with torch.no_grad():
        _, st = stream(model, torch.randint(0, 50, (1, C + 3)), 1)  # 3 tokens buffered
        assert st["layers.0.ttt.count"].item() == 3
        st.reset(torch.tensor([True]))
        assert st["layers.0.ttt.zbuf"].abs().max() == 0 and st["layers.0.ttt.count"].item() == 0
        out, _ = stream(model, tokens, 1, state=st)
        assert_close(out, model(tokens), 1e-5)


def test_several_chunks_give_target_gradients():
    torch.manual_seed(0)
    model = mt.StreamingLM(ttt_config()).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    def target_grads(T):
        model.zero_grad()
        lm_loss(model, torch.randint(0, 50, (2, T)), torch.randint(0, 50, (2, T))).backward()
        mlp = model.layers[0].gating
        return mlp.target_conv.grad.abs().max().item(), mlp.target_proj.grad.abs().max().item()

    assert target_grads(C) == (0.0, 0.0)  # one chunk: its update is never applied
    conv_g, _ = target_grads(4 * C)
    assert conv_g > 0
    opt.step()  # conv no longer zero: W_target gets gradient too
    conv_g, proj_g = target_grads(4 * C)
    assert conv_g > 0 and proj_g > 0


def test_state_update_not_rounded_by_autocast():
    model = ttt_model(ttt_config(layers=(0,))).eval()
    tokens = torch.randint(0, 50, (1, 2 * C))
    mlp = model.layers[0].gating
    seen = {}
    mlp.register_forward_hook(lambda m, i, o: None)
    orig_hidden = mlp.hidden

    def spy(x):
        z = orig_hidden(x)
        seen.setdefault("z", []).append(z.detach())
        return z

    mlp.hidden = spy
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, st = stream(model, tokens, C)
        x0 = model.emb(tokens)
    z = torch.cat(seen["z"], 1).double()  # what the layer saw, bf16-valued
    assert seen["z"][0].dtype == torch.bfloat16
    v = chunk_target(x0.double(), mlp.target_conv.double(), mlp.target_proj.double(), C)
    _, ref = ttt_naive(z, v, mlp.linear_out.weight.double(), mlp.ttt.lr, C)
    s = st["layers.0.ttt.s"]
    assert s.dtype == torch.float32
    assert_close(s, ref, 1e-5, floor=0.0)


@pytest.mark.parametrize("precision", ["highest", "high"])
def test_matmul_precision_option(precision):
    """``high`` allows TF32 products on CUDA only; on CPU both settings compute IEEE fp32, and
    streaming equals parallel under either."""
    base = ttt_config()
    cfg = dataclasses.replace(
        base, inplace_ttt=dataclasses.replace(base.inplace_ttt, matmul_precision=precision)
    )
    model, ref_model = ttt_model(cfg).eval(), ttt_model(base).eval()
    tokens = torch.randint(0, 50, (2, 45))
    with torch.no_grad():
        out, _ = stream(model, tokens, 5)
        assert torch.equal(model(tokens), ref_model(tokens))
        assert_close(out, model(tokens), 1e-4)
    assert torch.backends.cuda.matmul.fp32_precision == "none"  # the caller's setting is restored
