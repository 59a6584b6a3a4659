"""Resume-equivalence: stream A then B in one process == stream A, save, NEW process, load, stream B
(identical logits), for every memory kind, with and without In-Place TTT."""

import subprocess
import sys

import torch
from test_sessions import KINDS, config, model_of, streamed

from moshi_ttt.checkpoint import save_checkpoint
from moshi_ttt.sessions import SessionStore

SESSION_TWO = """
import sys, torch
from moshi_ttt.checkpoint import load_checkpoint
from moshi_ttt.sessions import SessionStore
job = torch.load(sys.argv[1], weights_only=True)
torch.set_num_threads(job["threads"])
store, out = SessionStore(job["store"]), {}
with torch.no_grad():
    for name, b in job["b"].items():
        model = load_checkpoint(job["ckpts"][name])[0].eval()
        state = store.load(name, model)
        steps = [model.step(b[:, t:t + 3], state)[0] for t in range(0, b.shape[1], 3)]
        out[name] = torch.cat(steps, 1)
torch.save(out, sys.argv[2])
"""


def continue_b(model, b, state):
    with torch.no_grad():
        return torch.cat(
            [model.step(b[:, t : t + 3], state)[0] for t in range(0, b.shape[1], 3)], 1
        )


def test_resume_in_a_new_process_gives_identical_logits(tmp_path):
    store = SessionStore(tmp_path / "store")
    job = {
        "store": str(tmp_path / "store"),
        "threads": torch.get_num_threads(),
        "b": {},
        "ckpts": {},
    }
    ref, fresh = {}, {}
    for kind in KINDS:
        for ttt in (False, True):
            name = kind + ("+ttt" if ttt else "")
            model = model_of(config(kind, ttt))
            save_checkpoint(tmp_path / f"{name}.pt", model)
            # A: 47 tokens, 8 a step: windows wrap, TTT chunks stay part-filled
            state = streamed(model)
            store.save(name, state, model)
            b = torch.randint(0, 50, (1, 23))
            ref[name] = continue_b(model, b, state)
            fresh[name] = continue_b(model, b, model.init_state(1))
            job["b"][name], job["ckpts"][name] = b, str(tmp_path / f"{name}.pt")
    torch.save(job, tmp_path / "job.pt")
    r = subprocess.run(
        [sys.executable, "-c", SESSION_TWO, str(tmp_path / "job.pt"), str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    resumed = torch.load(tmp_path / "out.pt", weights_only=True)
    assert sorted(resumed) == sorted(ref) and len(ref) == 12
    for name in ref:
        assert torch.equal(resumed[name], ref[name]), name  # bit for bit
        assert not torch.equal(fresh[name], ref[name]), name  # the state carried something
