"""A conversation's LMGen state saved to the session store and resumed into a fresh model and
LMGen: the continuation equals streaming without the break."""

import pytest
import torch
from moshi.models.lm import LMGen
from test_moshi_adapter import FULL, MIXED, codes, lively, patch_lm, stock

from moshi_ttt.moshi.sessions import STATE_KIND, resume_lmgen, save_lmgen, streaming_tensors
from moshi_ttt.sessions import SessionStore, module_identity


def fresh(cfg):
    torch.manual_seed(5)
    lm = lively(patch_lm(stock(), cfg))
    return lm, LMGen(lm, use_sampling=False)


def run(gen, user, out):
    for t in range(user.shape[2]):
        tok = gen.step(user[:, :, t : t + 1])
        out.append(None if tok is None else tok.clone())


@pytest.mark.parametrize("cfg", [FULL, MIXED], ids=["full", "mixed"])
def test_lmgen_resume_equals_one_stream(cfg, tmp_path):
    user = codes(1, 30)[:, 3:]
    lm, gen = fresh(cfg)
    one = []
    with gen.streaming(1):
        run(gen, user, one)
    store = SessionStore(tmp_path / "store")
    lm, gen = fresh(cfg)
    ident = module_identity(lm, cfg.to_dict(), STATE_KIND)
    two = []
    with gen.streaming(1):
        run(gen, user[:, :, :17], two)
        save_lmgen(store, "conv", gen, ident, tokens=17)
        saved = {k: t.clone() for k, t in streaming_tensors(gen)[0].items()}
    lm2, gen2 = fresh(cfg)
    with gen2.streaming(1):
        resume_lmgen(store, "conv", gen2, module_identity(lm2, cfg.to_dict(), STATE_KIND))
        loaded = streaming_tensors(gen2)[0]
        assert saved.keys() == loaded.keys() and all(
            torch.equal(saved[k], loaded[k]) for k in saved
        )
        run(gen2, user[:, :, 17:], two)
    assert len(one) == len(two)
    for a, b in zip(one, two):
        assert (a is None and b is None) or torch.equal(a, b)
    assert sum(a is not None for a in one) > 10


def test_lmgen_resume_refuses_another_model(tmp_path):
    store = SessionStore(tmp_path / "store")
    lm, gen = fresh(MIXED)
    with gen.streaming(1):
        run(gen, codes(1, 5)[:, 3:], [])
        save_lmgen(store, "conv", gen, module_identity(lm, MIXED.to_dict(), STATE_KIND))
    other = lively(patch_lm(stock(seed=3), MIXED))
    gen2 = LMGen(other, use_sampling=False)
    with gen2.streaming(1), pytest.raises(ValueError, match="weights"):
        resume_lmgen(store, "conv", gen2, module_identity(other, MIXED.to_dict(), STATE_KIND))
