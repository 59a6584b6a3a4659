import contextlib
import io
import math
import os
import subprocess
import traceback

import numpy as np
import pytest
import torch

# Triton kernels, where installed, run under its interpreter (set before import)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import moshi_ttt as mt  # noqa: E402


def _float64(x):
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def assert_close(actual, expected, rel, what="", *, floor=1.0):
    """Asserts ``max|actual - expected| <= rel * max(max|expected|, floor)``: the error is measured
    against the largest entry of ``expected`` (at least ``floor``), as rounding grows with the
    values, so a sum taken in another order (another CPU's kernels) stays within the same bound.
    Tensors, arrays or numbers; the shapes must match; NaN and infinity never pass."""
    a, e = _float64(actual), _float64(expected)
    name = f"{what}: " if what else ""
    assert a.shape == e.shape, f"{name}shape {a.shape} != expected {e.shape}"
    with np.errstate(invalid="ignore"):  # inf - inf: NaN, which fails below
        err = float(np.max(np.abs(a - e))) if a.size else 0.0
    scale = max(float(np.max(np.abs(e))) if e.size else 0.0, floor)
    limit = rel * scale
    assert math.isfinite(err) and math.isfinite(scale) and err <= limit, (
        f"{name}max|actual - expected| = {err:.3g} > {rel:.3g} x scale {scale:.3g} = {limit:.3g} "
        f"(error / scale = {err / scale if scale else math.inf:.3g})"
    )


def spawn_gloo_pair(worker, *args) -> None:
    """Run ``worker(rank, port, *args)`` in two processes that can join one gloo group on a free
    local port."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, *args), nprocs=2, join=True)


def run_cli(*args, cwd, env: dict | None = None) -> subprocess.CompletedProcess:
    """``moshi-ttt ARGS`` run from ``cwd`` inside this process (``cli.main``, as the console
    script calls it) with stdout and stderr captured and ``env`` added to the environment
    (``MOSHI_TTT_DEBUG`` unset unless given). An exception that escapes ``main`` prints its
    traceback and exits 1, as the interpreter would."""
    from moshi_ttt import cli

    old_cwd, old_env = os.getcwd(), dict(os.environ)
    out, err = io.StringIO(), io.StringIO()
    os.environ.pop("MOSHI_TTT_DEBUG", None)
    os.environ.update(env or {})
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main([str(a) for a in args])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Triton kernel tests: on CPU under the interpreter, and on the GPU with ``-m gpu``
TRITON_DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ],
    ),
]


@pytest.fixture
def on():
    """Lets Triton kernels take CPU tensors (under the interpreter) for the test;
    ``on(name)`` -> the device."""
    from moshi_ttt.ops.impl import implementation

    def device(name):
        if (
            name == "cpu"
            and not torch.cuda.is_available()
            and os.environ.get("TRITON_INTERPRET") != "1"
        ):
            pytest.skip("Triton's interpreter is off (set TRITON_INTERPRET=1 before import)")
        return torch.device(name)

    with implementation(kernels="interpret"):
        yield device


def tiny_config(
    kind: str = "window", window: int = 5, num_sink: int = 2, vocab: int = 50, num_layers: int = 2
) -> mt.ModelConfig:
    return mt.ModelConfig(
        vocab_size=vocab,
        dim=32,
        num_layers=num_layers,
        num_heads=4,
        memory=mt.MemoryConfig(kind=kind, window=window, num_sink=num_sink),
    )


def scan_problem(G, N, b, Dh, m, moms: bool, skip: bool = True, dtype=torch.float32, device="cpu"):
    """A compressor scan's inputs, leaves that require gradients: (ds, moms or None, inits, keys
    (normalised), vals, eta, apply) for G compressors [Dh, m] over N blocks of b tokens, with a
    partly filled last block and (``skip``) a skipped block in row 0."""
    inits = (torch.randn(G, Dh, m) / Dh**0.5, torch.randn(G, m, Dh) / m**0.5)
    ds = tuple(0.1 * torch.randn_like(w) for w in inits)
    mo = tuple(0.1 * torch.randn_like(w) for w in inits) if moms else None
    keys = torch.nn.functional.normalize(torch.randn(G, N, b, Dh), dim=-1)
    vals, eta = torch.randn(G, N, b, Dh), 4 * torch.rand(G, N, b) / b
    eta[:, -1, b // 2 :] = 0.0  # a partly filled block
    apply = torch.ones(G, N)
    if skip:
        apply[0, 1] = 0.0  # a skipped block
    leaf = lambda t: t.to(device, dtype).requires_grad_()
    tup = lambda t: tuple(leaf(a) for a in t) if t is not None else None
    return (
        tup(ds),
        tup(mo),
        tup(inits),
        leaf(keys),
        leaf(vals),
        leaf(eta),
        apply.to(device, dtype),
    )


def scan_model(shared: bool, device="cpu", grad_precision: str = "tf32"):
    """A two-layer TTT-cache model whose compressor scan exercises every option (momentum, decay,
    an active cap, truncated BPTT), and a batch of 2 with a reset in row 1: (model, tokens,
    resets), for comparing scan implementations at model level."""
    cfg = mt.ModelConfig(
        vocab_size=50,
        dim=64,
        num_layers=2,
        num_heads=4,
        memory=mt.MemoryConfig(
            kind="ttt_cache",
            window=8,
            block=16,
            num_virtual=4,
            momentum=0.5,
            decay=0.05,
            max_state_norm=4.0,
            bptt=2,
            compressor_shared=shared,
            cold_start="zero",
            grad_precision=grad_precision,
        ),
    )
    model = mt.StreamingLM(cfg).to(device)
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.memory.vkey_proj.normal_(0, 0.3)
    tokens = torch.randint(0, 50, (2, 120), device=device)
    resets = torch.zeros(2, 120, dtype=torch.bool, device=device)
    resets[1, 40] = True
    return model, tokens, resets


def assert_same_training(got, ref, rel: float, grad_rel: float):
    """(logits, gradients) of ``logits_and_grads`` against a reference's: logits within ``rel``,
    the same parameters with gradients (the compressor's initial state among them), each within
    ``grad_rel`` of its largest entry."""
    assert_close(got[0], ref[0], rel, "logits")
    assert ref[1].keys() == got[1].keys() and any("w1_init" in n for n in got[1])
    for n in ref[1]:
        assert_close(got[1][n], ref[1][n], grad_rel, n, floor=0.0)


def logits_and_grads(model, tokens, resets):
    """One forward and backward of a cross-entropy-like loss: (logits, every parameter's gradient
    by name)."""
    model.zero_grad()
    logits = model(tokens, resets)
    (logits.float().logsumexp(-1).mean() - logits[..., 0].float().mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def stream(model, tokens, k, state=None, resets_at=None):
    """Feed ``tokens`` [B, T] k at a time (a list: step sizes in turn); ``resets_at`` {t: mask}
    resets
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
        logits, state = model.step(tokens[:, t : t + step], state)
        outs.append(logits)
        t += step
    return torch.cat(outs, dim=1), state


def reset_parity(model, T: int, r: int, k, rel: float, vocab: int = 50):
    """Streaming equals parallel (``assert_close`` to ``rel``) over batch 3 with row 1 reset before
    token r, k tokens a step (a list: step sizes in turn). Returns the streamed state."""
    tokens = torch.randint(0, vocab, (3, T))
    resets = torch.zeros(3, T, dtype=torch.bool)
    resets[1, r] = True
    with torch.no_grad():
        ref = model(tokens, resets=resets)
        out, state = stream(model, tokens, k, resets_at={r: torch.tensor([False, True, False])})
    assert_close(out, ref, rel, "streaming vs parallel, row 1 reset")
    return state


def graphed_and_eager(model, T: int, batch: int = 2):
    """One-token steps of random tokens, eager and through a captured CUDA graph.
    Returns (graphed logits, eager logits, graphed state, eager state)."""
    from moshi_ttt.graph import GraphedStep

    tokens = torch.randint(0, model.cfg.vocab_size, (batch, T), device="cuda")
    eager_state = model.init_state(batch)
    eager = torch.cat([model.step(tokens[:, t : t + 1], eager_state)[0] for t in range(T)], 1)
    state = model.init_state(batch)
    step = GraphedStep(model, state)
    outs = torch.cat([step(tokens[:, t : t + 1]).clone() for t in range(T)], 1)
    return outs, eager, state, eager_state


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """A small prepared corpus from a fake source (12 documents of random words)."""
    import numpy as np

    from moshi_ttt.data import prepare
    from moshi_ttt.data.sources import Document, LoadedSource, Provenance

    rng = np.random.default_rng(0)
    words = ["the", "pass", "key", "river", "stone", "light", "memory", "window"]

    def fake_source(name, cache_dir):
        docs = [
            Document(
                name,
                f"d{i}",
                f"doc {i}",
                " ".join(rng.choice(words, size=int(rng.integers(300, 900)))),
                "public domain",
            )
            for i in range(12)
        ]
        return LoadedSource(name, docs, Provenance("fake", "1", "0" * 64, "public domain"))

    monkeypatch.setattr(prepare, "load_source", fake_source)
    out = tmp_path / "corpus"
    prepare.prepare_corpus(out, sources=("a", "b"), progress=False, val_frac=0.2, test_frac=0.2)
    return out


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    """A small sentencepiece model (ids 0-3 = unk, bos, eos, pad, as Moshi's) on the scripts'
    text."""
    import sentencepiece

    from moshi_ttt.moshi import data as md
    from moshi_ttt.moshi import synth

    lines = [t.text for s in synth.dataset_scripts(20, 0, 10, 5) for t in s.turns]
    prefix = tmp_path_factory.mktemp("spm") / "tiny"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(prefix),
        vocab_size=300,
        model_type="unigram",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return md.load_tokenizer(f"{prefix}.model")
