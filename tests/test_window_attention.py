"""Windowed attention without a [B, T, T] mask: FlexAttention's block-sparse path equals the dense
reference for every kind, with and without documents packed in rows: outputs and log-sum-exp on
the CPU (FlexAttention has no CPU backward), outputs and gradients of the compiled kernels on
CUDA; the banded form (the window kind) equals it with gradients, and "auto" picks it by
length."""

import pytest
import torch
from conftest import assert_close

from moshi_ttt.ops import window_attention as wa
from moshi_ttt.ops.masks import segment_positions
from moshi_ttt.ops.window_attention import (
    window_attention,
    window_attention_banded,
    window_attention_dense,
    window_attention_flex,
)


def inputs(B=2, H=2, T=160, Dh=16, resets=True, device="cpu", dtype=torch.float32, seed=0):
    """q, k, v [B, H, T, Dh] and positions, documents (``resets``: True, or "short" for documents
    of 8 and 3 tokens too)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (
        torch.randn(B, H, T, Dh, generator=g).to(device, dtype).requires_grad_() for _ in range(3)
    )
    r = None
    if resets:
        r = torch.zeros(B, T, dtype=torch.bool)
        r[0, 37], r[1, 90], r[1, 141] = True, True, True  # documents inside rows
        if resets == "short":
            r[0, 45], r[1, 93] = True, True
    pos, seg = segment_positions(r, B, T, "cpu")
    return q, k, v, pos.to(device), (seg.to(device) if resets else None)


CASES = [
    (kind, W, S, resets)
    for kind, W, S in (("full", 0, 0), ("window", 24, 0), ("window", 1, 0), ("sink", 24, 3))
    for resets in (False, True)
]


@pytest.mark.parametrize("kind,W,S,resets", CASES)
def test_flex_equals_the_dense_reference(kind, W, S, resets):
    q, k, v, pos, seg = (x.detach() if x is not None else None for x in inputs(resets=resets))
    o0, l0 = window_attention_dense(q, k, v, pos, seg, kind, W, S, scale=0.3, return_lse=True)
    o1, l1 = window_attention_flex(
        q, k, v, pos, seg, kind, W, S, scale=0.3, return_lse=True, compiled=False
    )
    assert_close(o1, o0, 1e-5, "output")
    assert_close(l1, l0, 1e-5, "log-sum-exp")


@pytest.mark.parametrize("W,S", [(24, 0), (1, 0), (160, 0), (7, 0), (24, 3), (7, 30), (1, 1)])
@pytest.mark.parametrize("resets", [False, True, "short"])
def test_banded_equals_the_dense_reference_with_gradients(W, S, resets):
    """Chunks of W queries against 2W keys (and the S sinks of the chunk's first document):
    outputs, log-sum-exp and the gradients of q, k, v equal the dense reference (T = 160 is no
    multiple of 24 or 7; W = T is one chunk; 30 sinks are longer than some documents)."""
    q, k, v, pos, seg = inputs(resets=resets)
    kind = "sink" if S else "window"
    g = torch.randn_like(q)
    o0, l0 = window_attention_dense(q, k, v, pos, seg, kind, W, S, scale=0.3, return_lse=True)
    o1, l1 = window_attention_banded(q, k, v, pos, seg, W, S, scale=0.3, return_lse=True)
    o2 = window_attention(q, k, v, pos, seg, kind, W, S, scale=0.3, impl="banded")
    assert_close(o1, o0, 1e-5, "output, softmax spelt out")
    assert_close(l1, l0, 1e-5, "log-sum-exp")
    assert_close(o2, o0, 1e-5, "output, SDPA")
    ref = torch.autograd.grad((o0 * g).sum(), (q, k, v))
    for out in (o1, o2):
        for name, a, b in zip("qkv", torch.autograd.grad((out * g).sum(), (q, k, v)), ref):
            assert_close(a, b, 1e-5, f"d{name}")


def test_auto_takes_the_banded_form_from_a_length_of_banded_min_windows(monkeypatch):
    """On the CPU "auto" runs the window and sink kinds banded from T >= BANDED_MIN x W and densely
    below (and full attention densely), with the same result."""
    calls = []
    for name in ("window_attention_banded", "window_attention_dense"):
        fn = getattr(wa, name)
        monkeypatch.setattr(
            wa, name, lambda *a, fn=fn, name=name, **k: calls.append(name) or fn(*a)
        )
    q, k, v, pos, seg = (x.detach() for x in inputs())  # T = 160
    for kind, W, want in (
        ("window", 160 // wa.BANDED_MIN, "banded"),
        ("window", 160 // wa.BANDED_MIN + 1, "dense"),
        ("sink", 160 // wa.BANDED_MIN, "banded"),
        ("sink", 160 // wa.BANDED_MIN + 1, "dense"),
        ("full", 0, "dense"),
    ):
        calls.clear()
        out = window_attention(q, k, v, pos, seg, kind, W, 2)
        assert calls == [f"window_attention_{want}"], (kind, W, calls)
        assert_close(out, window_attention(q, k, v, pos, seg, kind, W, 2, impl="dense"), 1e-5)


def test_the_dense_log_sum_exp_path_equals_sdpa_and_bad_arguments_fail_clearly():
    q, k, v, pos, seg = inputs()
    o, _ = window_attention_dense(q, k, v, pos, seg, "window", 24, scale=0.3, return_lse=True)
    assert_close(
        o,
        window_attention(q, k, v, pos, seg, "window", 24, scale=0.3, impl="dense"),
        1e-5,
        "softmax spelt out vs SDPA",
    )
    for kw, msg in (
        (dict(kind="ring"), "kind must be"),
        (dict(window=0), "window must be"),
        (dict(impl="fast"), "impl must be"),
        (dict(kind="full", impl="banded"), "window and sink kinds"),
    ):
        args = dict(kind="window", window=4, impl="dense") | kw
        with pytest.raises(ValueError, match=msg):
            window_attention(q, k, v, pos, seg, args["kind"], args["window"], impl=args["impl"])
    with pytest.raises(ValueError, match="seg must be"):
        window_attention(q, k, v, pos, seg[:, :5], "window", 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind,W,S,resets", CASES)
def test_compiled_flex_on_cuda_equals_the_dense_reference(kind, W, S, resets):
    q, k, v, pos, seg = inputs(T=1000, Dh=64, resets=resets, device="cuda")
    g = torch.randn_like(q)
    o1 = window_attention(q, k, v, pos, seg, kind, W, S, impl="flex")
    o0 = window_attention(q, k, v, pos, seg, kind, W, S, impl="dense")
    assert_close(o1, o0, 1e-3, "output")
    for name, a, b in zip(
        "qkv",
        torch.autograd.grad((o1 * g).sum(), (q, k, v)),
        torch.autograd.grad((o0 * g).sum(), (q, k, v)),
    ):
        assert_close(a, b, 1e-3, f"d{name}")


def test_a_cached_block_mask_never_serves_other_documents():
    """The block mask is reused for the same position tensors only: new documents (or an update
    in place) in tensors of the same shape get their own mask."""
    q, k, v, pos, seg = (x.detach() for x in inputs())
    flex = lambda p, s: window_attention_flex(q, k, v, p, s, "window", 24, compiled=False)
    dense = lambda p, s: window_attention_dense(q, k, v, p, s, "window", 24)
    assert_close(flex(pos, seg), dense(pos, seg), 1e-5, "first documents")
    r = torch.zeros(2, 160, dtype=torch.bool)
    r[0, 100], r[1, 10] = True, True
    pos2, seg2 = segment_positions(r, 2, 160, "cpu")
    assert_close(flex(pos2, seg2), dense(pos2, seg2), 1e-5, "other documents")
    seg2[1, 50:] += 1  # in place: a new document at 50 in row 1
    pos2[1, 50:] = torch.arange(110)
    assert_close(flex(pos2, seg2), dense(pos2, seg2), 1e-5, "changed in place")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_window_forms_bench_times_each_form_in_its_dtype(tmp_path, dtype):
    """bench/window_forms.py on the CPU: a row per T:W pair with a time for the dense and the
    banded form, the dtype it ran in, and the JSON it writes equal to what it returns."""
    import json

    from test_moshi_adapter import load_bench

    bench = load_bench("window_forms")
    out = tmp_path / "w.json"
    args = ["--shapes", "32:8,48:16", "--reps", "1", "--batch", "1", "--heads", "1"]
    res = bench.main(args + ["--dtype", dtype, "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert res["dtype"] == dtype
    assert [(r["T"], r["W"]) for r in res["results"]] == [(32, 8), (48, 16)]
    assert all(r["dense_ms"] > 0 and r["banded_ms"] > 0 for r in res["results"])
