"""The Triton training scan (ops/ttt_scan_triton.py) against its reference
(ops/ttt_cache.scan_states):
states, final momenta, losses and every gradient, on CPU under Triton's interpreter where Triton is
installed and on the GPU with ``-m gpu``."""

import pytest
import torch
from conftest import TRITON_DEVICES as DEVICES
from conftest import (
    assert_close,
    assert_same_training,
    logits_and_grads,
    scan_model,
    scan_problem,
)

from moshi_ttt.ops import ttt_cache as ops
from moshi_ttt.ops import ttt_scan_torch
from moshi_ttt.ops import ttt_scan_triton as tri

pytestmark = pytest.mark.skipif(not tri.triton, reason="needs Triton")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_precision", ["fp32", "tf32"])
@pytest.mark.parametrize(
    "shape, opts",
    [
        ((3, 5, 16, 16, 32), dict(decay=0.0, momentum=0.0, max_norm=100.0, bptt=0)),
        # every option, cap active
        ((2, 4, 64, 16, 16), dict(decay=0.1, momentum=0.9, max_norm=2.5, bptt=2)),
        ((2, 3, 32, 32, 16), dict(decay=0.0, momentum=0.5, max_norm=100.0, bptt=1)),
    ],
)
def test_triton_scan_equals_reference_with_gradients(on, device, shape, opts, grad_precision):
    """States, momenta, losses and every gradient against the reference; the gradients that come
    in (the states' and momenta's) are read and never written."""
    dev = on(device)
    torch.manual_seed(0)
    ds, moms, inits, keys, vals, eta, apply = scan_problem(
        *shape, bool(opts["momentum"]), device=dev
    )
    assert tri.supports(ds, keys)
    args = (
        ds,
        moms,
        inits,
        keys,
        vals,
        eta,
        apply,
        opts["decay"],
        opts["momentum"],
        opts["max_norm"],
        opts["bptt"],
    )
    ref = ops.scan_states(*args)
    fast = tri.scan_states(*args, grad_precision)
    leaves = [*ds, *(moms or ()), *inits, keys, vals, eta]
    weights = [torch.randn_like(s) for s in ref[0]] + [torch.randn_like(s) for s in (ref[1] or ())]

    kept = [w.clone() for w in weights]

    def grads(out):
        return torch.autograd.grad([*out[0], *(out[1] or ())], leaves, weights)

    for a, b in zip([*ref[0], *(ref[1] or ()), ref[2]], [*fast[0], *(fast[1] or ()), fast[2]]):
        assert_close(b, a, 1e-4, "states, momenta, losses")
    if opts["max_norm"] < 10:  # the cap binds somewhere (so its backward is exercised)
        assert (
            torch.linalg.vector_norm(fast[0][0][:, 1:], dim=(-2, -1)) > opts["max_norm"] - 1e-4
        ).any()
    for name, a, b in zip(
        "d1 d2 m1 m2 i1 i2 keys vals eta".split() if moms else "d1 d2 i1 i2 keys vals eta".split(),
        grads(ref),
        grads(fast),
    ):
        assert_close(b, a, 3e-3 if grad_precision == "tf32" else 1e-5, name, floor=0.0)
    for w, k in zip(weights, kept):
        assert torch.equal(w, k)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_scan_momenta_without_momentum_follow_the_reference(on, device):
    """Momenta given with momentum 0 pass through unchanged; truncated BPTT cuts their gradient
    (as the reference detaches them)."""
    dev = on(device)
    torch.manual_seed(0)
    ds, moms, inits, keys, vals, eta, apply = scan_problem(2, 5, 16, 16, 16, True, device=dev)
    for bptt in (0, 2):
        args = (ds, moms, inits, keys, vals, eta, apply, 0.05, 0.0, 100.0, bptt)
        ref, fast = ops.scan_states(*args), tri.scan_states(*args, "fp32")
        for a, b in zip(ref[1], fast[1]):
            assert_close(b, a, 0.0, "momenta")
        total = lambda out: sum((s * s).sum() for s in [*out[0], *out[1]])
        ref_g = torch.autograd.grad(total(ref), moms, allow_unused=True)
        fast_g = torch.autograd.grad(total(fast), moms)
        for a, b in zip(ref_g, fast_g):
            assert_close(b, torch.zeros_like(b) if a is None else a, 1e-5, f"bptt {bptt}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shared", [False, True])
def test_model_training_with_triton_scan_equals_reference(on, device, shared, monkeypatch):
    """A TTT-cache model's logits and every parameter's gradient (batch 2 with a reset, momentum,
    decay, the cap and truncated BPTT) are the same through the fused scan and the reference (TF32
    gradients, per-head compressors, to 3e-3 of their largest entry on the GPU)."""
    precision = "fp32" if shared else "tf32"
    model, tokens, resets = scan_model(shared, on(device), precision)
    calls, kernel = [], tri.scan_states
    monkeypatch.setattr(tri, "scan_states", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    with monkeypatch.context() as mp:  # autograd through scan_step
        mp.setattr(tri, "supports", lambda *a: False)
        mp.setattr(ttt_scan_torch, "supports", lambda *a: False)
        ref = logits_and_grads(model, tokens, resets)
    n_ref = len(calls)
    got = logits_and_grads(model, tokens, resets)
    # the fused scan ran in every layer, and only then
    assert n_ref == 0 and len(calls) == model.cfg.num_layers
    tol = 3e-3 if device == "cuda" and precision == "tf32" else 1e-5
    assert_same_training(got, ref, 1e-5, tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_graph_replayed_scan_equals_direct_launches(momentum, monkeypatch):
    """Long scans replay their launch loops as captured CUDA graphs: states, momenta, losses and
    every gradient equal direct launches, for two problems of one shape (the second replays the
    first one's graph on new inputs), and for a third after the launch settings change (other
    token chunks: graphs of their own, not the first ones replayed)."""
    monkeypatch.setattr(tri, "_graphs", {})
    N = 2 * tri.GRAPH_MIN_BLOCKS
    for seed in (0, 1, 2):
        if seed == 2:
            monkeypatch.setattr(tri, "CHUNK", tri.CHUNK // 2)
            monkeypatch.setattr(tri, "GRAD_CHUNK", tri.GRAD_CHUNK * 2)
        torch.manual_seed(seed)
        ds, moms, inits, keys, vals, eta, apply = scan_problem(
            3, N, 32, 16, 32, bool(momentum), device=torch.device("cuda")
        )
        leaves = [*ds, *(moms or ()), *inits, keys, vals, eta]
        args = (ds, moms, inits, keys, vals, eta, apply, 0.05, momentum, 3.0, 3)
        results = []
        for minimum in (10**9, tri.GRAPH_MIN_BLOCKS):  # direct launches, then the graph
            monkeypatch.setattr(tri, "GRAPH_MIN_BLOCKS", minimum)
            out = tri.scan_states(*args, "fp32")
            outs = [*out[0], *(out[1] or ()), out[2]]
            total = sum(
                (torch.linspace(-1, 1, o.numel(), device="cuda").view_as(o) * o).sum()
                for o in outs[:-1]
            )
            results.append([o.detach() for o in outs] + list(torch.autograd.grad(total, leaves)))
        # forward and backward, captured once and replayed for seed 1; captured again for seed 2
        assert len(tri._graphs) == (2 if seed < 2 else 4)
        for a, b in zip(*results):
            assert_close(b, a, 1e-6, "graph replay")
