"""The tests' float comparison (conftest.assert_close) against the bound written out directly:
max|actual - expected| <= rel * max(max|expected|, 1)."""

import numpy as np
import pytest
import torch
from conftest import assert_close


def passes(actual, expected, rel, **kw) -> bool:
    try:
        assert_close(actual, expected, rel, **kw)
    except AssertionError:
        return False
    return True


def direct(actual, expected, rel, floor=1.0) -> bool:
    a, e = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return bool(np.max(np.abs(a - e)) <= rel * max(np.max(np.abs(e)), floor))


@pytest.mark.parametrize("scale", [1e-3, 0.5, 1.0, 65.0, 1e4])
@pytest.mark.parametrize("rel", [1e-6, 1e-4])
def test_limit_just_above_fails_and_just_below_passes(scale, rel):
    g = np.random.default_rng(0)
    expected = scale * g.uniform(-1, 1, (7, 5))
    expected[3, 2] = -scale  # the largest entry: |expected| = scale
    limit = rel * max(scale, 1.0)
    for i in range(5):  # the perturbed entry: the largest or any other
        idx = (3, 2) if i == 0 else tuple(g.integers(0, n) for n in expected.shape)
        for sign in (1, -1):
            for factor, ok in ((1 - 1e-6, True), (1 + 1e-6, False)):
                actual = expected.copy()
                actual[idx] += sign * factor * limit
                assert passes(actual, expected, rel) == direct(actual, expected, rel) == ok
                assert passes(torch.from_numpy(actual), torch.from_numpy(expected), rel) is ok
                assert passes(torch.from_numpy(actual), expected, rel) is ok  # mixed kinds


def test_agrees_with_the_direct_bound_on_random_cases():
    g = np.random.default_rng(1)
    for _ in range(300):
        scale, rel = 10.0 ** g.uniform(-4, 4), 10.0 ** g.uniform(-7, -2)
        expected = scale * g.standard_normal(int(g.integers(1, 40)))
        limit = rel * max(np.abs(expected).max(), 1.0)
        actual = expected + limit * g.uniform(-2, 2, expected.shape)
        assert passes(actual, expected, rel) == direct(actual, expected, rel)
        assert passes(actual, expected, rel, floor=0.0) == direct(actual, expected, rel, floor=0.0)


def test_the_limit_scales_with_expected():
    """The same relative error passes at every magnitude; below 1 the limit stays rel."""
    base = torch.linspace(-1, 1, 11, dtype=torch.float64)
    for scale in (1.0, 3.0, 1e3, 1e6):
        assert passes(scale * base * (1 + 0.9e-5), scale * base, 1e-5)
        assert not passes(scale * base * (1 + 1.1e-5), scale * base, 1e-5)
    small = 1e-3 * base
    assert passes(small + 0.9e-5, small, 1e-5) and not passes(small + 1.1e-5, small, 1e-5)
    assert passes(small * (1 + 0.9e-5), small, 1e-5, floor=0.0)
    assert not passes(small * (1 + 1.1e-5), small, 1e-5, floor=0.0)


def test_float32_bfloat16_and_numbers():
    x = torch.randn(4, 6)
    assert passes(x * (1 + 1e-6), x, 1e-5) and not passes(x + 1e-3, x, 1e-5)
    assert passes(x.bfloat16(), x, 1e-2) and not passes(x.bfloat16(), x, 1e-5)
    assert passes(2.0, 2.0 + 1e-7, 1e-7) and not passes(2.0, 2.0 + 1e-6, 1e-7)
    assert passes(torch.tensor(3.0), 3.0, 0.0) and not passes(torch.tensor(3.0), 3.1, 1e-3)
    assert passes(np.zeros((2, 0)), np.zeros((2, 0)), 1e-6)


def test_nan_infinity_and_shapes_never_pass():
    x = torch.randn(3, 4, dtype=torch.float64)
    nan, inf = x.clone(), x.clone()
    nan[1, 2], inf[0, 0] = float("nan"), float("inf")
    for a, e in ((nan, x), (x, nan), (nan, nan), (inf, x), (x, inf), (inf, inf)):
        assert not passes(a, e, 1.0)
    assert not passes(x, x[:, :3], 1.0) and not passes(x, x.T, 1.0) and not passes(x[None], x, 1.0)


def test_message_gives_the_error_the_scale_and_the_ratio():
    expected = torch.tensor([0.0, -65.0, 3.0], dtype=torch.float64)
    actual = expected + torch.tensor([0.0, 2.6e-3, 0.0], dtype=torch.float64)
    with pytest.raises(AssertionError) as info:
        assert_close(actual, expected, 1e-5, "fast weights")
    msg = str(info.value)
    for part in ("fast weights", "0.0026", "scale 65", "0.00065", "4e-05"):
        assert part in msg, msg
    with pytest.raises(AssertionError, match="shape"):
        assert_close(torch.zeros(2), torch.zeros(3), 1.0, "w")
