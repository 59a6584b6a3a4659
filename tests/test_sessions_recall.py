"""Cross-session recall: a model that recalls within one session recalls exactly as well after a
process restart with its stored memory, and not at all from a fresh memory."""

import json

import torch
from induction import induction_model

from moshi_ttt import report
from moshi_ttt.checkpoint import save_checkpoint
from moshi_ttt.data.tasks import make_task
from moshi_ttt.sessions.recall import cross_session_recall, split_sample, stream


def test_resumed_memory_recalls_like_one_process_and_fresh_does_not(tmp_path):
    model = induction_model(kind="full", window=16)
    save_checkpoint(tmp_path / "m.pt", model)
    [rows] = cross_session_recall(
        [tmp_path / "m.pt"], tasks=("mqar",), distance=4, num=4, keep_logits=True
    )
    r = rows["mqar"]
    assert r["distance"] == 64 and r["n"] == 4
    assert r["one_process"] >= 0.5  # it recalls within one session
    assert r["resumed"] == r["one_process"] and r["resumed_token"] == r["one_process_token"]
    assert r["identical_logits"]
    logits = r.pop("logits")
    for a, b in zip(logits["resumed"], logits["one_process"]):
        assert torch.equal(a, b)
    # fresh: session 2 streamed from an empty state, recomputed here
    for i, fresh in enumerate(logits["fresh"]):
        _, ask, _ = split_sample(make_task("mqar", i, 64))
        assert torch.equal(
            fresh, stream(model, torch.as_tensor(ask)[None], model.init_state(1), 256)
        )
    assert r["fresh"] == 0.0 and r["fresh_token"] < 0.2
    table = "\n".join(report.cross_session_table({"induction": {"cross_session": {"mqar": r}}}))
    assert "## Cross-session recall" in table
    assert (
        f"| induction | mqar | 64 | 4 | {r['one_process']:.2f} ({r['one_process_token']:.2f}) | "
        f"{r['resumed']:.2f} ({r['resumed_token']:.2f}) | 0.00 ({r['fresh_token']:.2f}) | True |"
        in table
    )
    json.dumps(r)  # metrics.json-ready


def test_evaluation_report_has_cross_session_table(tmp_path, corpus):
    import moshi_ttt as mt
    from moshi_ttt.pipeline import EvalConfig, evaluate

    save_checkpoint(
        tmp_path / "m.pt", mt.StreamingLM(mt.ModelConfig.preset("tiny")), {"name": "tiny-window"}
    )
    ec = EvalConfig(
        max_len=300,
        docs=2,
        buckets=(300,),
        distances=(1,),
        num=2,
        diagnostics=False,
        cost_lengths=(100,),
        cross_session=("passkey", "conversation"),
        cross_session_distance=1,
    )
    metrics = evaluate([tmp_path / "m.pt"], corpus, tmp_path / "eval", ec, "cpu")
    rows = metrics["models"]["tiny-window"]["cross_session"]
    assert set(rows) == {"passkey", "conversation"}
    for r in rows.values():
        assert r["identical_logits"] and r["resumed"] == r["one_process"] and r["distance"] == 64
    text = (tmp_path / "eval" / "report.md").read_text()
    assert "## Cross-session recall" in text and "| tiny-window | conversation | 64 | 2 |" in text
