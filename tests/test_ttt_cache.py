"""TTT cache: parallel vs streaming for every option, naive vs fast compressor, real test-time
learning, diagnostics, stability."""

import dataclasses
import itertools

import pytest
import torch
from conftest import assert_close, reset_parity, stream

import moshi_ttt as mt
from moshi_ttt.layers.records import recording
from moshi_ttt.ops.impl import implementation
from moshi_ttt.ops.ttt_cache import block_step, block_step_naive, compress_scan, compressor

OPTIONS = list(
    itertools.product(
        ("gate", "concat"), ("relative", "decay", "none"), ("zero", "learned", "wait")
    )
)


def cache_config(window=6, block=4, num_virtual=3, **kw):
    return mt.ModelConfig(
        vocab_size=50,
        dim=32,
        num_layers=2,
        num_heads=4,
        memory=mt.MemoryConfig(
            kind="ttt_cache", window=window, block=block, num_virtual=num_virtual, **kw
        ),
    )


def memories(model):
    return [layer.self_attn.memory for layer in model.layers]


def lively(model):
    """Non-zero virtual-key projection and gate, so every parameter matters (as after training)."""
    with torch.no_grad():
        for mem in memories(model):
            mem.vkey_proj.normal_(0, 0.3)
            mem.gate.normal_(0, 1.0)
            mem.lr_w.normal_(0, 1.0)
            if hasattr(mem, "forget_w"):
                mem.forget_w.normal_(0, 2.0)
    return model


def logits_and_grads(model, tokens, **kw) -> list:
    """The logits of a float64 model and every parameter's gradient of a fixed linear loss."""
    model.zero_grad()
    logits = model(tokens, **kw)
    (
        logits * torch.linspace(-1, 1, logits.numel(), dtype=torch.float64).view_as(logits)
    ).sum().backward()
    return [logits.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_cpu_one_token_steps_update_only_when_a_row_completes_its_block(monkeypatch):
    """On the CPU a one-token step runs the compressor update only when some row completes its
    block: logits and every state tensor equal those of updating in every step (as on CUDA), with
    one row reset mid-stream so the rows complete in different steps; far fewer updates ran."""
    from moshi_ttt.ops import ttt_cache_step as step_ops

    model = lively(mt.StreamingLM(cache_config(momentum=0.5)).eval())
    tokens = torch.randint(0, 50, (3, 40), generator=torch.Generator().manual_seed(0))
    runs, calls = {}, []
    inner = step_ops._complete
    monkeypatch.setattr(step_ops, "_complete", lambda *a: calls.append(1) or inner(*a))
    for every in (False, True):
        if every:
            monkeypatch.setattr(step_ops, "_updates", lambda done: True)
        calls.clear()
        with torch.no_grad():
            runs[every] = (
                *stream(model, tokens, 1, resets_at={13: torch.tensor([0, 1, 0])}),
                len(calls),
            )
    (skip, st_skip, n_skip), (full, st_full, n_full) = runs[False], runs[True]
    assert torch.equal(skip, full)
    assert st_skip.tensors.keys() == st_full.tensors.keys()
    for name, t in st_full.tensors.items():
        assert torch.equal(st_skip[name], t), name
    assert n_full == 2 * 40 and 0 < n_skip < n_full / 2


# ---- parallel vs streaming ----------------------------------------------------------
@pytest.mark.parametrize("combine, position, cold", OPTIONS)
def test_parallel_equals_streaming_every_option(combine, position, cold):
    """Batch 3, row 1 reset mid-stream, 2000 tokens, window 6 (wraps 300+ times), steps of 37 tokens
    (the block layout) and of one token (the open block and the cached read) in turn."""
    model = lively(
        mt.StreamingLM(cache_config(combine=combine, virtual_position=position, cold_start=cold))
    ).eval()
    T, r = 2000, 999
    state = reset_parity(model, T, r, [1] * 7 + [37], 1e-4)
    assert state["layers.0.updates"].tolist() == [(T - 6) // 4, (T - r - 6) // 4, (T - 6) // 4]


@pytest.mark.parametrize("k", [1, 5, 13])
@pytest.mark.parametrize(
    "extra",
    [
        dict(momentum=0.5),
        dict(decay=0.1),
        dict(max_state_norm=2.0),
        dict(bptt=2),
        dict(compressor_depth=3),
        dict(compressor_shared=True),
        dict(decay=0.1, forget_gate=True),
        dict(decay=0.1, forget_gate=True, compressor_shared=True, momentum=0.5),
    ],
)
def test_parallel_equals_streaming_update_options(k, extra):
    model = lively(mt.StreamingLM(cache_config(**extra))).eval()
    tokens = torch.randint(0, 50, (2, 150))
    with torch.no_grad():
        out, _ = stream(model, tokens, k)
        assert_close(out, model(tokens), 1e-4)


@pytest.mark.parametrize("extra", [dict(), dict(compressor_shared=True, cold_start="zero")])
def test_fused_window_attention_equals_banded_reference(extra):
    """Option A's window attention through the fused kernel equals the explicit banded scores:
    outputs and gradients, with document boundaries."""
    model = lively(mt.StreamingLM(cache_config(window=8, block=4, **extra))).double()
    tokens = torch.randint(0, 50, (2, 70))
    resets = torch.zeros(2, 70, dtype=torch.bool)
    resets[0, 33] = True
    results = []
    for parts in ({"window"}, ()):  # the banded reference, then window_attention
        with implementation(reference=parts):
            results.append(logits_and_grads(model, tokens, resets=resets))
    assert len(results[0]) == len(results[1]) > 10
    for ref, fast in zip(*results):
        assert_close(fast, ref, 1e-6)  # banded is fp32


@pytest.mark.parametrize(
    "position, cold", [("relative", "wait"), ("decay", "zero"), ("none", "learned")]
)
@pytest.mark.parametrize("reset", [False, True])
def test_read_without_per_query_copies_equals_reference(position, cold, reset, monkeypatch):
    """Training reads with the queries grouped by the state they read (``_read_runs``) equal the
    per-query copies and ``_scores`` (the reference): logits and every gradient (float64 model),
    with and without a document boundary."""
    model = lively(
        mt.StreamingLM(cache_config(window=8, block=4, virtual_position=position, cold_start=cold))
    ).double()
    tokens = torch.randint(0, 50, (2, 70))
    resets = torch.zeros(2, 70, dtype=torch.bool)
    resets[0, 29] = reset
    calls, read_runs = [], type(memories(model)[0])._read_runs
    monkeypatch.setattr(
        type(memories(model)[0]), "_read_runs", lambda *a: calls.append(1) or read_runs(*a)
    )
    results = []
    for parts in ({"read"}, ()):  # the per-query reference, then _read_runs
        with implementation(reference=parts):
            results.append(logits_and_grads(model, tokens, resets=resets))
    assert len(calls) == 2  # the fast read ran in both layers, only when on
    for ref, fast in zip(*results):
        assert_close(fast, ref, 1e-6)  # reads are fp32


def test_shared_compressor_is_one_state_for_all_heads():
    """Shared: one compressor per layer learns every head's evicted pairs (state [B, 1, ...]);
    per head: H independent states. Both read M virtual tokens per head."""
    for shared, hc in ((True, 1), (False, 4)):
        model = mt.StreamingLM(cache_config(compressor_shared=shared, compressor_depth=3)).eval()
        mem = memories(model)[0]
        assert [tuple(w.shape) for w in mem.inits()] == [(hc, 8, 16), (hc, 16, 16), (hc, 16, 8)]
        with torch.no_grad():
            _, st = stream(model, torch.randint(0, 50, (2, 60)), 7)
        assert st["layers.0.d3"].shape == (2, hc, 16, 8) and st["layers.0.d3"].abs().max() > 0


# ---- naive vs fast ------------------------------------------------------------------
@pytest.mark.parametrize("depth", [2, 3])
def test_block_step_naive_equals_fast_float64(depth):
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4, 6)] + [(3, 6, 6)] * (depth - 2) + [(3, 6, 4)]
    ws = [torch.randn(*s, dtype=torch.float64, generator=g, requires_grad=True) for s in shapes]
    xy = [
        torch.randn(3, 5, 4, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2)
    ]
    eta = torch.rand(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    results = []
    for f in (block_step_naive, block_step):
        for a in (*ws, *xy, eta):
            a.grad = None
        deltas, loss = f(tuple(ws), *xy, eta)
        (sum(d.sin().sum() * (i + 1) for i, d in enumerate(deltas)) + loss.sum()).backward()
        results.append(
            [d.detach() for d in deltas]
            + [loss.detach()]
            + [a.grad.clone() for a in (*ws, *xy, eta)]
        )
    for ref, fast in zip(*results):
        assert_close(fast, ref, 1e-6, floor=0.0)


@pytest.mark.parametrize(
    "extra",
    [
        dict(),
        dict(momentum=0.5, decay=0.1),
        dict(compressor_depth=3),
        dict(compressor_shared=True, momentum=0.5),
        dict(decay=0.1, forget_gate=True),
    ],
)
def test_model_naive_equals_fast_float64(extra):
    """States, outputs and gradients of every parameter through the whole model."""
    model = lively(mt.StreamingLM(cache_config(**extra))).double()
    tokens = torch.randint(0, 50, (2, 41))
    results = []
    for parts in ({"update"}, ()):  # per-token autograd, then the blockwise step
        model.zero_grad()
        with implementation(reference=parts):
            logits = model(tokens)
            weight = torch.linspace(-1, 1, logits.numel(), dtype=torch.float64)
            (logits * weight.view_as(logits)).sum().backward()
            with torch.no_grad():
                _, st = stream(model, tokens, 5)
        results.append(
            {
                "logits": logits.detach(),
                "d2": st["layers.1.d2"],
                **{n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            }
        )
    assert set(results[0]) == set(results[1])
    for name, ref in results[0].items():
        assert_close(results[1][name], ref, 1e-6, name, floor=0.0)


def test_forget_gate_parallel_equals_streaming_with_resets():
    """Learned forgetting over 2000 tokens, row 1 reset mid-stream, steps of one and 37 tokens."""
    model = lively(mt.StreamingLM(cache_config(decay=0.05, forget_gate=True))).eval()
    reset_parity(model, 2000, 999, [1] * 7 + [37], 1e-4)


def test_forget_gate_starts_at_the_constant_decay_and_learns():
    """A fresh forget gate (w = 0, c = logit λ) is the constant decay λ (logits equal); its
    parameters get gradients, and once w moves the outputs differ."""
    torch.manual_seed(0)
    gated = lively(mt.StreamingLM(cache_config(decay=0.2, forget_gate=True))).double()
    plain = mt.StreamingLM(cache_config(decay=0.2)).double()
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if "forget" not in k})
    with torch.no_grad():
        for mem in memories(gated):
            mem.forget_w.zero_()
    tokens = torch.randint(0, 50, (2, 60))
    assert_close(gated(tokens), plain(tokens), 1e-6)  # c is logit λ stored in fp32
    gated(tokens).square().mean().backward()
    for mem in memories(gated):
        assert mem.forget_w.grad.abs().amax() > 0 and mem.forget_b.grad.abs().amax() > 0
    with torch.no_grad():
        lively(gated)
        assert (gated(tokens) - plain(tokens)).abs().amax() > 1e-6


def test_forget_gate_keeps_the_state_flat_and_bounded():
    """State bytes equal the constant decay's after 100 and 3000 tokens; the compressor's norm
    stays finite and under the cap."""
    sizes = []
    for extra in (dict(forget_gate=True), dict()):
        model = lively(mt.StreamingLM(cache_config(decay=0.1, **extra))).eval()
        state = model.init_state(1)
        with torch.no_grad():
            model.step(torch.randint(0, 50, (1, 100)), state)
            first = state.nbytes()
            model.step(torch.randint(0, 50, (1, 2900)), state)
        sizes.append((first, state.nbytes()))
        assert all(torch.isfinite(t).all() for t in state.tensors.values() if t.is_floating_point())
    assert sizes[0] == sizes[1] and sizes[0][0] == sizes[0][1]


def test_forget_gate_needs_a_ttt_cache_and_a_starting_decay():
    with pytest.raises(ValueError, match="forget_gate"):
        mt.MemoryConfig(kind="ttt_cache", decay=0.0, forget_gate=True)
    with pytest.raises(ValueError, match="forget_gate"):
        mt.MemoryConfig(kind="infini", decay=0.1, forget_gate=True)


# ---- test-time learning is real ----------------------------------------------------
def test_inner_loss_falls_as_updates_accumulate():
    model = mt.StreamingLM(cache_config(window=8, block=4)).eval()
    mem = memories(model)[0]
    motif = torch.randint(0, 50, (1, 12))
    with torch.no_grad(), recording() as stats:
        model(motif.repeat(2, 30))  # 360 tokens of a repeated phrase: evicted pairs recur
    before, after = stats[mem]["inner_loss_before"], stats[mem]["inner_loss_after"]  # [G, N]
    assert (after < before).float().mean().item() > 0.95  # each update lowers its own block's loss
    # a block's loss *before* it is learned (held out so far) falls as earlier updates accumulate
    assert before[:, -10:].mean().item() < 0.5 * before[:, :3].mean().item()


def test_virtual_tokens_depend_on_evicted_tokens_only():
    """Two streams that differ only in tokens long evicted: the TTT cache's state, virtual tokens
    and last prediction differ; the same weights with a plain window cannot tell them apart."""
    cfg = cache_config(window=8, block=4)
    model = lively(mt.StreamingLM(cfg)).eval()
    plain = mt.StreamingLM(
        dataclasses.replace(cfg, memory=mt.MemoryConfig(kind="window", window=8))
    ).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".memory." not in k})
    a = torch.randint(0, 50, (1, 80))
    b = a.clone()
    b[:, :20] = torch.randint(0, 50, (1, 20))  # 60 tokens before the end: far outside 2 layers x 8
    mem = memories(model)[0]
    with torch.no_grad():
        la, sa = stream(model, a, 7)
        lb, sb = stream(model, b, 7)
        read = mem._read(model.layers[0].self_attn.freqs, 1)
        va = read(
            tuple((w + sa[f"layers.0.d{i}"][0])[:, None] for i, w in enumerate(mem.inits(), 1))
        )[1]
        vb = read(
            tuple((w + sb[f"layers.0.d{i}"][0])[:, None] for i, w in enumerate(mem.inits(), 1))
        )[1]
        pa, pb = plain(a), plain(b)
    assert (va - vb).abs().max() > 1e-3
    assert (la[:, -1] - lb[:, -1]).abs().max() > 1e-4
    assert torch.equal(pa[:, -1], pb[:, -1])


def test_truncated_bptt_stops_gradients():
    g = torch.Generator().manual_seed(0)
    G, N, b, D, m = 2, 6, 3, 4, 5
    vals = torch.randn(G, N, b, D, dtype=torch.float64, generator=g, requires_grad=True)
    keys = torch.nn.functional.normalize(
        torch.randn(G, N, b, D, dtype=torch.float64, generator=g), dim=-1
    )
    init1, init2 = (
        torch.randn(G, D, m, dtype=torch.float64, generator=g),
        torch.randn(G, m, D, dtype=torch.float64, generator=g),
    )
    probes = torch.randn(G, 1, 2, D, dtype=torch.float64, generator=g)
    read = lambda states: (probes, compressor(states, probes))
    grads = {}
    for bptt in (0, 2):
        (_, reads), *_ = compress_scan(
            (torch.zeros_like(init1), torch.zeros_like(init2)),
            None,
            (init1, init2),
            keys,
            vals,
            torch.full((G, N, b), 0.3, dtype=torch.float64),
            torch.ones(G, N, dtype=torch.float64),
            read,
            bptt=bptt,
        )
        (grads[bptt],) = torch.autograd.grad(reads[:, -1].sum(), vals)
    assert grads[0][:, 0].abs().max() > 0  # through all 6 updates
    assert grads[2][:, :4].abs().max() == 0 and grads[2][:, 4:].abs().max() > 0  # only the last 2


# ---- diagnostics and stability ------------------------------------------------------
@pytest.mark.parametrize("combine", ["gate", "concat"])
def test_recorded_alpha_and_virtual_mass_match_the_gate(combine):
    model = lively(mt.StreamingLM(cache_config(combine=combine, window=8, block=4))).eval()
    mem = memories(model)[0]
    with torch.no_grad(), recording() as stats:
        model(torch.randint(0, 50, (2, 120)))
        par = dict(stats[mem])
        stream(model, torch.randint(0, 50, (2, 120)), 120)
    assert_close(par["alpha"], torch.sigmoid(mem.gate), 1e-5)
    # with virtual tokens, the mass on them is exactly 1 - α averaged over heads
    if combine == "gate":
        assert_close(par["virtual_mass"], (1 - par["alpha"]).mean().item(), 1e-6)
    assert 0 < par["virtual_mass"] < 1 and -1 <= par["virtual_key_cos"] <= 1
    assert 0 < stats[mem]["virtual_mass"] < 1  # the streamed step's


def test_check_finite_names_layer_and_update():
    model = mt.StreamingLM(cache_config(check_finite=True)).eval()
    with torch.no_grad():
        memories(model)[1].w1_init.fill_(float("nan"))
    with pytest.raises(
        FloatingPointError,
        match=r"layers.1.self_attn.memory: compressor state not finite after update 0",
    ):
        model(torch.randint(0, 50, (1, 40)))


def test_adversarial_stream_stays_finite_and_constant_size():
    model = mt.StreamingLM(cache_config(window=8, block=4, inner_lr=10.0)).eval()
    with torch.no_grad():
        model.emb.weight.mul_(1e4)  # huge embeddings
    state = model.init_state(2)
    sizes = []
    with torch.no_grad():
        for step in range(60):
            # repeats
            tokens = torch.full((2, 100), 7) if step % 2 else torch.randint(0, 50, (2, 100))
            logits, state = model.step(tokens, state)
            sizes.append(state.nbytes())
        assert torch.isfinite(logits).all()
    assert all(torch.isfinite(t.float()).all() for t in state.tensors.values())
    assert len(set(sizes)) == 1
    for i in range(2):
        w2 = model.layers[i].self_attn.memory.w2_init + state[f"layers.{i}.d2"]
        assert torch.linalg.vector_norm(w2, dim=(-2, -1)).max() <= 100.0 + 1e-3


def test_state_updates_not_rounded_by_autocast():
    """The compressor update run inside autocast equals the same update outside it, bit for bit,
    and the streaming state is fp32 whatever the activations' dtype."""
    model = mt.StreamingLM(cache_config(window=6, block=4)).eval()
    mem = memories(model)[0]
    g = torch.Generator().manual_seed(0)
    G, N, b, Dh, m = 4, 5, 4, 8, 16
    keys, vals = torch.randn(G, N, b, Dh, generator=g), torch.randn(G, N, b, Dh, generator=g)
    d0 = (torch.zeros(G, Dh, m), torch.zeros(G, m, Dh))
    freqs = model.layers[0].self_attn.freqs

    def scan():
        kn, eta = mem._prep(keys, 1)
        return mem._scan(d0, None, kn, vals, eta, torch.ones(G, N), freqs, 1)

    tokens = torch.randint(0, 50, (1, 40))
    with torch.no_grad():
        (rk, rv, _), ((d1, d2), _), _ = scan()
        _, ref = stream(model, tokens, 1)  # one-token steps: the streaming block update
        with torch.autocast("cpu", dtype=torch.bfloat16):
            (ak, av, _), ((a1, a2), _), _ = scan()
            _, st = stream(model, tokens, 40)
            _, st1 = stream(model, tokens, 1)
    assert (
        torch.equal(a1, d1) and torch.equal(a2, d2) and torch.equal(av, rv) and torch.equal(ak, rk)
    )
    assert d2.dtype == torch.float32 and st["layers.0.d2"].dtype == torch.float32
    assert st["layers.0.d2"].abs().max() > 0
    # the state's own arithmetic stays fp32 under autocast
    for name in ("d1", "d2", "vk", "vv", "ek", "eeta"):
        assert st1[f"layers.0.{name}"].dtype == torch.float32
    assert st1["layers.0.updates"].item() == ref["layers.0.updates"].item() > 0


def test_the_reconstruction_terms_are_fp32_under_autocast():
    """Stage 1's reconstruction loss runs inside the trainer's bf16 autocast: its products must
    stay fp32, so it equals the same terms computed without autocast."""
    from moshi_ttt.ops.ttt_cache import reconstruction_terms

    g = torch.Generator().manual_seed(3)
    keys = torch.nn.functional.normalize(torch.randn(4, 3, 8, 16, generator=g), dim=-1)
    vals, kv, vv = (torch.randn(4, 3, n, 16, generator=g) for n in (8, 5, 5))
    mask = torch.rand(4, 3, 8, generator=g) > 0.3
    ref = reconstruction_terms(keys, vals, kv, vv, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = reconstruction_terms(keys, vals, kv, vv, mask)
    assert got[0].dtype == torch.float32 and got[1] == ref[1]
    assert_close(got[0], ref[0], 1e-6, "terms under autocast")
