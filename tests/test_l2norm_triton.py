"""The keys' L2 normalisation kernel (ops/l2norm_triton.py) against ``F.normalize``: values and
gradients, with zero and tiny rows (the clamped branch), fp32 and bf16 inputs, a partial last
program; on CPU under Triton's interpreter and on the GPU with ``-m gpu``."""

import pytest
import torch
from conftest import TRITON_DEVICES as DEVICES
from conftest import assert_close
from torch.nn import functional as F

from moshi_ttt.ops import l2norm_triton as l2

pytestmark = pytest.mark.skipif(not l2.triton, reason="needs Triton")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalize_kernel_equals_reference(on, device, dtype):
    dev = on(device)
    x = torch.randn(3, 7, 23, 64, device=dev).to(dtype)  # 483 rows: the last program is partial
    x[0, 0, :3] = 0.0  # zero rows: the norm is clamped to ε
    x[1, 2, 5] = 1e-14  # a tiny row, clamped too
    assert l2.supports(x)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    fast, ref = l2.normalize(xs[0]), l2.reference(xs[1])
    assert fast.dtype == ref.dtype == torch.float32
    assert_close(fast, ref, 1e-5, "values")
    dy = torch.randn_like(ref)
    (g_fast,), (g_ref,) = (
        torch.autograd.grad((y * dy).sum(), [xi]) for y, xi in ((fast, xs[0]), (ref, xs[1]))
    )
    assert g_fast.dtype == g_ref.dtype == dtype
    rel = 1e-4 if dtype == torch.float32 else 2e-2
    clamped = torch.zeros(x.shape[:-1], dtype=torch.bool, device=dev)
    clamped[0, 0, :3] = clamped[1, 2, 5] = True  # dy / ε there (~1e12): compared on their own
    assert_close(g_fast[~clamped], g_ref[~clamped], rel, "gradients")
    assert_close(g_fast[clamped], g_ref[clamped], rel, "gradients where clamped")
    assert_close(
        g_fast[0, 0, :3],
        g_ref[0, 0, :3],
        1e-6 if dtype == torch.float32 else 1e-2,
        "gradients dy / ε where clamped",
    )


def test_unsupported_inputs_take_the_reference(on):
    on("cpu")
    for x in (torch.randn(4, 24), torch.randn(4, 8), torch.randn(4, 64, dtype=torch.float64)):
        assert not l2.supports(x)
        assert torch.equal(
            l2.normalize(x), F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1)
        )
