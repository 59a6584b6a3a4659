"""The Triton block update (ops/ttt_cache_triton.py) against its reference
(ops/ttt_cache.complete_block):
on CPU under Triton's interpreter where Triton is installed, on the GPU with ``-m gpu``."""

import pytest
import torch
from conftest import TRITON_DEVICES, assert_close, stream
from torch.nn import functional as F

import moshi_ttt as mt
from moshi_ttt.ops import ttt_cache as ops
from moshi_ttt.ops import ttt_cache_triton as tri
from moshi_ttt.ops import ttt_step_triton as step
from moshi_ttt.ops.impl import implementation
from moshi_ttt.state import StreamingState

pytestmark = pytest.mark.skipif(not tri.available(), reason="needs Triton")
DEVICES = TRITON_DEVICES


def problem(B, HC, b, Dh, m, M, momentum, device):
    G = B * HC
    inits = (torch.randn(HC, Dh, m) / Dh**0.5, torch.randn(HC, m, Dh) / m**0.5)
    ds = tuple(0.1 * torch.randn(G, *w.shape[1:]) for w in inits)
    moms = tuple(0.1 * torch.randn(G, *w.shape[1:]) for w in inits) if momentum else None
    x = F.normalize(torch.randn(G, b, Dh), dim=-1)
    y, eta = torch.randn(G, b, Dh), torch.rand(G, b) / b
    done = torch.arange(G) % 3 != 1
    probes = F.normalize(torch.randn(HC, M, Dh), dim=-1)
    mv = lambda t: (
        tuple(a.to(device) for a in t)
        if isinstance(t, tuple)
        else (t.to(device) if t is not None else None)
    )
    return [mv(a) for a in (ds, moms, inits, x, y, eta, done, probes)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape, opts",
    [
        # Moshi-like: b 16, M 8 (< 16 probes)
        ((3, 2, 16, 32, 16, 8), dict()),
        # two token chunks, every option
        ((2, 3, 64, 16, 32, 4), dict(momentum=0.9, decay=0.1, max_norm=3.0)),
        # one compressor (shared), cap active
        ((2, 1, 32, 16, 16, 16), dict(momentum=0.5, max_norm=1.0)),
    ],
)
def test_triton_block_update_equals_reference(on, device, shape, opts):
    dev = on(device)
    ds, moms, inits, x, y, eta, done, probes = problem(*shape, opts.get("momentum", 0.0), dev)
    clone = lambda t: tuple(a.clone() for a in t) if t is not None else None
    ref_ds, ref_m, fast_ds, fast_m = clone(ds), clone(moms), clone(ds), clone(moms)
    assert tri.supports(fast_ds, x, probes)
    v_ref = ops.complete_block(ref_ds, ref_m, inits, x, y, eta, done, probes, **opts)
    v_fast = tri.complete_block(fast_ds, fast_m, inits, x, y, eta, done, probes, **opts)
    for a, b, before in zip(ref_ds + (ref_m or ()), fast_ds + (fast_m or ()), ds + (moms or ())):
        assert_close(b, a, 1e-5, "state")
        assert torch.equal(b[~done], before[~done])  # rows without a completed block are untouched
        assert not torch.equal(b[done], before[done])
    assert_close(v_fast[done], v_ref[done], 1e-5, "virtual tokens")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "kernel, extra",
    [
        # the block update alone
        ("complete", dict(momentum=0.5, cold_start="zero")),
        # the whole step
        ("step", dict(momentum=0.5, cold_start="zero")),
        # no rotation, cap
        ("step", dict(decay=0.1, max_state_norm=2.0, virtual_position="decay")),
        # one softmax
        ("step", dict(virtual_position="none", cold_start="wait", num_virtual=3, combine="concat")),
    ],
)
def test_streaming_with_triton_equals_reference(on, device, kernel, extra, monkeypatch):
    """One-token streaming (batch 2, a row reset) through the Triton block update, or the whole
    one-token step (evict_step and attend_one), equals the reference step: logits and every state
    tensor."""
    cfg = mt.ModelConfig(
        vocab_size=50,
        dim=64,
        num_layers=1,
        num_heads=4,
        memory=mt.MemoryConfig(kind="ttt_cache", window=8, block=16, **{"num_virtual": 4, **extra}),
    )
    model = mt.StreamingLM(cfg).to(on(device)).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.memory.vkey_proj.normal_(0, 0.3)
            layer.self_attn.memory.lr_w.normal_(0, 1.0)
            layer.self_attn.memory.gate.normal_(0, 1.0)
            layer.self_attn.memory.recency.normal_(0, 1.0)
    T, r = 70, 40
    tokens = torch.randint(0, 50, (2, T), device=model.emb.weight.device)
    reset = {r: torch.tensor([False, True], device=tokens.device)}
    calls = {}
    for mod, name in ((tri, "complete_block"), (step, "evict_step"), (step, "attend_one")):
        fn = getattr(mod, name)
        monkeypatch.setattr(
            mod,
            name,
            lambda *a, _f=fn, _n=name, **k: calls.update({_n: calls.get(_n, 0) + 1}) or _f(*a, **k),
        )
    with torch.no_grad():
        # "complete": the one-token step in PyTorch around the block-update kernel
        with implementation(reference={"step"} if kernel == "complete" else ()):
            fast, st_fast = stream(model, tokens, 1, resets_at=reset)
        # every step of both layers went through the kernels; the block update on the CPU only
        # in steps where a row completes its block (here the two rows never do in one step)
        n = T  # steps
        blocks = n if tokens.is_cuda else sum(st_fast["layers.0.updates"].tolist())
        assert calls == (
            {"complete_block": blocks}
            if kernel == "complete"
            else {"evict_step": n, "attend_one": n}
        )
        with implementation(kernels="off"):
            ref, st_ref = stream(model, tokens, 1, resets_at=reset)
    assert st_fast["layers.0.updates"].tolist() == [(T - 8) // 16, (T - r - 8) // 16]
    assert_close(fast, ref, 1e-4, "logits")
    assert st_fast.tensors.keys() == st_ref.tensors.keys()
    for name, t in st_ref.tensors.items():
        assert_close(st_fast[name], t, 1e-4, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "programs, vkey_chunk, warps", [(2, 16, None), (16, 32, None), (None, 32, 8)]
)
def test_evict_step_equals_reference_when_many_rows_complete(
    on, device, programs, vkey_chunk, warps, monkeypatch
):
    """evict_step (the append kernel, then the completion kernel over the listed rows) against
    the reference evict_one, on random states of 7 rows: five complete their block in the same
    step, one would but evicts nothing, one does not; then a second step on the result (the row
    list and counters must be empty again). With 2 programs per head each walks several rows;
    with ``VKEY_CHUNK`` 16 the rotated virtual keys (head size 32) are formed in two chunks;
    programs None: ``complete_programs``' own count (``COMPLETE_PER_SM``), here with
    ``COMPLETE_WARPS`` 8."""
    from moshi_ttt.ops import ttt_cache_step as step_ops

    dev = on(device)
    if programs is not None:
        monkeypatch.setattr(step, "complete_programs", lambda device, heads, rows: programs)
    monkeypatch.setattr(step, "VKEY_CHUNK", vkey_chunk)
    monkeypatch.setattr(step, "COMPLETE_WARPS", warps)
    cfg = mt.ModelConfig(
        vocab_size=50,
        dim=64,
        num_layers=1,
        num_heads=2,
        memory=mt.MemoryConfig(
            kind="ttt_cache", window=8, block=16, num_virtual=3, compressor_hidden=16, momentum=0.5
        ),
    )
    model = mt.StreamingLM(cfg).to(dev).eval()
    attn = model.layers[0].self_attn
    mem = attn.memory
    B, H, b, Dh = 7, 2, 16, 32
    assert mem.cfg.virtual_position == "relative"  # the completion rotates the virtual keys
    g = torch.Generator().manual_seed(3)
    rand = lambda *s: torch.randn(*s, generator=g).to(dev)
    full = model.init_state(B)
    st = full.scope("layers.0.")
    for name in ("ek", "ev"):
        st[name].copy_(F.normalize(rand(B, H, b, Dh), dim=-1))
    st["eeta"].copy_(torch.rand(B, H, b, generator=g).to(dev) / b)
    for name in ("d1", "d2", "mom1", "mom2"):
        st[name].copy_(0.1 * rand(*st[name].shape))
    st["ecount"].copy_(torch.tensor([b - 1, 3, b - 1, b - 1, b - 1, b - 1, b - 1], device=dev))
    st["updates"].copy_(torch.tensor([2, 0, 1, 5, 3, 1, 0], device=dev))
    valid = torch.tensor([True, True, True, True, False, True, True], device=dev)
    views = {}
    for path in ("kernel", "reference"):
        state = StreamingState({n: t.clone() for n, t in full.tensors.items()}, {}, {})
        views[path] = (state, mem._step_view(state.scope("layers.0.")))
    with torch.no_grad():
        for k in range(2):
            cand_k, cand_v = rand(B, H, 1, Dh), rand(B, H, 1, Dh)
            for path, (_, view) in views.items():
                with implementation(reference={"step"} if path == "reference" else ()):
                    assert step.evict_supports(view, mem._step_weights()) == (path == "kernel")
                    step_ops.evict_one(
                        cand_k,
                        cand_v,
                        valid if k == 0 else ~valid,
                        view,
                        mem._step_weights(),
                        mem._rotation(attn.freqs),
                        inner_lr=1.0,
                        decay=0.0,
                        momentum=0.5,
                        max_norm=100.0,
                    )
    fast, ref = views["kernel"][0].tensors, views["reference"][0].tensors
    assert fast["layers.0.updates"].tolist() == [3, 0, 2, 6, 4, 2, 1]
    for name, t in ref.items():
        assert_close(fast[name], t, 1e-5, name)
    arrive, rows, nrows, finished = step._buffers(dev, B)
    assert int(nrows) == 0 and int(finished) == 0 and not arrive.any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gated, recency_bias", [(True, True), (False, False), (False, True)])
def test_attend_one_equals_reference(on, device, gated, recency_bias):
    """attend_one's kernel (the window in chunks of ``ATTEND_CHUNK`` slots with a running
    softmax) against its PyTorch reference: a ring of 40 slots (chunks of 16, 16 and 8), rows
    with empty slots, one whose first chunk is all empty and one with a single filled slot, rows
    with and without virtual tokens, bf16 keys and values."""
    from moshi_ttt.ops import ttt_cache_step as step_ops

    dev = on(device)
    g = torch.Generator().manual_seed(5)
    B, H, W, Dh, M = 5, 3, 40, 16, 6
    rand = lambda *s, dt=torch.float32: (2 * torch.randn(*s, generator=g)).to(dev, dt)
    q, q_raw = rand(B, H, 1, Dh, dt=torch.bfloat16), rand(B, H, 1, Dh, dt=torch.bfloat16)
    ring_k, ring_v = rand(B, H, W, Dh, dt=torch.bfloat16), rand(B, H, W, Dh, dt=torch.bfloat16)
    vk, vv = rand(B, H, M, Dh), rand(B, H, M, Dh)
    kpos = torch.arange(100, 100 + W).repeat(B, 1)
    kpos[1, ::3] = -1  # empty slots
    kpos[2, :16] = -1  # an empty first chunk
    kpos[3, :] = -1
    kpos[3, 37] = 7  # one filled slot
    has = torch.tensor([True, False, True, True, False], device=dev)
    gate, recency = rand(H), rand(H)
    args = (q, q_raw, ring_k, ring_v, kpos.to(dev), vk, vv, has, gate, recency)
    opts = dict(inv_t=1.3, gated=gated, recency_bias=recency_bias)
    with torch.no_grad():
        assert step.attend_supports(ring_k, M) and step.ATTEND_CHUNK < W
        # any ring length; head widths up to 256; at most 16 virtual tokens
        wide = lambda W, Dh: torch.empty(1, 1, W, Dh, device=dev)
        assert step.attend_supports(wide(4096, 128), 16) and step.attend_supports(wide(8, 256), 1)
        assert not step.attend_supports(wide(8, 512), 1) and not step.attend_supports(
            wide(8, 48), 1
        )
        assert not step.attend_supports(ring_k, 17)
        fast = step_ops.attend_one(*args, **opts)
        with implementation(reference={"step"}):
            assert not step.attend_supports(ring_k, M)
            ref = step_ops.attend_one(*args, **opts)
    assert_close(fast, ref, 1e-5, "output")


def test_wide_compressors_take_the_reference(on):
    """Weights past the kernels' shared-memory bound (Dh 128 x hidden 256) are left to the
    reference."""
    from moshi_ttt.ops import ttt_scan_triton as scan

    on("cpu")
    ds = (torch.zeros(2, 128, 256), torch.zeros(2, 256, 128))
    x, probes = torch.zeros(2, 16, 128), torch.zeros(1, 4, 128)
    # 128 x 64: fits
    assert tri.supports(tuple(d[:, :, :64] for d in ds[:1]) + (ds[1][:, :64],), x, probes)
    assert not tri.supports(ds, x, probes)
    assert not scan.supports(ds, x[:, None])
    # 2 heads: Dh 64 x hidden 128, Dh 128 x hidden 256
    for dim, fits in ((128, True), (256, False)):
        cfg = mt.ModelConfig(
            vocab_size=50,
            dim=dim,
            num_layers=1,
            num_heads=2,
            memory=mt.MemoryConfig(kind="ttt_cache", window=8, block=16),
        )
        model = mt.StreamingLM(cfg).eval()
        with torch.no_grad():
            mem = model.layers[0].self_attn.memory
            view = mem._step_view(model.init_state(1).scope("layers.0."))
            assert step.evict_supports(view, mem._step_weights()) == fits


def test_step_kernels_bench_sweeps_and_restores_the_constants(on, tmp_path):
    """bench/step_kernels.py at a tiny shape under the interpreter: one run per batch and
    combination of the swept constants, the module's constants as they were afterwards, and the
    JSON it writes equal to what it returns."""
    import json

    from test_moshi_adapter import load_bench

    on("cpu")
    bench = load_bench("step_kernels")
    before = (step.COMPLETE_WARPS, step.VKEY_CHUNK, step.COMPLETE_PER_SM)
    before += (step.ATTEND_CHUNK, step.ATTEND_WARPS)
    out = tmp_path / "s.json"
    args = ["--device", "cpu", "--batches", "2,3", "--heads", "2", "--head-dim", "16"]
    args += ["--hidden", "16", "--reps", "1", "--warps", "4", "--vkey-chunks", "8,16"]
    res = bench.main(args + ["--per-sm", "4", "--attend", "16:2,8:1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    got = [(r["batch"], r["vkey_chunk"], r["attend_chunk"]) for r in res["runs"]]
    assert got == [(2, 8, 16), (2, 16, 8), (3, 8, 16), (3, 16, 8)]
    after = (step.COMPLETE_WARPS, step.VKEY_CHUNK, step.COMPLETE_PER_SM)
    assert after + (step.ATTEND_CHUNK, step.ATTEND_WARPS) == before
    with pytest.raises(SystemExit):
        bench.main(args + ["--vkey-chunks", "12", "--out", str(out)])
