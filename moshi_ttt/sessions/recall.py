"""Cross-session recall: facts told in session 1, the process restarted, asked in session 2.

Each task sample (``data/tasks.py``) is split at its question: session 1 streams the "tell" part
(the facts and the filler after them), session 2 the "ask" part (question and answer). Three
accuracies per task, on the answer tokens of the ask part:

- ``one_process``: tell then ask in one process, one state (the reference);
- ``resumed``: the state after tell saved to a SessionStore, then a NEW Python process loads the
  model checkpoint and the state and streams ask;
- ``fresh``: ask streamed from an empty state (what a model without durable memory knows).

``identical_logits`` says whether the resumed process produced the reference's logits bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load_checkpoint
from ..data.tasks import TaskSample, answer_accuracy, answer_token_accuracy, make_task
from .identity import identity_of
from .store import SessionStore


def split_sample(s: TaskSample) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tell [q], ask [T - q], ask answer mask [T - q]) with q the question's first token."""
    q = s.meta["question_start"]
    return s.tokens[:q], s.tokens[q:], s.answer_mask[q:]


@torch.no_grad()
def stream(model, tokens: torch.Tensor, state, step: int) -> torch.Tensor:
    """Stream tokens [1, T] into ``state`` ``step`` at a time. -> logits [1, T, V]."""
    return torch.cat(
        [model.step(tokens[:, t : t + step], state)[0] for t in range(0, tokens.shape[1], step)], 1
    )


def _accuracy(logits: torch.Tensor, ask: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    pred = logits.argmax(-1).cpu().numpy()[:, :-1]  # [1, T-1]: pred[:, t] predicts ask[t + 1]
    return float(answer_accuracy(pred, ask[None], mask[None])[0]), float(
        answer_token_accuracy(pred, ask[None], mask[None])[0]
    )


def cross_session_recall(
    ckpts: list,
    tasks=("passkey",),
    distance: int = 1,
    num: int = 16,
    seed: int = 0,
    step: int = 256,
    device: str = "cpu",
    keep_logits: bool = False,
) -> list[dict]:
    """One dict per checkpoint: {task: row}; ``distance`` x each model's window tokens separate the
    fact from the end of session 1. Held-out seeds ``seed * 1_000_003 + i`` (as ``task_accuracy``).
    With ``keep_logits`` each row also holds ``logits``: {run: list of ask logits [1, T, V]}."""
    with tempfile.TemporaryDirectory(prefix="moshi-ttt-sessions-") as tmp:
        store, plan, results = SessionStore(Path(tmp) / "store"), [], []
        for j, ck in enumerate(ckpts):
            model = load_checkpoint(ck, device)[0].eval()
            ident = identity_of(model)
            d = distance * model.cfg.memory.window
            per, items = {}, []
            for task in tasks:
                runs = {"one_process": [], "fresh": [], "samples": []}
                for i in range(num):
                    tell, ask, mask = split_sample(make_task(task, seed * 1_000_003 + i, d))
                    cid = f"m{j}-{task}-{i}"
                    state = model.init_state(1)
                    stream(model, torch.as_tensor(tell, device=device)[None], state, step)
                    store.save(cid, state, model, identity=ident)
                    ask_t = torch.as_tensor(ask, device=device)[None]
                    runs["one_process"].append(stream(model, ask_t, state, step).cpu())
                    runs["fresh"].append(stream(model, ask_t, model.init_state(1), step).cpu())
                    runs["samples"].append((ask, mask))
                    items.append((cid, torch.as_tensor(ask)))
                per[task] = dict(runs, distance=d)
            plan.append({"ckpt": str(ck), "items": items})
            results.append(per)
        resumed = _resume_in_new_process(store, plan, step, device, Path(tmp))
        out = []
        for j, per in enumerate(results):
            rows = {}
            for task, runs in per.items():
                res = [resumed[f"m{j}-{task}-{i}"] for i in range(num)]
                row = {
                    "distance": runs["distance"],
                    "n": num,
                    "identical_logits": all(
                        torch.equal(a, b) for a, b in zip(res, runs["one_process"])
                    ),
                }
                for name, logits in (
                    ("one_process", runs["one_process"]),
                    ("resumed", res),
                    ("fresh", runs["fresh"]),
                ):
                    acc = np.array(
                        [_accuracy(lg, a, m) for lg, (a, m) in zip(logits, runs["samples"])]
                    )
                    row[name], row[f"{name}_token"] = (
                        float(acc[:, 0].mean()),
                        float(acc[:, 1].mean()),
                    )
                    if keep_logits:
                        row.setdefault("logits", {})[name] = logits
                rows[task] = row
            out.append(rows)
        return out


def _resume_in_new_process(
    store: SessionStore, plan: list[dict], step: int, device: str, tmp: Path
) -> dict:
    """Run session 2 in a fresh interpreter (same thread count); -> {conversation id: logits}."""
    job, out = tmp / "plan.pt", tmp / "resumed.pt"
    torch.save(
        {
            "store": str(store.root),
            "plan": plan,
            "step": step,
            "device": device,
            "threads": torch.get_num_threads(),
        },
        job,
    )
    r = subprocess.run(
        [sys.executable, "-m", "moshi_ttt.sessions.recall", str(job), str(out)],
        capture_output=True,
        text=True,
        env=dict(os.environ),
    )
    if r.returncode:
        raise RuntimeError(f"session-2 process failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return torch.load(out, weights_only=True)


def _session_two(job_path: str, out_path: str) -> None:
    job = torch.load(job_path, weights_only=True)
    torch.set_num_threads(job["threads"])
    store, out = SessionStore(job["store"]), {}
    for entry in job["plan"]:
        model = load_checkpoint(entry["ckpt"], job["device"])[0].eval()
        ident = identity_of(model)
        for cid, ask in entry["items"]:
            state = store.load(cid, model, identity=ident)
            out[cid] = stream(model, ask.to(job["device"])[None], state, job["step"]).cpu()
    torch.save(out, out_path)


if __name__ == "__main__":
    _session_two(sys.argv[1], sys.argv[2])
