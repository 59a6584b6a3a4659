"""Parallel path vs streaming path: same logits for every memory kind."""

import pytest
import torch
from conftest import assert_close, stream, tiny_config

import moshi_ttt as mt

KINDS = ["full", "window", "sink"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 7, 64])
def test_parallel_equals_streaming(kind, k):
    # window 5 wraps ~60 times over 301 tokens; 301 is a multiple of none of the step sizes
    model = mt.StreamingLM(tiny_config(kind, window=5, num_sink=3)).eval()
    tokens = torch.randint(0, 50, (2, 301))
    with torch.no_grad():
        ref = model(tokens)
        out, _ = stream(model, tokens, k)
    assert_close(out, ref, 1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 7, 64])
def test_row_reset_mid_stream(kind, k):
    """Batch 3, row 1 reset before token 100: equals the parallel path with that reset,
    and row 1's tail equals a fresh stream of its post-reset tokens."""
    model = mt.StreamingLM(tiny_config(kind, window=6, num_sink=2)).eval()
    T, r = 203, 100
    tokens = torch.randint(0, 50, (3, T))
    resets = torch.zeros(3, T, dtype=torch.bool)
    resets[1, r] = True
    with torch.no_grad():
        ref = model(tokens, resets=resets)
        out, _ = stream(model, tokens, k, resets_at={r: torch.tensor([False, True, False])})
        fresh = model(tokens[1:2, r:])
    assert_close(out, ref, 1e-4, "streaming vs parallel")
    assert_close(ref[1:2, r:], fresh, 1e-4, "row 1 after the reset vs a fresh row")
    assert_close(ref[[0, 2]], model(tokens[[0, 2]]), 1e-4, "rows 0 and 2 alone")


def test_full_causal_fast_path_equals_mask():
    """``is_causal`` fast path of full attention vs the explicit position mask."""
    model = mt.StreamingLM(tiny_config("full")).eval()
    tokens = torch.randint(0, 50, (2, 77))
    with torch.no_grad():
        fast = model(tokens)
        masked = model(tokens, resets=torch.zeros(2, 77, dtype=torch.bool))
    assert_close(fast, masked, 1e-5)


@pytest.mark.parametrize("kind", ["window", "sink"])
def test_state_bytes_constant(kind):
    W = 8
    model = mt.StreamingLM(tiny_config(kind, window=W)).eval()
    tokens = torch.randint(0, 50, (2, 100 * W))
    with torch.no_grad():
        _, s10 = stream(model, tokens[:, : 10 * W], 16)
        _, s100 = stream(model, tokens, 16)
    assert s10.nbytes() == s100.nbytes()
    assert {k: v.shape for k, v in s10.tensors.items()} == {
        k: v.shape for k, v in s100.tensors.items()
    }


def test_full_state_grows():
    model = mt.StreamingLM(tiny_config("full")).eval()
    with torch.no_grad():
        _, s1 = stream(model, torch.randint(0, 50, (1, 10)), 5)
        _, s2 = stream(model, torch.randint(0, 50, (1, 200)), 5)
    assert s2.nbytes() > s1.nbytes()


def test_window_beyond_window_is_forgotten():
    """A window model's prediction does not depend on tokens more than `window` back."""
    model = mt.StreamingLM(tiny_config("window", window=4, num_layers=1)).eval()
    a = torch.randint(0, 50, (1, 30))
    b = a.clone()
    b[:, :10] = torch.randint(0, 50, (1, 10))
    with torch.no_grad():
        la, lb = model(a), model(b)
    # one layer, window 4: the last token sees positions 26..29 only
    assert (la[:, -1] - lb[:, -1]).abs().max().item() == 0.0
    assert (la[:, 10] - lb[:, 10]).abs().max().item() > 0.0
