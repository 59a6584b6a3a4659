import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels, where installed, run under its interpreter (set before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import moshi_ttt as mt  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Triton kernel tests: on CPU under the interpreter, and on the GPU with ``-m gpu``
TRITON_DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


@pytest.fixture
def on(monkeypatch):
    """Lets Triton kernels take CPU tensors (under the interpreter); ``on(name)`` -> the device."""
    from moshi_ttt.ops import ttt_cache_triton
    monkeypatch.setattr(ttt_cache_triton, "CPU_INTERPRET", True)

    def device(name):
        if name == "cpu" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton's interpreter is off (set TRITON_INTERPRET=1 before import)")
        return torch.device(name)
    return device


def tiny_config(kind: str = "window", window: int = 5, num_sink: int = 2, vocab: int = 50, num_layers: int = 2) -> mt.ModelConfig:
    return mt.ModelConfig(vocab_size=vocab, dim=32, num_layers=num_layers, num_heads=4,
                          memory=mt.MemoryConfig(kind=kind, window=window, num_sink=num_sink))


def stream(model, tokens, k, state=None, resets_at=None):
    """Feed ``tokens`` [B, T] k at a time (a list: step sizes in turn); ``resets_at`` {t: mask} resets
    rows before token t."""
    B, T = tokens.shape
    state = state if state is not None else model.init_state(B)
    outs, t, sizes = [], 0, (list(k) if isinstance(k, (list, tuple)) else [k])
    while t < T:
        step = sizes[len(outs) % len(sizes)]
        for r, mask in (resets_at or {}).items():
            if t == r:
                state.reset(mask)
            elif t < r < t + step:
                step = r - t  # stop at the reset
        logits, state = model.step(tokens[:, t:t + step], state)
        outs.append(logits)
        t += step
    return torch.cat(outs, dim=1), state


def reset_parity(model, T: int, r: int, k: int, vocab: int = 50) -> float:
    """Max |streaming - parallel| over batch 3 with row 1 reset before token r, k tokens a step."""
    tokens = torch.randint(0, vocab, (3, T))
    resets = torch.zeros(3, T, dtype=torch.bool)
    resets[1, r] = True
    with torch.no_grad():
        ref = model(tokens, resets=resets)
        out, _ = stream(model, tokens, k, resets_at={r: torch.tensor([False, True, False])})
    return (out - ref).abs().max().item()


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """A small prepared corpus from a fake source (12 documents of random words)."""
    import numpy as np
    from moshi_ttt.data import prepare
    from moshi_ttt.data.sources import Document, LoadedSource, Provenance

    rng = np.random.default_rng(0)
    words = ["the", "pass", "key", "river", "stone", "light", "memory", "window"]

    def fake_source(name, cache_dir):
        docs = [Document(name, f"d{i}", f"doc {i}", " ".join(rng.choice(words, size=int(rng.integers(300, 900)))),
                         "public domain") for i in range(12)]
        return LoadedSource(name, docs, Provenance("fake", "1", "0" * 64, "public domain"))

    monkeypatch.setattr(prepare, "load_source", fake_source)
    out = tmp_path / "corpus"
    prepare.prepare_corpus(out, sources=("a", "b"), progress=False, val_frac=0.2, test_frac=0.2)
    return out
