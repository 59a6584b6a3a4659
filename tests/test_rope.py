"""RoPE and YaRN (ops/rope.py): vectorised vs per-pair reference, the paper's ramp and temperature."""

import math

import pytest
import torch

from moshi_ttt.ops.rope import (apply_rope, rope_frequencies, yarn_attention_scale, yarn_frequencies,
                                yarn_frequencies_naive, yarn_ramp)


@pytest.mark.parametrize("head_dim,max_period,scale,context,fast,slow", [
    (128, 10_000.0, 4.0, 3000, 32.0, 1.0),   # Moshi 7B extended 4x
    (128, 10_000.0, 16.0, 3000, 32.0, 1.0),
    (64, 10_000.0, 1.5, 2048, 32.0, 1.0),
    (8, 10_000.0, 4.0, 300, 32.0, 1.0),      # the tiny test model: all three regimes
    (96, 500_000.0, 8.0, 8192, 16.0, 2.0),   # other boundaries
    (128, 10_000.0, 1.0, 3000, 32.0, 1.0),   # no extension
])
def test_yarn_vectorised_equals_per_pair_reference(head_dim, max_period, scale, context, fast, slow):
    fast_path = yarn_frequencies(head_dim, max_period, scale, context, beta_fast=fast, beta_slow=slow)
    ref = yarn_frequencies_naive(head_dim, max_period, scale, context, beta_fast=fast, beta_slow=slow)
    assert fast_path.dtype == torch.float32
    torch.testing.assert_close(fast_path, ref, rtol=1e-6, atol=0)


def test_trap10_yarn_ramp_and_temperature():
    """DESIGN trap 10, Moshi's RoPE (head dim 128, max_period 10000, 3000-step context), s = 4.
    r(d) = L / λ_d turns of pair d over the context: r < α = 1 -> θ/s, r > β = 32 -> θ (untouched),
    between: blended, and blending moves monotonically from θ (fast pairs) to θ/s (slow pairs)."""
    D, b, L, s = 128, 10_000.0, 3000, 4.0
    theta = rope_frequencies(D, b)
    h = yarn_frequencies(D, b, s, L)
    r = [L / (2 * math.pi / (b ** (-2 * d / D))) for d in range(D // 2)]  # per pair, in Python floats
    slow = [d for d in range(D // 2) if r[d] < 1.0]
    fast = [d for d in range(D // 2) if r[d] > 32.0]
    band = [d for d in range(D // 2) if 1.0 <= r[d] <= 32.0]
    assert (len(fast), len(band), len(slow)) == (19, 24, 21)
    assert fast == list(range(19)) and slow == list(range(43, 64))  # high frequencies are kept
    assert torch.equal(h[fast], theta[fast])
    torch.testing.assert_close(h[slow], theta[slow] / s, rtol=1e-6, atol=0)
    # the band: strictly between θ/s and θ, the kept fraction γ falling with d
    gamma = (h[band] - theta[band] / s) / (theta[band] - theta[band] / s)
    assert ((gamma > 0) & (gamma < 1)).all() and (gamma.diff() < 0).all()
    torch.testing.assert_close(gamma.double(), torch.tensor([(r[d] - 1) / 31 for d in band], dtype=torch.float64),
                               rtol=0, atol=1e-5)
    # counted from the result: 19 pairs untouched, 21 divided by s (43 pairs have r > α: a ramp
    # with α and β swapped would leave all 43 untouched, the earlier attempt's count)
    assert int((h == theta).sum()) == 19
    assert int(torch.isclose(h, theta / s, rtol=1e-6, atol=0).sum()) == 21
    # the slowest pair's wavelength is stretched s times
    assert math.isclose(2 * math.pi / h[-1].item(), s * 2 * math.pi / theta[-1].item(), rel_tol=1e-6)
    # temperature: √(1/t) = 0.1 ln s + 1 on q and k each, 1/t on the logits
    assert yarn_attention_scale(s) == pytest.approx(0.1 * math.log(4.0) + 1.0, rel=1e-12)
    assert yarn_attention_scale(s) == pytest.approx(1.1386294361, abs=1e-9)
    assert yarn_attention_scale(s) ** 2 == pytest.approx(1.2964769928, abs=1e-9)
    assert yarn_attention_scale(1.0) == 1.0 and yarn_attention_scale(0.5) == 1.0


def test_yarn_ramp_boundaries():
    """γ at and around α and β against the piecewise definition."""
    r = torch.tensor([0.0, 0.5, 1.0, 1.0 + 1e-3, 16.5, 32.0 - 1e-3, 32.0, 40.0], dtype=torch.float64)
    ref = [0.0 if x < 1 else 1.0 if x > 32 else (x - 1) / 31 for x in r.tolist()]
    torch.testing.assert_close(yarn_ramp(r, 1.0, 32.0), torch.tensor(ref, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_yarn_scale_one_is_plain_rope(scale):
    """No extension: identical frequencies, identical rotations."""
    plain, yarn = rope_frequencies(128, 10_000.0), yarn_frequencies(128, 10_000.0, scale, 3000)
    assert torch.equal(plain, yarn)
    x, pos = torch.randn(2, 3, 11, 128), torch.randint(0, 5000, (2, 11))
    assert torch.equal(apply_rope(x, pos, plain), apply_rope(x, pos, yarn))


def test_yarn_rejects_impossible_arguments():
    with pytest.raises(ValueError, match="original_context"):
        yarn_frequencies(128, 10_000.0, 4.0, 0)
    with pytest.raises(ValueError, match="beta_fast"):
        yarn_frequencies(128, 10_000.0, 4.0, 3000, beta_fast=1.0, beta_slow=1.0)
