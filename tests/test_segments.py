"""One document per row (``seg`` None) skips packing: the evicting memories' parallel read then
equals the packed path given one segment id per row, outputs and gradients."""

import pytest
import torch
from conftest import assert_close

import moshi_ttt as mt
from moshi_ttt.layers.memory import Heads
from moshi_ttt.ops.segments import pack, row_of, segment_rows, unpack


@pytest.mark.parametrize(
    "kind, extra",
    [
        ("ttt_cache", {}),
        ("ttt_cache", {"combine": "concat"}),
        ("ttt_cache", {"virtual_position": "decay"}),
        ("pooled", {}),
        ("pooled", {"combine": "concat"}),
        ("infini", {}),
    ],
)
def test_unpacked_rows_equal_packed_reference(kind, extra):
    cfg = mt.ModelConfig(
        vocab_size=50,
        dim=32,
        num_layers=1,
        num_heads=4,
        memory=mt.MemoryConfig(kind=kind, window=5, block=4, num_virtual=3, **extra),
    )
    attn = mt.StreamingLM(cfg).double().layers[0].self_attn
    mem = attn.memory
    with torch.no_grad():
        mem.gate.normal_(0, 1.0)
    g = torch.Generator().manual_seed(0)
    B, H, T, Dh = 3, 4, 43, 8
    pos = torch.arange(T).expand(B, T)
    outs = []
    for seg in (None, torch.zeros_like(pos)):
        q, k, v = (
            torch.randn(
                B, H, T, Dh, dtype=torch.float64, generator=g.manual_seed(i)
            ).requires_grad_()
            for i in range(3)
        )
        out = mem.attend_parallel(Heads(v=v, q=q, k=k, q_raw=q, k_raw=k), pos, seg, attn.freqs)
        grads = torch.autograd.grad(
            (out * torch.linspace(-1, 1, Dh, dtype=out.dtype)).sum(),
            [q, k, v] + [p for p in mem.parameters() if p.requires_grad],
            allow_unused=True,
        )
        outs.append((out, grads))
    (a, ga), (b, gb) = outs
    assert_close(a, b, 1e-12, "outputs")
    for x, y in zip(ga, gb):
        assert (x is None) == (y is None)
        if x is not None:
            assert_close(x, y, 1e-10, "gradients")


def test_unpacked_helpers_equal_index_forms():
    """pack / unpack / row_of without a segment index equal their index forms for rows that start at
    0."""
    B, T, L = 2, 7, 10
    pos = torch.arange(T).expand(B, T)
    x = torch.randn(B, T, 3)
    r, rows, length = segment_rows(pos, None, 5)
    r_ref, rows_ref, length_ref = segment_rows(pos, torch.zeros_like(pos), 5)
    assert (rows, length) == (rows_ref, length_ref) == (B, L)
    assert torch.equal(pack(x, r, pos, rows, length), pack(x, r_ref, pos, rows, length))
    assert torch.equal(
        unpack(pack(x, r, pos, rows, length), r, pos),
        unpack(pack(x, r_ref, pos, rows, L), r_ref, pos),
    )
    assert torch.equal(row_of(r, pos), row_of(r_ref, pos))
