"""Saved-and-loaded states continue exactly like the original."""

import pytest
import torch
from conftest import assert_close, stream, tiny_config

import moshi_ttt as mt


@pytest.mark.parametrize("kind", ["full", "window", "sink"])
def test_saved_state_continues_exactly(kind, tmp_path):
    model = mt.StreamingLM(tiny_config(kind, window=6)).eval()
    a, b = torch.randint(0, 50, (2, 41)), torch.randint(0, 50, (2, 23))
    with torch.no_grad():
        _, state = stream(model, a, 5)
        state.save(tmp_path / "s.pt")
        loaded = mt.StreamingState.load(tmp_path / "s.pt")
        assert loaded.meta == state.meta
        assert all(torch.equal(loaded[n], state[n]) for n in state.tensors)
        cont, _ = stream(model, b, 4, state=state)
        cont2, _ = stream(model, b, 4, state=loaded)
        straight = model(torch.cat([a, b], dim=1))[:, a.shape[1] :]
    assert torch.equal(cont, cont2)
    assert_close(cont, straight, 1e-4)


def test_load_rejects_other_config(tmp_path):
    m1 = mt.StreamingLM(tiny_config("window", window=6))
    m2 = mt.StreamingLM(tiny_config("window", window=7))
    m1.init_state(1).save(tmp_path / "s.pt")
    with pytest.raises(ValueError, match="different model config"):
        m2.step(torch.zeros(1, 1, dtype=torch.long), mt.StreamingState.load(tmp_path / "s.pt"))


def test_load_rejects_garbage(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a state")
    with pytest.raises(ValueError, match="not a readable saved state"):
        mt.StreamingState.load(tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="no saved state"):
        mt.StreamingState.load(tmp_path / "missing.pt")


def test_reset_restores_empty_rows():
    model = mt.StreamingLM(tiny_config("sink", window=4)).eval()
    with torch.no_grad():
        _, st = stream(model, torch.randint(0, 50, (3, 17)), 3)
    before = {n: t.clone() for n, t in st.tensors.items()}
    st.reset(torch.tensor([True, False, True]))
    empty = model.init_state(3)
    for n, t in st.tensors.items():
        assert torch.equal(t[[0, 2]], empty[n][[0, 2]]), n
        assert torch.equal(t[1], before[n][1]), n
