import pytest
import torch

import moshi_ttt as mt


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_config(kind: str = "window", window: int = 5, num_sink: int = 2, vocab: int = 50, num_layers: int = 2) -> mt.ModelConfig:
    return mt.ModelConfig(vocab_size=vocab, dim=32, num_layers=num_layers, num_heads=4,
                          memory=mt.MemoryConfig(kind=kind, window=window, num_sink=num_sink))


def stream(model, tokens, k, state=None, resets_at=None):
    """Feed ``tokens`` [B, T] k at a time; ``resets_at`` {t: mask} resets rows before token t."""
    B, T = tokens.shape
    state = state if state is not None else model.init_state(B)
    outs, t = [], 0
    while t < T:
        step = k
        for r, mask in (resets_at or {}).items():
            if t == r:
                state.reset(mask)
            elif t < r < t + step:
                step = r - t  # stop at the reset
        logits, state = model.step(tokens[:, t:t + step], state)
        outs.append(logits)
        t += step
    return torch.cat(outs, dim=1), state
