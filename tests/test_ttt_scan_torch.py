"""The training scan with a hand-written backward (ops/ttt_scan_torch.py) against its reference,
autograd through ops/ttt_cache.scan_states: states, final momenta, losses and every gradient."""

import pytest
import torch
from conftest import (
    TRITON_DEVICES,
    assert_close,
    assert_same_training,
    logits_and_grads,
    scan_model,
    scan_problem,
)

from moshi_ttt.ops import ttt_cache as ops
from moshi_ttt.ops import ttt_scan_torch as scan

CUDA = TRITON_DEVICES[1]  # "cuda", marked gpu and skipped without CUDA


@pytest.mark.parametrize(
    "shape, opts, moms, skip",
    [
        ((3, 5, 16, 16, 32), dict(decay=0.0, momentum=0.0, max_norm=100.0, bptt=0), False, False),
        ((3, 5, 16, 16, 32), dict(decay=0.03, momentum=0.0, max_norm=100.0, bptt=0), False, True),
        # every option, the cap active
        ((2, 4, 8, 16, 16), dict(decay=0.1, momentum=0.9, max_norm=2.5, bptt=2), True, True),
        ((2, 6, 4, 8, 12), dict(decay=0.1, momentum=0.9, max_norm=2.5, bptt=2), True, False),
        ((2, 3, 32, 32, 16), dict(decay=0.0, momentum=0.5, max_norm=100.0, bptt=1), True, True),
        # momenta given, no momentum: they pass through, and truncated BPTT cuts them
        ((2, 3, 4, 8, 16), dict(decay=0.05, momentum=0.0, max_norm=1.5, bptt=0), True, True),
        ((2, 5, 4, 8, 16), dict(decay=0.05, momentum=0.0, max_norm=1.5, bptt=2), True, True),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", ["cpu", "cpu-masked", CUDA])
def test_scan_equals_reference_with_gradients(shape, opts, moms, skip, dtype, device, monkeypatch):
    """Against autograd through ``scan_step``, on the CPU, on the CPU with every block masked as
    on a GPU (where whether all blocks apply is not asked), and on the GPU with ``-m gpu``."""
    if device == "cpu-masked":
        monkeypatch.setattr(scan, "_all_apply", lambda on: False)
    torch.manual_seed(0)
    dev = torch.device(device.split("-")[0])
    ds, mo, inits, keys, vals, eta, apply = scan_problem(*shape, moms, skip, dtype, dev)
    assert scan.supports(ds, keys)
    args = (ds, mo, inits, keys, vals, eta, apply, *opts.values())
    ref, fast = ops.scan_states(*args), scan.scan_states(*args)
    leaves = [*ds, *(mo or ()), *inits, keys, vals, eta]
    weights = [torch.randn_like(s) for s in ref[0]] + [torch.randn_like(s) for s in (ref[1] or ())]

    def grads(out):
        total = sum((w * s).sum() for w, s in zip(weights, [*out[0], *(out[1] or ())]))
        return torch.autograd.grad(total, leaves, allow_unused=True)

    rel = 1e-5 if dtype == torch.float32 else 1e-12
    for a, b in zip([*ref[0], *(ref[1] or ()), ref[2]], [*fast[0], *(fast[1] or ()), fast[2]]):
        assert_close(b, a, rel, "states, momenta, losses")
    if opts["max_norm"] < 10:  # the cap binds somewhere (so its backward is exercised)
        assert (
            torch.linalg.vector_norm(fast[0][0][:, 1:], dim=(-2, -1)) > opts["max_norm"] - 1e-4
        ).any()
    names = "d1 d2 m1 m2 i1 i2 keys vals eta".split() if mo else "d1 d2 i1 i2 keys vals eta".split()
    for name, a, b in zip(names, grads(ref), grads(fast)):
        a = torch.zeros_like(b) if a is None else a  # unused in the reference: zero
        assert_close(b, a, 10 * rel, name, floor=0.0)


@pytest.mark.parametrize("shared", [False, True])
def test_model_training_with_torch_scan_equals_reference(shared, monkeypatch):
    """A TTT-cache model's logits and every parameter's gradient (batch 2 with a reset, momentum,
    decay, the cap and truncated BPTT) are the same through the hand-written backward and autograd
    through ``scan_step``, and the model's training path takes the hand-written one."""
    torch.manual_seed(0)
    model, tokens, resets = scan_model(shared)
    calls, fast = [], scan.scan_states
    monkeypatch.setattr(scan, "scan_states", lambda *a, **k: calls.append(1) or fast(*a, **k))
    with monkeypatch.context() as mp:
        mp.setattr(scan, "supports", lambda *a: False)
        ref = logits_and_grads(model, tokens, resets)
    n_ref = len(calls)
    got = logits_and_grads(model, tokens, resets)
    assert n_ref == 0 and len(calls) == model.cfg.num_layers
    assert_same_training(got, ref, 1e-5, 1e-5)


def test_backward_twice_equals_once():
    """The saved activations outlive a backward with retain_graph: a second backward through the
    same scan gives the same gradients."""
    torch.manual_seed(0)
    ds, mo, inits, keys, vals, eta, apply = scan_problem(2, 3, 4, 8, 16, True)
    (s1, s2), _, _ = scan.scan_states(ds, mo, inits, keys, vals, eta, apply, 0.1, 0.5, 2.0, 0)
    total = (s1 * torch.randn_like(s1)).sum() + s2.pow(2).sum()
    first = torch.autograd.grad(total, [*ds, keys, eta], retain_graph=True)
    for a, b in zip(first, torch.autograd.grad(total, [*ds, keys, eta])):
        assert torch.equal(a, b)


def test_without_gradients_equals_reference_and_refuses_misuse():
    """Under no_grad (no activations kept) the states, momenta and losses equal the reference's;
    second-order gradients and momentum without momenta are refused."""
    torch.manual_seed(0)
    ds, mo, inits, keys, vals, eta, apply = scan_problem(2, 4, 8, 16, 16, True)
    args = (ds, mo, inits, keys, vals, eta, apply, 0.1, 0.9, 2.5, 2)
    with torch.no_grad():
        ref, fast = ops.scan_states(*args), scan.scan_states(*args)
    for a, b in zip([*ref[0], *ref[1], ref[2]], [*fast[0], *fast[1], fast[2]]):
        assert not b.requires_grad
        assert_close(b, a, 1e-5, "states, momenta, losses without gradients")
    (s1, s2), _, _ = scan.scan_states(*args)
    (gk,) = torch.autograd.grad(s1.pow(2).sum() + s2.pow(2).sum(), [keys], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gk.sum().backward()
    with pytest.raises(ValueError, match="momentum needs momenta"):
        scan.scan_states(ds, None, inits, keys, vals, eta, apply, 0.1, 0.9, 2.5, 2)
